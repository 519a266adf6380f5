"""Several ranks on CPU: torchrun with 2 gloo processes against one process, distributed checkpoints, resume
on another world size, resume=auto after a rank dies mid-save, the launchers (Make, Slurm)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import ConfigError
from engine.distributed import check_supported, rank_seed
from engine.train import Trainer
from phases import load_config

ROOT = __file__.rsplit("/tests/", 1)[0]
# tests/test_train.py's tiny run with a checkpoint every 2 steps; batch_size is per rank
TINY = ["data=dummy", "vocab_size=64", "n_seq=16", "d_model=32", "n_heads=2", "n_layers=2", "ffn_dim=64",
        "batch_size=2", "gradient_accumulation_steps=2", "warmup_steps=2", "log_every=1", "eval_every=3",
        "eval_batches=2", "save_every=2", "learning_rate=1e-2", "max_steps=6"]


def torchrun(nproc, *args, module="engine.train", env=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", module, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})})


def log_of(run_dir):
    return json.loads((run_dir / "training_log.json").read_text())


def same_log(a, b, rel=1e-5):
    """Steps, losses, gradient norms, val losses and token counts equal to float tolerance."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"], x["step"]
        for key in ("loss", "grad_norm", "val_loss"):
            assert (x.get(key) is None) == (y.get(key) is None), (x["step"], key)
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=rel), (x["step"], key)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """6 steps on 2 ranks of batch_size 2: checkpoint folders at steps 2, 4, 6, best and final."""
    run = tmp_path_factory.mktemp("dist") / "two_ranks"
    result = torchrun(2, *TINY, f"out_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result.stdout


def test_two_ranks_log_what_one_process_with_twice_the_batch_logs(two_ranks, tmp_path):
    run, _ = two_ranks
    one = Trainer(load_config(None, TINY + ["batch_size=4", f"out_dir={tmp_path / 'one'}"]))
    one.fit()
    same_log(log_of(run), log_of(tmp_path / "one"))
    assert log_of(run)[-1]["tokens"] == 6 * 2 * 2 * 2 * 16  # tokens of both ranks
    assert ckpt.load_checkpoint(run / "phase7_final")["sequences_drawn"] == one.sequences_drawn == 6 * 8


def test_only_rank_0_prints_and_writes_the_run_files(two_ranks):
    run, stdout = two_ranks
    assert stdout.count("Step      1 | ") == 1 and stdout.count("Done: step 6") == 1
    assert "tok/s: " in stdout and ("/GPU)" if torch.cuda.is_available() else "/rank)") in stdout
    assert "128 tokens/step (2 ranks x micro-batch 2 x 2 accumulation steps x 16 tokens)" in stdout
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "latest", "loss.png", "phase7_best",
                                                     "phase7_final", "phase7_step_2", "phase7_step_4",
                                                     "phase7_step_6", "training_log.json"]
    assert (run / "latest").read_text().strip() == "phase7_final"
    assert sorted(p.name for p in (run / "phase7_step_4").iterdir()) == [".metadata", "__0_0.distcp",
                                                                         "__1_0.distcp", "checksums.sha256",
                                                                         "train_state.json"]
    assert [r["step"] for r in log_of(run)] == [1, 2, 3, 4, 5, 6]


def test_a_checkpoint_of_two_ranks_resumes_on_one(two_ranks, tmp_path):
    """One process (reading the folder whole) from step 4, torchrun with one rank (DCP resharding) from step 2:
    both with batch_size 4, the same sequences per step, so the same losses as the run that never stopped."""
    run, _ = two_ranks
    single = Trainer(load_config(None, TINY + ["batch_size=4", f"out_dir={tmp_path / 'single'}",
                                               f"resume={run / 'phase7_step_4'}"]))
    single.fit()
    same_log(log_of(run)[4:], log_of(tmp_path / "single"))
    result = torchrun(1, *TINY, "batch_size=4", f"out_dir={tmp_path / 'one_rank'}", f"resume={run / 'phase7_step_2'}")
    assert result.returncode == 0, result.stderr[-3000:]
    same_log(log_of(run)[2:], log_of(tmp_path / "one_rank"))


