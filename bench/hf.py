"""make bench-hf: phase hf against the plain training loop on the same transformers model, in one process.

The model is Qwen3-0.6B's architecture with fresh weights (the weights do not change the speed, and the GPU box
needs no download): its config.json is written to a temporary folder, or --model names another folder. Both sides
train micro-batches of 16 x 512 tokens under bf16 autocast with fp32 weights, fused AdamW and clipping:

- the plain loop: AutoModelForCausalLM with transformers' SDPA, `model(input_ids, labels=input_ids).loss`, eager
  and with torch.compile of the whole model: what one writes without a framework;
- ours: engine.train.Trainer with phase hf (configs/hf_qwen3_0.6b.yaml): our Triton attention and RMSNorm through
  transformers' extension points, the chunked linear cross-entropy, torch.compile per decoder layer.

--levers turns our switches on one at a time from the eager engine, each row in the same process;
--memory-mode adds ours in memory mode. Results are appended to bench/RESULTS.md.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench.phase7 import free_gpu, table
from bench.phase7 import measure as measure_step
from bench.results import record
from engine.optim import build_optimizer
from engine.train import Trainer, autocast_for, lr_at
from phases import load_config

CONFIG = "configs/hf_qwen3_0.6b.yaml"
QWEN3_0_6B = {  # Qwen/Qwen3-0.6B's config.json, the dims that decide speed
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
    "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
}
# Cumulative: each row keeps the switches of the rows above it and adds its own.
LEVERS = [
    ("engine, eager: transformers' SDPA and RMSNorm, full logits",
     ["use_compile=false", "attention=sdpa", "rms_norm=torch", "fused_cross_entropy=false"]),
    ("+ torch.compile per decoder layer", ["use_compile=true"]),
    ("+ Triton attention (AttentionInterface)", ["attention=triton"]),
    ("+ Triton RMSNorm (RMSNorm modules swapped)", ["rms_norm=triton"]),
    ("+ chunked linear cross-entropy", ["fused_cross_entropy=true"]),
]


def bench_overrides(args) -> list[str]:
    """The recipe at micro-batch B, fresh weights of args.model, dummy data, no accumulation or checkpointing."""
    return [f"model_name={args.model}", "init=scratch", "data=dummy", "device=cuda", f"batch_size={args.batch_size}",
            "gradient_accumulation_steps=1", "use_gradient_checkpointing=false", "memory_mode=false",
            "fast_dev_run=1", "warmup_steps=1", *args.overrides]


def measure(name, cfg, model, step, args) -> dict:
    return measure_step(name, cfg, model.flops_per_token(cfg.n_seq), len(model.layers), step, args)


def run_ours(args, switches=(), name="ours (phase hf)") -> dict:
    trainer = Trainer(load_config(CONFIG, bench_overrides(args) + list(switches)))

    def step():
        trainer.forward_backward()
        trainer.optimizer.apply()

    print(f"{name}: {trainer.model.describe()}", flush=True)
    return measure(name, trainer.cfg, trainer.model, step, args)


def run_plain(args, compiled: bool) -> dict:
    """The peer: transformers' forward with labels, backward, clip, fused AdamW step; nothing of ours but the
    optimizer wrapper, which is torch's fused AdamW with the same weight-decay groups."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from phases.hf.model import HFCausalLM

    cfg = load_config(CONFIG, bench_overrides(args))
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=torch.float32,
                                             attn_implementation="sdpa").to(device).train()
    optimizer = build_optimizer(model, cfg, device)
    forward = torch.compile(model) if compiled else model

    def step():
        ids = torch.randint(0, model.config.vocab_size, (cfg.batch_size, cfg.n_seq), device=device)
        optimizer.begin_step(lr_at(1, cfg), 1)
        with autocast_for(cfg, device):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.end_step()
        optimizer.apply()

    name = "plain loop + torch.compile" if compiled else "plain loop, eager"
    return measure(name, cfg, HFCausalLM(model, cfg, "sdpa", "torch", False), step, args)  # FLOPs counted as ours


def run_levers(args) -> list[dict]:
    rows, switches = [], []
    for name, lever in LEVERS:
        switches += lever
        rows.append(run_ours(args, switches, name))
        if len(rows) > 1:
            rows[-1]["gain"] = rows[-1]["tok_per_s"] / rows[-2]["tok_per_s"]
        print(table(rows[-1:]), flush=True)
        free_gpu()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a transformers model folder (default: Qwen3-0.6B's architecture)")
    parser.add_argument("--levers", action="store_true", help="our switches one at a time from the eager engine")
    parser.add_argument("--memory-mode", action="store_true", help="also ours in memory mode")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="config key=value overrides for ours and the peer")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and "device=cpu" not in args.overrides:
        print("error: bench-hf needs a CUDA GPU (CPU machines: make train-hf-test; ARGS=device=cpu runs the "
              "bench's code on the CPU, no numbers worth recording)", file=sys.stderr)
        return 1
    architecture = args.model is None
    with tempfile.TemporaryDirectory() as folder:
        if architecture:
            (Path(folder) / "config.json").write_text(json.dumps(QWEN3_0_6B))
            args.model = folder
        rows = run_levers(args) if args.levers else bench_rows(args)
        n_seq = load_config(CONFIG, bench_overrides(args)).n_seq
    print(table(rows))
    model = "Qwen3-0.6B's architecture" if architecture else args.model
    record("bench-hf", " ".join(["python -m bench.hf", *(sys.argv[1:] if argv is None else argv)]), table(rows),
           f"{model}, fresh weights, micro-batch {args.batch_size} x {n_seq} tokens, bf16 autocast, fp32 weights, "
           "fused AdamW")
    return 0


def bench_rows(args) -> list[dict]:
    """The plain loop eager and compiled, then ours (and ours in memory mode), each freed before the next."""
    runs = [("plain loop, eager", lambda: run_plain(args, compiled=False)),
            ("plain loop + torch.compile", lambda: run_plain(args, compiled=True)),
            ("ours (phase hf)", lambda: run_ours(args))]
    if args.memory_mode:
        runs.append(("ours, memory mode", lambda: run_ours(args, ["memory_mode=true"], "ours, memory mode")))
    rows = []
    for name, run in runs:
        try:
            rows.append(run())
            print(table(rows[-1:]), flush=True)
        except torch.cuda.OutOfMemoryError:
            print(f"{name}: out of GPU memory at micro-batch {args.batch_size}", file=sys.stderr)
        free_gpu()
    plain = next((r for r in rows if r["name"] == "plain loop + torch.compile"), None)
    for row in rows:
        if plain and row["name"].startswith("ours"):
            memory = "" if row["peak_gib"] is None else f", {row['peak_gib'] / plain['peak_gib']:.2f}x peak memory"
            print(f"{row['name']} / plain loop + torch.compile: {row['tok_per_s'] / plain['tok_per_s']:.2f}x tok/s"
                  f"{memory}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
