"""make bench-phase7-1.5b: training throughput of phase 7 at 1.44B on this GPU, optionally against a peer.

Times optimizer steps of the real engine (engine.train.Trainer on dummy data) after warm-up and reports
tok/s, MFU, peak memory, and the deepest model of this width that fits. With --peer, transformers'
LlamaForCausalLM with the same dims (bf16 autocast, fused AdamW, SDPA, torch.compile) runs in the same
process, so the ratio is meaningful. --mem-gb caps the process's GPU memory and runs ours in memory mode
(bf16 weights, 8-bit AdamW inside backward, checkpointing) and shows memory mode's estimated peak beside the
measured one. --levers starts from plain eager PyTorch and turns
our optimisations on one at a time, each row timed in the same process. --fsdp times ours as one process and
then under FSDP2 at world size 1 (torchrun's environment for one rank, set in this process): what sharding
costs where it shards nothing, the floor of multi-GPU overhead. Results are appended to bench/RESULTS.md.
"""

import argparse
import gc
import os
import socket
import sys
import time

import torch

from bench.results import record
from engine.distributed import shutdown
from engine.memory_mode.estimate import estimate_for_model
from engine.optim import build_optimizer
from engine.train import Trainer, autocast_for, lr_at, peak_flops
from phases import load_config
from phases.phase7.model import dense_flops_per_token

CONFIG = "configs/phase7_1.5b_triton.yaml"
# Cumulative: each row keeps the switches of the rows above it and adds its own.
LEVERS = [
    ("eager: SDPA, PyTorch RMSNorm, full logits", ["use_compile=false", "attention=sdpa", "rms_norm=torch",
                                                   "fused_cross_entropy=false", "fused_projections=false"]),
    ("+ torch.compile per block", ["use_compile=true"]),
    ("+ Triton attention", ["attention=triton"]),
    ("+ Triton RMSNorm with the residual add", ["rms_norm=triton"]),
    ("+ chunked linear cross-entropy", ["fused_cross_entropy=true"]),
    ("+ fused q/k/v and gate/up matmuls", ["fused_projections=true"]),
]


def bench_overrides(args) -> list[str]:
    """The 1.5B recipe at micro-batch B without accumulation. Speed (the default): no checkpointing and no
    memory mode, the peer's settings. With --mem-gb: memory mode with checkpointing, the small-card recipe."""
    memory = ["memory_mode=true", "use_gradient_checkpointing=true"] if args.mem_gb else \
        ["memory_mode=false", "use_gradient_checkpointing=false"]
    return [f"batch_size={args.batch_size}", "gradient_accumulation_steps=1", *memory,
            "data=dummy", "device=cuda", "fast_dev_run=1", "warmup_steps=1", *args.overrides]


def synchronize() -> None:
    """Wait for the GPU's queued work before reading the clock; on a CPU the work is done when step() returns
    (a bench's code can be tried there with device=cpu)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, warmup: int, steps: int) -> float:
    """Seconds per call of step() after warm-up (compilation happens in warm-up)."""
    for _ in range(warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - start) / steps


def fastest_seconds_per_step(trainers: dict, rounds: int, steps_per_round: int) -> dict:
    """Seconds per optimizer step of each of {name: Trainer}: the fastest of `rounds` rounds of `steps_per_round`
    steps, the trainers interleaved, so that a machine busy with other work slows them alike (the CPU benches)."""
    for trainer in trainers.values():
        trainer.model.train()
    best = {name: float("inf") for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                trainer.forward_backward()
                trainer.optimizer.apply()
            best[name] = min(best[name], (time.perf_counter() - start) / steps_per_round)
    return best


def run_ours(args, n_layers=None, switches=(), name=None) -> dict:
    overrides = bench_overrides(args) + list(switches) + ([f"n_layers={n_layers}"] if n_layers else [])
    trainer = Trainer(load_config(CONFIG, overrides))

    def step():
        trainer.forward_backward()
        trainer.optimizer.apply()

    name = name or ("ours (phase7, memory mode)" if trainer.cfg.memory_mode else "ours (phase7)")
    row = measure(name, trainer.cfg, trainer.model.flops_per_token(trainer.cfg.n_seq), trainer.cfg.n_layers, step,
                  args)
    if trainer.cfg.memory_mode:  # what engine/memory_mode/estimate.py predicted, beside the measured peak
        row["estimate_gib"] = estimate_for_model(trainer.model, trainer.cfg)["total"] / 2**30
    return row


def run_levers(args) -> list[dict]:
    rows, switches = [], []
    for name, lever in LEVERS:
        switches += lever
        rows.append(run_ours(args, switches=switches, name=name))
        if len(rows) > 1:
            rows[-1]["gain"] = rows[-1]["tok_per_s"] / rows[-2]["tok_per_s"]
        print(table(rows[-1:]), flush=True)
        free_gpu()
    return rows


def run_fsdp(args) -> dict:
    """Ours with the engine's FSDP2 path (sharded model, DCP-ready optimizer) on this one GPU, in this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return run_ours(args, name="ours (phase7), FSDP2 at world size 1")


def run_fsdp_overhead(args) -> int:
    rows = [run_ours(args)]
    free_gpu()
    rows.append(run_fsdp(args))
    rows[1]["gain"] = rows[1]["tok_per_s"] / rows[0]["tok_per_s"]
    print(table(rows))
    overhead = 1 - rows[1]["gain"]
    print(f"FSDP2 at world size 1: {overhead:+.1%} tok/s overhead (goal: <= 3%)")
    notes = (f"micro-batch {args.batch_size} x 1024 tokens, no accumulation; FSDP overhead at world size 1: "
             f"{overhead:+.1%} of tok/s (goal <= 3%)")
    record("bench-fsdp", " ".join(["python -m bench.phase7", *sys.argv[1:]]), table(rows), notes)
    shutdown()
    return 0