def test_a_single_process_checkpoint_resumes_on_two_ranks(tmp_path):
    """A .pt of one process (optimizer keyed by index) loads into the shards of 2 ranks of half the batch."""
    single = tmp_path / "single"
    Trainer(load_config(None, TINY + ["batch_size=4", "max_steps=4", f"out_dir={single}"])).fit()
    result = torchrun(2, *TINY, "max_steps=4", f"out_dir={tmp_path / 'two'}", f"resume={single / 'phase7_step_2.pt'}")
    assert result.returncode == 0, result.stderr[-3000:]
    same_log(log_of(single)[2:], log_of(tmp_path / "two"))


def test_a_rank_killed_mid_save_leaves_latest_valid_and_resume_auto_continues_exactly(tmp_path):
    """mdm (each rank draws its own noise) on 2 ranks. Rank 1 alone has a NaN loss in step 1: both ranks skip
    the update. Rank 1 then gets SIGKILL while writing step 4's shards: the job stops naming rank 1, `latest`
    still names step 2, and resume=auto on 2 ranks replays steps 3 and 4 exactly, with keep_last=1. (One run
    for these: each torchrun start costs seconds on 2 cores.)"""
    run = tmp_path / "killed"
    args = [*TINY, "phase=mdm", f"out_dir={run}"]
    killed = torchrun(2, *args, module="tests.faults", env={"FAULT_NAN": "1:1", "FAULT_KILL_IN_SAVE": "1:mdm_step_4"})
    assert "Step      1 | non-finite loss or gradient: update skipped (1/5)" in killed.stdout  # rank 0 saw it
    assert killed.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in killed.stderr and "SIGKILL" in killed.stderr
    assert (run / "latest").read_text().strip() == "mdm_step_2"
    assert not (run / "mdm_step_4").exists() and (run / ".mdm_step_4.partial").is_dir()
    assert ckpt.newest_checkpoint(run) == run / "mdm_step_2"
    assert ckpt.load_checkpoint(run / "mdm_step_2", lazy=True)["sequences_drawn"] == 3 * 8  # the skip drew too
    before = log_of(run)  # the save runs in the background: steps after 4 may have been logged before the kill
    assert [r["step"] for r in before][:4] == [1, 2, 3, 4]

    resumed = torchrun(2, *args, "resume=auto", "keep_last=1")  # each step folder goes once the next is published
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume=auto: continuing from {run / 'mdm_step_2'}" in resumed.stdout
    after = log_of(run)
    assert [(r["loss"], r["grad_norm"], r.get("val_loss")) for r in after[2:4]] == \
        [(r["loss"], r["grad_norm"], r.get("val_loss")) for r in before[2:4]]
    assert (run / "latest").read_text().strip() == "mdm_final" and not (run / ".mdm_step_4.partial").exists()
    assert sorted(p.name for p in run.iterdir() if "mdm_" in p.name) == ["mdm_best", "mdm_final", "mdm_step_6"]


