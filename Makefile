# The user interface. `make` lists the targets. Train targets take ARGS="key=value ..." and CHECKPOINT=...
# PYTHON=python3 uses that interpreter as it is instead of bootstrapping .venv (e.g. on a GPU box with no pip).
# NPROC=N runs train targets on N GPUs of this node under torchrun (FSDP); NNODES=M RDZV=host:port on M nodes.
# Without a GPU, NPROC=N runs N CPU processes (gloo): the multi-process path, tried locally.

.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV := .venv

ifeq ($(origin PYTHON),undefined)
PYTHON := $(VENV)/bin/python
ENV := $(VENV)/.installed
else
ENV :=
endif

# torchrun is $(PYTHON) -m torch.distributed.run: the same interpreter as everything else
ifdef NNODES
LAUNCH = $(PYTHON) -m torch.distributed.run --nnodes $(NNODES) --nproc-per-node $(or $(NPROC),gpu) \
	--rdzv-backend c10d --rdzv-endpoint $(or $(RDZV),$(error NNODES needs RDZV=<first node>:<port>, on every node)) \
	--rdzv-id $(or $(RDZV_ID),llm-pretrain) -m
else ifdef NPROC
LAUNCH = $(PYTHON) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) -m
else
LAUNCH = $(PYTHON) -m
endif
TRAIN = $(LAUNCH) engine.train
RESUME = $(if $(CHECKPOINT),resume=$(CHECKPOINT))
P7_1B5 := configs/phase7_1.5b_triton.yaml
need_checkpoint = @test -n "$(CHECKPOINT)" || { echo "error: CHECKPOINT=<path> is required, e.g. make $@ CHECKPOINT=$(1)" >&2; exit 2; }

.PHONY: help setup quickstart test lint test-device-versions aot-check gpu-check check-env check-phase7-env verify-phase7 triton-attn data-lite data recipe \
	train train-phase7-test train-phase7-small train-phase7-1.5b train-phase7-1.5b-test \
	train-phase7-1.5b-resume train-mdm-test train-mdm-6M train-mdm-170M train-mdm-1B sweep scaling plot \
	chat chat-phase7-1.5b consolidate bench-phase7-1.5b bench-kernels bench-adam8bit bench-fsdp clean-checkpoints \
	train-hf train-hf-test export bench-hf eval

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_.-]+:.*## / {printf "  %-26s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  Train targets take ARGS=\"key=value ...\" (any config key) and CHECKPOINT=<file.pt> to resume."
	@echo "  NPROC=8: on 8 GPUs of this node (torchrun, FSDP; CPU processes without a GPU); NNODES=2 RDZV=host:29500 on 2 nodes; Slurm: scripts/slurm/."

# constraints.txt pins the releases CI tested: a fresh machine gets exactly those.
$(VENV)/.installed: requirements.txt constraints.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt -c constraints.txt
	touch $@

setup: $(VENV)/.installed ## create .venv, install requirements.txt at the versions of constraints.txt (idempotent)

quickstart: $(ENV) ## setup, data-lite, train the tiny model, sample from it
	$(MAKE) --no-print-directory data-lite PYTHON=$(PYTHON)
	$(MAKE) --no-print-directory train-phase7-test PYTHON=$(PYTHON)
	@echo "--- a sample from checkpoints/phase7_test (chat with it: make chat CHECKPOINT=checkpoints/phase7_test)"
	echo "ROMEO:" | $(PYTHON) -m engine.chat checkpoints/phase7_test max_new_tokens=60 seed=0

test: lint ## lint, then run the test suite (CPU; GPU tests are skipped without CUDA)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint: $(ENV) ## ruff with ruff.toml's rules (pyflakes, pycodestyle, 120 columns)
	@if [ -z "$(ENV)" ] && ! $(PYTHON) -c "import ruff" 2>/dev/null; then \
		echo "lint skipped: ruff is not installed for $(PYTHON) (it is in .venv)"; \
	else $(PYTHON) -m ruff check --no-cache .; fi

# The device's versions (the lent H200 runs torch 2.11, triton 3.6, transformers 5.17; CI tests the newest): a
# second venv, and triton 3.6 alone beside .venv for compiling. Both git-ignored.
DEVICE_VENV := .venv-device
# numpy<2.4 for the CPU tests only: Triton 3.6's interpreter calls int() on 1-element arrays, an error from numpy
# 2.4 (the device has 2.5 but compiles the kernels; it never interprets them)
DEVICE_PINS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4"
DEVICE_TRITON := .aot/triton-3.6