def free_gpu() -> None:
    """Drop compiled graphs and cached blocks between runs, so each starts from the same free memory."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def run_peer(args) -> dict:
    from transformers import LlamaForCausalLM

    from phases.phase7.config import model_args
    from phases.phase7.export import llama_config

    cfg = load_config(CONFIG, bench_overrides(args) + ["memory_mode=false"])  # the peer: plain fused AdamW
    hf_cfg = llama_config(model_args(cfg))
    hf_cfg._attn_implementation = "sdpa"
    device = torch.device("cuda")
    model = LlamaForCausalLM(hf_cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    compiled = torch.compile(model)
    non_embedding = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    flops = dense_flops_per_token(non_embedding, cfg.n_layers, cfg.d_model, cfg.n_seq)

    def step():
        ids = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.n_seq), device=device)
        optimizer.begin_step(lr_at(1, cfg), 1)
        with autocast_for(cfg, device):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.end_step()  # clips, as our loop does
        optimizer.apply()

    return measure("HF Llama + torch.compile", cfg, flops, cfg.n_layers, step, args)


def measure(name, cfg, flops_per_token, n_layers, step, args) -> dict:
    """tok/s, MFU and peak GPU memory of step() after warm-up (compilation happens in warm-up); on a CPU
    (device=cpu) MFU and memory are None."""
    gpu = cfg.device == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(step, args.warmup, args.steps)
    tok_per_s = cfg.batch_size * cfg.n_seq / seconds
    peak = peak_flops(torch.device("cuda")) if gpu else None
    return {"name": name, "tok_per_s": tok_per_s, "mfu": tok_per_s * flops_per_token / peak if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None, "n_layers": n_layers}


def deepest_that_fits(args) -> int:
    """Binary search on n_layers at this width; an OOM means too deep."""
    low, high = 0, 4 * 24
    while low < high:
        mid = (low + high + 1) // 2
        try:
            run_ours(argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1}), n_layers=mid)
            low = mid
        except torch.cuda.OutOfMemoryError:
            high = mid - 1
        free_gpu()
    return low


def table(rows: list[dict]) -> str:
    """Markdown rows; a `gain` column (tok/s over the row above) when any row has one, and an `estimated GiB`
    one (memory mode's estimated peak) when any row has that."""
    gains, estimates = any("gain" in r for r in rows), any("estimate_gib" in r for r in rows)
    lines = ["| run | layers | tok/s | MFU | peak GiB |" + (" estimated GiB |" if estimates else "")
             + (" gain |" if gains else ""),
             "|---|---|---|---|---|" + ("---|" if estimates else "") + ("---|" if gains else "")]
    for r in rows:
        mfu = f"{r['mfu']:.3f}" if r["mfu"] else "-"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        estimate = (f" {r['estimate_gib']:.2f} |" if "estimate_gib" in r else " - |") if estimates else ""
        gain = (f" {r['gain']:.3f}x |" if "gain" in r else " - |") if gains else ""
        lines.append(f"| {r['name']} | {r['n_layers']} | {r['tok_per_s']:,.0f} | {mfu} | {peak} |{estimate}{gain}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", action="store_true", help="also time HF Llama + torch.compile")
    parser.add_argument("--mem-gb", type=float, help="cap this process to this many GiB of GPU memory")
    parser.add_argument("--levers", action="store_true", help="turn our optimisations on one at a time")
    parser.add_argument("--fsdp", action="store_true", help="ours as one process vs under FSDP2 at world size 1")
    parser.add_argument("--batch-size", type=int, help="micro-batch (default 8; 4 with --mem-gb)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-depth-search", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides for our model")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench-phase7-1.5b needs a CUDA GPU (CPU machines: make train-phase7-test)", file=sys.stderr)
        return 1
    args.batch_size = args.batch_size or (4 if args.mem_gb else 8)
    if args.mem_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_gb * 2**30 / total))
    if args.fsdp:
        return run_fsdp_overhead(args)
    if args.levers:
        rows = run_levers(args)
        print(table(rows))
        record_rows(rows, None, args)
        return 0
    rows = [run_ours(args)]
    if args.peer:
        free_gpu()
        try:
            rows.append(run_peer(args))
        except torch.cuda.OutOfMemoryError:
            print(f"the peer does not fit in {args.mem_gb} GiB at micro-batch {args.batch_size}", file=sys.stderr)
    print(table(rows))
    if len(rows) == 2:
        print(f"ours / peer: {rows[0]['tok_per_s'] / rows[1]['tok_per_s']:.2f}x")
    depth = None if args.no_depth_search else deepest_that_fits(args)
    if depth is not None:
        print(f"deepest phase 7 at d_model 2048 that fits{f' in {args.mem_gb} GiB' if args.mem_gb else ''}: "
              f"{depth} layers")
    record_rows(rows, depth, args)
    return 0


def record_rows(rows, depth, args) -> None:
    notes = (f"micro-batch {args.batch_size} x 1024 tokens{f', capped at {args.mem_gb} GiB' if args.mem_gb else ''}"
             + (f"; deepest model at d_model 2048 that fits: {depth} layers" if depth is not None else ""))
    record("bench-phase7-1.5b", " ".join(["python -m bench.phase7", *sys.argv[1:]]), table(rows), notes)


if __name__ == "__main__":
    sys.exit(main())