def test_chat_export_and_consolidate_read_checkpoint_folders(two_ranks, tmp_path):
    from engine.checkpoint import resolve_checkpoint
    from phases import get_phase

    run, _ = two_ranks
    assert resolve_checkpoint(str(run)) == run / "phase7_best"
    assert resolve_checkpoint(str(run / "phase7_step_4")) == run / "phase7_step_4"
    whole = ckpt.load_checkpoint(run / "phase7_final")
    model = get_phase("phase7").build_model(load_config(None, TINY))
    model.load_state_dict(whole["model"])  # strict: every name and shape of the single-process model
    out = tmp_path / "final.pt"
    result = subprocess.run([sys.executable, "-m", "engine.consolidate", str(run / "phase7_final"), str(out)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    consolidated = torch.load(out, weights_only=True)  # no pickled code in the consolidated file
    assert consolidated["step"] == 6 and all(torch.equal(consolidated["model"][k], v)
                                             for k, v in whole["model"].items())
    resumed = Trainer(load_config(None, TINY + ["batch_size=4", "max_steps=7", f"out_dir={tmp_path / 'from_pt'}",
                                                f"resume={out}"]))
    assert resumed.step == 6 and resumed.sequences_drawn == 6 * 8


def test_resume_auto_in_a_single_process(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(load_config(None, TINY + ["max_steps=3", f"out_dir={run}", "resume=auto"])).fit()
    assert "resume=auto: no checkpoint in" in capsys.readouterr().out
    assert ckpt.newest_checkpoint(run) == run / "phase7_final.pt"  # step 3, after phase7_step_2.pt
    trainer = Trainer(load_config(None, TINY + ["max_steps=4", f"out_dir={run}", "resume=auto"]))
    assert trainer.step == 3 and trainer.resume_from == run / "phase7_final.pt"
    (run / "phase7_step_4.pt").write_bytes((run / "phase7_final.pt").read_bytes())  # a name with a higher step
    (run / ".phase7_step_6.partial").mkdir()  # half-written: never chosen
    assert ckpt.newest_checkpoint(run) == run / "phase7_step_4.pt"
    (run / "latest").write_text("phase7_step_2.pt\n")  # an older pointer (e.g. of other ranks) never sends it back
    assert ckpt.newest_checkpoint(run) == run / "phase7_step_4.pt"


def test_what_fsdp_cannot_do_is_an_error_before_anything_is_built():
    with pytest.raises(ConfigError, match="memory_mode=true does not run with FSDP.*set memory_mode=false"):
        check_supported(load_config(None, TINY + ["memory_mode=true"]))
    with pytest.raises(ConfigError, match="micro_batch_size=N"):
        check_supported(load_config(None, TINY + ["micro_batch_size=auto"]))
    check_supported(load_config(None, TINY + ["micro_batch_size=1"]))


# One model of each kind: phase 7 dense (the embedding an FSDP unit of its own), phase 8 hybrid with the
# convolution and activation checkpointing (wrapped blocks: wrapper names in parameter names), mdm, a tied
# tensor-train embedding (embedding and head in the root), the toy phase outside phases/, a transformers model
# from scratch (its own _init_weights; tied embeddings)
INITIAL_WEIGHTS = [TINY, [*TINY, "phase=phase8", "hybrid_every=2", "short_conv=4", "use_gradient_checkpointing=true"],
                   [*TINY, "phase=mdm"], [*TINY, "embedding=tt", "tt_rank=4", "tie_embeddings=true"],
                   ["phase=tests.toy_phase", "data=dummy", "vocab_size=64", "n_seq=16", "toy_width=24"],
                   ["phase=hf", f"model_name={ROOT}/configs/hf_tiny_qwen3", "init=scratch", "data=dummy", "n_seq=16"]]


def test_two_ranks_start_from_the_initial_weights_of_one_process_bit_for_bit(tmp_path):
    """Each rank initialises only its shards (from the meta device, engine/init.py); gathered whole, they are
    exactly one process's weights, and the RoPE tables are computed, not left as to_empty's memory."""
    from engine.init import WRAPPER_PREFIXES, build_initialised
    from phases import get_phase
    from phases.phase7.model import rope_tables

    out = tmp_path / "initial.pt"
    result = torchrun(2, str(out), json.dumps(INITIAL_WEIGHTS), module="tests.initial_weights")
    assert result.returncode == 0, result.stderr[-3000:]
    gathered = torch.load(out, weights_only=True)
    cos, sin = rope_tables(16, 16, 10000.0)  # TINY: head_dim 32 / 2 heads, n_seq 16
    assert torch.equal(gathered[0]["buffers"]["rope_cos"], cos) and torch.equal(gathered[0]["buffers"]["rope_sin"], sin)
    for args, sharded in zip(INITIAL_WEIGHTS, gathered, strict=True):
        cfg = load_config(None, args)
        one = build_initialised(get_phase(cfg.phase), cfg)
        expected = one.state_dict()
        assert sharded["params"].keys() == expected.keys(), args
        assert all(torch.equal(sharded["params"][k], v) for k, v in expected.items()), args
        buffers = {}
        for name, value in sharded["buffers"].items():
            for prefix in WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            buffers[name] = value
        assert buffers.keys() == dict(one.named_buffers()).keys()
        assert all(torch.equal(buffers[k], v) for k, v in one.named_buffers()), args


def test_each_rank_has_its_own_reproducible_seed():
    seeds = [rank_seed(1337, rank) for rank in range(8)]
    assert len(set(seeds)) == 8 and seeds == [rank_seed(1337, rank) for rank in range(8)]
    assert rank_seed(1337, 0, step=4) != seeds[0] and all(0 <= s < 2**63 for s in seeds)


def make(*args):
    return subprocess.run(["make", "-n", "--no-print-directory", f"PYTHON={sys.executable}", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_nproc_and_nnodes_run_train_targets_under_torchrun():
    run = f"{sys.executable} -m torch.distributed.run"
    assert f"{run} --standalone --nproc-per-node 8 -m engine.train configs/phase7_test.yaml" in \
        make("train", "CONFIG=configs/phase7_test.yaml", "NPROC=8").stdout
    assert f"{run} --standalone --nproc-per-node 2 -m engine.train configs/mdm_test.yaml" in \
        make("train-mdm-test", "NPROC=2").stdout
    assert (f"{run} --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node01:29500 "
            "--rdzv-id llm-pretrain -m engine.train") in make("train-phase7-1.5b", "NPROC=8", "NNODES=2",
                                                              "RDZV=node01:29500").stdout
    assert "NNODES needs RDZV=" in make("train-phase7-1.5b", "NNODES=2").stderr
    assert f"{sys.executable} -m engine.train configs/phase7_test.yaml" in make("train-phase7-test").stdout


def test_slurm_script_starts_one_torchrun_per_node_with_resume_auto(tmp_path):
    script = f"{ROOT}/scripts/slurm/train.sbatch"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    scontrol = tmp_path / "scontrol"  # Slurm's node list expansion, as on a cluster
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "node01\\nnode02\\n"\n')
    scontrol.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_SUBMIT_DIR": ROOT, "DRY_RUN": "1"}
    result = subprocess.run(["bash", script, "CONFIG=configs/phase7_1.5b_triton.yaml", "ARGS=max_steps=10 data=dummy",
                             "out_dir=checkpoints/big"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", result.stdout.split()[4], "-m",
        "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "node01:29500", "--rdzv-id", "42", "-m", "engine.train",
        "configs/phase7_1.5b_triton.yaml", "resume=auto", "out_dir=checkpoints/big", "max_steps=10", "data=dummy"]
    text = open(script).read()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text and "scontrol requeue" in text
    missing = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "CONFIG=configs/<name>.yaml is required" in missing.stderr


@pytest.mark.gpu
def test_fsdp_on_one_gpu_trains_like_one_process(tmp_path):
    """CUDA: NCCL, bf16 mixed-precision policy, async checkpoints staged from the GPU; bf16 tolerance."""
    cuda = [*TINY, "device=cuda", "use_compile=false"]
    one = Trainer(load_config(None, cuda + [f"out_dir={tmp_path / 'one'}"]))
    one.fit()
    result = torchrun(1, *cuda, f"out_dir={tmp_path / 'fsdp'}")
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(log_of(tmp_path / "one"), log_of(tmp_path / "fsdp"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.1)
    assert ckpt.is_distributed_checkpoint(tmp_path / "fsdp" / "phase7_final")


def test_a_checkpoint_folder_whose_index_would_run_code_is_refused(tmp_path):
    """DCP unpickles .metadata with plain pickle; ours refuses any class DCP does not write there."""
    import pickle

    from engine import dcp_reader

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    folder = tmp_path / "phase7_step_2"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    (folder / "train_state.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="refers to posix.system"):
        ckpt.load_checkpoint(folder)
    assert not (tmp_path / "ran").exists()
    with pytest.raises(dcp_reader.UnsafeCheckpointError):
        dcp_reader.read_metadata(folder)