$(DEVICE_VENV)/.installed: requirements.txt
	test -x $(DEVICE_VENV)/bin/python || python3 -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q -r requirements.txt $(DEVICE_PINS)
	touch $@

test-device-versions: $(DEVICE_VENV)/.installed ## the test suite under the GPU device's torch 2.11 / triton 3.6 / transformers 5.17 (.venv-device, ~5 GB) [PYTEST_ARGS=]
	$(DEVICE_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

$(DEVICE_TRITON)/.installed:
	$(PYTHON) -m pip install -q --target $(DEVICE_TRITON) triton==3.6.0
	touch $@

aot-check: $(ENV) $(DEVICE_TRITON)/.installed ## compile every config of every Triton kernel for the H200 (sm_90) on CPU, with this triton and 3.6: smem, registers, spills
	$(PYTHON) -m kernels.aot_check; ours=$$?; \
	PYTHONPATH=$(DEVICE_TRITON) $(PYTHON) -m kernels.aot_check; device=$$?; exit $$((ours || device))

gpu-check: ## on a lent GPU (PYTHON=python3): every headline check and number in one <= 8-min call [STEPS="tests verify"|--plan]
	$(if $(filter command line,$(origin PYTHON)),PYTHON=$(PYTHON)) scripts/gpu_check.sh $(STEPS)

check-env: $(ENV) ## ✓/✗ for torch, CUDA/GPU, Triton (a kernel is run), flash-attn; memory mode's 1.44B peak
	$(PYTHON) -m engine.check_env

check-phase7-env: check-env ## alias of check-env

verify-phase7: check-env ## check-env + kernels against their references + a 3-step training run
	$(MAKE) --no-print-directory triton-attn PYTHON=$(PYTHON)
	$(TRAIN) configs/phase7_test.yaml data=dummy fast_dev_run=3 log_every=1 $(ARGS)

triton-attn: $(ENV) ## check the Triton attention kernel against the reference; print error and timing
	$(PYTHON) -m kernels.check_attention

data-lite: $(ENV) ## small real corpus (Shakespeare + Milton), BPE tokenizer, packed shards in data/lite [TOKENIZER=] [FORCE=1]
	$(PYTHON) -m data.prepare_lite $(if $(TOKENIZER),--tokenizer $(TOKENIZER)) $(if $(FORCE),--force)

# A variable, not a continued recipe line: make echoes a recipe's `\` lines as they are, empty ones too.
DATA_FLAGS = $(strip $(if $(SPLIT),--split $(SPLIT)) $(if $(PERCENTAGE),--percentage $(PERCENTAGE)) \
	$(if $(WORKERS),--workers $(WORKERS)) $(if $(STRICT),--strict))
data: $(ENV) ## tokenize a corpus: SOURCE= TOKENIZER= DEST= [SPLIT=] [PERCENTAGE=] [WORKERS=] [STRICT=1]
	$(PYTHON) -m data.prepare --source "$(SOURCE)" --tokenizer "$(TOKENIZER)" --dest "$(DEST)" $(DATA_FLAGS)

recipe: $(ENV) ## build a dataset mixture: interactive, or SOURCES="data/a:0.7 data/b:0.3" [OUT=...]
	$(PYTHON) -m data.recipe $(if $(SOURCES),--sources $(SOURCES)) $(if $(OUT),--out $(OUT))

train: $(ENV) ## train any recipe: CONFIG=configs/<name>.yaml
	@test -n "$(CONFIG)" || { echo "error: CONFIG=configs/<name>.yaml is required" >&2; exit 2; }
	$(TRAIN) $(CONFIG) $(RESUME) $(ARGS)

train-phase7-test: $(ENV) ## tiny phase 7 model on data-lite (CPU, ~2 min)
	$(TRAIN) configs/phase7_test.yaml $(RESUME) $(ARGS)

train-phase7-small: $(ENV) ## the fallback when 1.5B does not fit: d1536, 20 layers, n_seq 512
	$(TRAIN) configs/phase7_small.yaml $(RESUME) $(ARGS)

train-phase7-1.5b: $(ENV) ## phase 7 at 1.44B parameters, all optimisations on (GPU)
	$(TRAIN) $(P7_1B5) $(RESUME) $(ARGS)

train-phase7-1.5b-test: $(ENV) ## 1.5B on dummy data for 20 steps: does it run on this GPU?
	$(TRAIN) $(P7_1B5) data=dummy device=cuda max_steps=20 log_every=1 eval_every=20 eval_batches=2 \
		save_every=20 out_dir=checkpoints/phase7_1.5b_test $(RESUME) $(ARGS)

train-phase7-1.5b-resume: $(ENV) ## continue a 1.5B run exactly: CHECKPOINT=checkpoints/.../phase7_step_2000.pt
	$(call need_checkpoint,checkpoints/phase7_1.5b_triton/phase7_step_2000.pt)
	$(TRAIN) $(P7_1B5) resume=$(CHECKPOINT) $(ARGS)

train-mdm-test: $(ENV) ## tiny masked diffusion LM on data-lite (CPU, ~2 min)
	$(TRAIN) configs/mdm_test.yaml $(RESUME) $(ARGS)

train-mdm-6M: $(ENV) ## masked diffusion LM, SMDM's smallest size, steps from flops_budget (GPU; SlimPajama)
	$(TRAIN) configs/mdm_6M.yaml $(RESUME) $(ARGS)

train-mdm-170M: $(ENV) ## masked diffusion LM at the seed's 170M recipe, 1e19 FLOPs (GPU; SlimPajama)
	$(TRAIN) configs/mdm_170M.yaml $(RESUME) $(ARGS)

train-mdm-1B: $(ENV) ## masked diffusion LM at 1B, 1e20 FLOPs (GPU; SlimPajama)
	$(TRAIN) configs/mdm_1B.yaml $(RESUME) $(ARGS)

train-hf: $(ENV) ## a transformers causal LM on our engine and kernels: Qwen3-0.6B on wikitext-2 (GPU; ARGS="model_name=...")
	$(TRAIN) configs/hf_qwen3_0.6b.yaml $(RESUME) $(ARGS)

train-hf-test: $(ENV) ## phase hf on CPU, no download: a tiny Qwen3 architecture from scratch on data-lite
	$(TRAIN) configs/hf_test.yaml $(RESUME) $(ARGS)

sweep: $(ENV) ## grid search: CONFIG=... GRID="learning_rate=1e-4,2e-4 batch_size=128,256" [OUT=dir]
	@test -n "$(CONFIG)" -a -n "$(GRID)" || { echo 'error: CONFIG=configs/<name>.yaml and GRID="key=v1,v2 ..." are required' >&2; exit 2; }
	$(PYTHON) -m engine.sweep $(CONFIG) $(GRID) $(if $(OUT),--out $(OUT)) $(ARGS)

scaling: $(ENV) ## loss vs FLOPs: PHASE=mdm|phase7 SIZES="6M,170M" BUDGETS="1e18,3e18" [OUT=dir] [EVAL_TASKS=piqa,arc_easy]; both phases: the gap
	$(PYTHON) -m engine.scaling $(if $(PHASE),--phase $(PHASE)) $(if $(SIZES),--sizes "$(SIZES)") \
		$(if $(BUDGETS),--budgets "$(BUDGETS)") $(if $(OUT),--out $(OUT)) $(if $(COMPARE),--compare) \
		$(if $(EVAL_TASKS),--eval-tasks "$(EVAL_TASKS)") $(if $(EVAL_ARGS),--eval-args "$(EVAL_ARGS)") $(ARGS)

plot: $(ENV) ## training curves as PNGs: RUN=checkpoints/x [RUN2=...] [RUNS="a b c"] [OUT=file.png]; a sweep folder: all its runs
	@test -n "$(RUN)$(RUNS)" || { echo 'error: RUN=<run or sweep folder> is required, e.g. make plot RUN=checkpoints/phase7_test' >&2; exit 2; }
	$(PYTHON) -m engine.plot $(RUN) $(RUN2) $(RUNS) $(if $(OUT),--out $(OUT))

chat-phase7-1.5b: $(ENV) ## chat with CHECKPOINT, or the best/final/latest in checkpoints/phase7_1.5b_triton
	$(PYTHON) -m engine.chat $(or $(CHECKPOINT),checkpoints/phase7_1.5b_triton) $(ARGS)

chat: $(ENV) ## chat with any checkpoint or run folder: CHECKPOINT=...
	$(call need_checkpoint,checkpoints/phase7_test)
	$(PYTHON) -m engine.chat $(CHECKPOINT) $(ARGS)

consolidate: $(ENV) ## one .pt from a multi-GPU checkpoint folder: CHECKPOINT=checkpoints/x/phase7_step_2000 [OUT=file.pt]
	$(call need_checkpoint,checkpoints/phase7_1.5b_triton/phase7_step_2000)
	$(PYTHON) -m engine.consolidate $(CHECKPOINT) $(OUT) $(ARGS)

eval: $(ENV) ## benchmarks (lm-eval): CHECKPOINT=<checkpoint, run or sweep folder> TASKS=hellaswag,arc_easy,task.yaml [LIMIT=N] [ARGS="batch_size=16 mc_num=128 nll=mc|chain_rule cfg=0 greedy=false"]
	$(call need_checkpoint,checkpoints/phase7_test)
	@test -n "$(TASKS)" || { echo "error: TASKS=<lm-eval task names or task YAML paths> is required, e.g. TASKS=hellaswag,arc_easy" >&2; exit 2; }
	$(PYTHON) -m engine.evaluate $(CHECKPOINT) "$(TASKS)" $(if $(LIMIT),limit=$(LIMIT)) $(ARGS)

export: $(ENV) ## a checkpoint (or run folder) to its phase's format: CHECKPOINT=... OUT=dir (phase7: Llama, hf: its model)
	$(call need_checkpoint,checkpoints/hf_qwen3_0.6b)
	@test -n "$(OUT)" || { echo "error: OUT=<folder to write> is required" >&2; exit 2; }
	$(PYTHON) -m engine.export $(CHECKPOINT) $(OUT) $(ARGS)

bench-phase7-1.5b: $(ENV) ## GPU: tok/s, MFU, peak memory, largest depth that fits [PEER=1] [MEM_GB=8] [LEVERS=1]
	$(PYTHON) -m bench.phase7 $(if $(PEER),--peer) $(if $(MEM_GB),--mem-gb $(MEM_GB)) $(if $(LEVERS),--levers) $(ARGS)

bench-kernels: $(ENV) ## GPU: our attention and RMSNorm kernels against SDPA / cuDNN / F.rms_norm
	$(PYTHON) -m bench.bench_kernels $(ARGS)

bench-fsdp: $(ENV) ## GPU: phase7-1.5b tok/s under FSDP on 1 GPU vs the single-process engine (FSDP's overhead)
	$(PYTHON) -m bench.phase7 --fsdp --no-depth-search $(ARGS)

bench-adam8bit: $(ENV) ## 8-bit AdamW for memory mode: ours vs bitsandbytes, torchao; loss vs fp32 AdamW [CONFIG=...]
	$(PYTHON) -m bench.adam8bit $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

.PHONY: bench-tt-embedding
bench-tt-embedding: $(ENV) ## tensor-train ("HTT") embedding vs dense at equal steps: val loss, params, tok/s [CONFIG=...]
	$(PYTHON) -m bench.tt_embedding $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

.PHONY: bench-hyperbolic-attention
bench-hyperbolic-attention: $(ENV) ## hyperbolic attention (each curvature schedule) vs euclidean at equal steps: val loss, s/step [CONFIG=...]
	$(PYTHON) -m bench.hyperbolic_attention $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

bench-hf: $(ENV) ## GPU: phase hf (Qwen3-0.6B architecture, seq 512) vs the plain loop + torch.compile [LEVERS=1] [MEMORY=1]
	$(PYTHON) -m bench.hf $(if $(LEVERS),--levers) $(if $(MEMORY),--memory-mode) $(ARGS)
.PHONY: train-phase8 train-phase8-test chat-phase8 bench-phase8-vs-phase7 bench-phase8-variants

train-phase8: $(ENV) ## phase 8, O(N) linear attention at phase 7's 1.5B dims (GPU)
	$(TRAIN) configs/phase8_1.5b.yaml $(RESUME) $(ARGS)

train-phase8-test: $(ENV) ## tiny phase 8 (linear attention) model on data-lite (CPU, ~3 min)
	$(TRAIN) configs/phase8_test.yaml $(RESUME) $(ARGS)

chat-phase8: $(ENV) ## chat with CHECKPOINT, or the best/final/latest in checkpoints/phase8_1.5b
	$(PYTHON) -m engine.chat $(or $(CHECKPOINT),checkpoints/phase8_1.5b) $(ARGS)

bench-phase8-vs-phase7: $(ENV) ## training step tok/s + peak memory at S=1k..32k, crossover (GPU) [MIXER=1] [CPU=1]
	$(PYTHON) -m bench.phase8_vs_phase7 $(if $(CPU),--cpu) $(if $(MIXER),--mixer) $(ARGS)

bench-phase8-variants: $(ENV) ## CPU, data-lite: phase 8 variants against phase 7, val loss at equal steps
	$(PYTHON) -m bench.phase8_variants $(ARGS)

clean-checkpoints: ## delete checkpoints/: every run's checkpoints and logs (asks first)
	@read -p "delete checkpoints/? [y/N] " answer && [ "$$answer" = y ] && rm -rf checkpoints/ || true
