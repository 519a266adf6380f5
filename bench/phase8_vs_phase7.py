"""make bench-phase8-vs-phase7: how phase 8's linear attention and phase 7's softmax attention scale with length.

Three modes, each appending its table to bench/RESULTS.md:

- GPU (default with CUDA): one training step (forward, backward, AdamW) of each phase through the engine at
  S = 1k .. 32k, both from their GPU recipes (configs/phase7_1.5b_triton.yaml, configs/phase8_1.5b.yaml) in one
  process. Tokens per step are fixed (32k: batch = 32768 / S), so every row does the same work in the weights
  and only token mixing grows with S; at batch 1 the short rows would measure a half-empty GPU instead.
  Gradient checkpointing on (32k tokens of 1.5B activations do not fit otherwise), memory mode and
  torch.compile off (a compile per length would dominate; ARGS="use_compile=true" turns it on for both).
  Reported: tok/s, peak memory, OOM where a phase does not fit, and the crossover: the first S from which
  phase 8 is faster.
- --mixer (GPU): the token-mixing op alone at the issue's shape (batch 1, S = 32k, 16 heads of 128, bf16),
  forward + backward per 32k tokens per layer: our chunked Triton linear attention against SDPA's cuDNN and
  our FlashAttention; the goal is <= 5.5 ms (1/5 of cuDNN's 27.4 ms measured on an H100). Then time per token
  from 4k to 128k, which should be flat for linear attention and grow linearly for softmax attention.
- --cpu (automatic without CUDA): the mixing ops alone, forward + backward, at S = 256 .. 4096 on the CPU:
  phase 8's chunked PyTorch form (the CPU path) against SDPA and eager softmax attention, and the growth
  exponent p of time ~ S^p fitted over the three longest lengths (about 1 for linear, 2 for quadratic).
"""

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench.phase7 import free_gpu
from bench.results import record

RECIPES = {"phase7": "configs/phase7_1.5b_triton.yaml", "phase8": "configs/phase8_1.5b.yaml"}
GPU_SEQS = [1024, 2048, 4096, 8192, 16384, 32768]
CPU_SEQS = [256, 512, 1024, 2048, 4096]
GOAL_MS = 5.5  # per 32k tokens per layer, forward + backward: 1/5 of cuDNN's 27.4 ms on an H100
MIXER_SEQS = [4096, 8192, 16384, 32768, 65536, 131072]


# --- CPU: the mixing ops alone ---------------------------------------------------------------------------

def cpu_providers():
    """name -> fn(q, k, v, g) in the (batch, seq, heads, dim) layout; g is used by linear attention only."""
    from kernels.linear_attention_torch import linear_attention_chunked_torch
    from phases.phase7.model import attention

    return {"linear attention (chunked torch)": lambda q, k, v, g: linear_attention_chunked_torch(q, k, v, g),
            "softmax SDPA": lambda q, k, v, g: attention(q, k, v, True, "sdpa"),
            "softmax eager": lambda q, k, v, g: attention(q, k, v, True, "eager")}


def cpu_seconds(fn, seq, heads, head_dim, repeats) -> float:
    """Median seconds of forward + backward of fn at batch 1, after one warm-up call."""
    q, k, v, do = (torch.randn(1, seq, heads, head_dim) for _ in range(4))
    g = -F.softplus(torch.randn(1, seq, heads) - 4)
    leaves = [t.requires_grad_() for t in (q, k, v, g)]
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn(q, k, v, g).backward(do)
        times.append(time.perf_counter() - start)
        for leaf in leaves:
            leaf.grad = None
    return statistics.median(times[1:])


def growth_exponent(seqs, seconds) -> float:
    """Least-squares slope of log(seconds) against log(S)."""
    xs, ys = [math.log(s) for s in seqs], [math.log(t) for t in seconds]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run_cpu(args) -> str:
    seqs = args.seqs or CPU_SEQS
    results = {}
    for name, fn in cpu_providers().items():
        results[name] = [cpu_seconds(fn, s, args.heads, args.head_dim, args.repeats) for s in seqs]
        print(f"  {name}: " + ", ".join(f"S={s} {t * 1e3:.1f} ms" for s, t in zip(seqs, results[name])),
              file=sys.stderr, flush=True)
    fit_from = max(0, len(seqs) - 3)
    lines = ["| op, forward + backward | " + " | ".join(f"S={s}" for s in seqs) + f" | p (S >= {seqs[fit_from]}) |",
             "|---|" + "---|" * (len(seqs) + 1)]
    for name, seconds in results.items():
        per_token = " | ".join(f"{t * 1e3:.1f} ms ({t / s * 1e6:.1f} us/tok)" for s, t in zip(seqs, seconds))
        p = growth_exponent(seqs[fit_from:], seconds[fit_from:]) if len(seqs) - fit_from >= 2 else float("nan")
        lines.append(f"| {name} | {per_token} | {p:.2f} |")
    linear, sdpa = results["linear attention (chunked torch)"], results["softmax SDPA"]
    faster = next((s for s, a, b in zip(seqs, linear, sdpa) if a < b), None)
    summary = (f"Batch 1, {args.heads} heads of {args.head_dim}, float32, {torch.get_num_threads()} thread(s), "
               f"median of {args.repeats}. "
               f"p: the exponent of time ~ S^p fitted over the longest {len(seqs) - fit_from} lengths. "
               + (f"The chunked linear form is faster than SDPA from S={faster}." if faster else
                  "The chunked linear form is not faster than SDPA at any measured length."))
    return "\n".join(lines) + "\n\n" + summary


# --- GPU: training steps of both phases ----------------------------------------------------------------

def step_overrides(seq: int, tokens: int, extra: list[str]) -> list[str]:
    """Both recipes at n_seq = seq and `tokens` per step in one micro-batch, on dummy data, saving nothing."""
    return [f"n_seq={seq}", f"batch_size={max(1, tokens // seq)}", "gradient_accumulation_steps=1",
            "micro_batch_size=", "memory_mode=false", "use_gradient_checkpointing=true", "use_compile=false",
            "data=dummy", "device=cuda", "fast_dev_run=1", "warmup_steps=1", *extra]


def time_training_step(phase: str, seq: int, args) -> dict:
    """tok/s and peak GiB of one optimizer step; {'oom': True} when it does not fit."""
    from engine.train import Trainer
    from phases import load_config

    trainer = None
    torch.cuda.reset_peak_memory_stats()
    try:
        trainer = Trainer(load_config(RECIPES[phase], step_overrides(seq, args.tokens, args.overrides)))

        def step():
            trainer.forward_backward()
            trainer.optimizer.apply()

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        return {"tok_per_s": trainer.cfg.tokens_per_step() / seconds,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "describe": trainer.model.describe()}
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    finally:
        trainer = None  # `step` holds it too: dropping it here frees the model before free_gpu()
        free_gpu()


def crossover(seqs, rows) -> int | None:
    """The first S from which phase 8 is faster at every longer length (phase 7 out of memory counts as slower)."""
    def phase8_faster(seq):
        a, b = rows[("phase8", seq)], rows[("phase7", seq)]
        return not a.get("oom") and (b.get("oom") or a["tok_per_s"] > b["tok_per_s"])
    for i, seq in enumerate(seqs):
        if all(phase8_faster(s) for s in seqs[i:]):
            return seq
    return None


def run_training_steps(args) -> str:
    seqs = args.seqs or GPU_SEQS
    rows = {}
    for seq in seqs:
        for phase in RECIPES:
            rows[(phase, seq)] = time_training_step(phase, seq, args)
            r = rows[(phase, seq)]
            print(f"  {phase} S={seq}: " + ("OOM" if r.get("oom") else
                                            f"{r['tok_per_s']:,.0f} tok/s, {r['peak_gib']:.1f} GiB"),
                  file=sys.stderr, flush=True)

    def cell(r, key, fmt):
        return "OOM" if r.get("oom") else format(r[key], fmt)

    lines = ["| S | batch | phase 7 tok/s | phase 8 tok/s | phase 8 / phase 7 | phase 7 peak GiB | phase 8 peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for seq in seqs:
        a, b = rows[("phase7", seq)], rows[("phase8", seq)]
        ratio = "-" if a.get("oom") or b.get("oom") else f"{b['tok_per_s'] / a['tok_per_s']:.2f}x"
        lines.append(f"| {seq} | {max(1, args.tokens // seq)} | {cell(a, 'tok_per_s', ',.0f')} | "
                     f"{cell(b, 'tok_per_s', ',.0f')} | {ratio} | {cell(a, 'peak_gib', '.1f')} | "
                     f"{cell(b, 'peak_gib', '.1f')} |")
    cross = crossover(seqs, rows)
    described = {p: next((r["describe"] for (q, _), r in rows.items() if q == p and "describe" in r), "?")
                 for p in RECIPES}
    summary = (f"Crossover: phase 8 is faster from S={cross} on." if cross else
               "Crossover: phase 8 is not faster at any measured length.") + \
        f" phase 7: {described['phase7']}; phase 8: {described['phase8']}."
    print(summary)
    return "\n".join(lines) + "\n\n" + summary


# --- GPU: the mixing op alone -----------------------------------------------------------------------------

def run_mixer(args) -> str:
    from bench.bench_kernels import attention_peers, milliseconds
    from kernels.linear_attention import linear_attention

    heads, head_dim = 16, 128

    def case(seq):
        q, k, v, do = (torch.randn(1, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        g = -F.softplus(torch.randn(1, seq, heads, device="cuda") - 4)
        return q, k, v, g, do

    softmax = attention_peers()
    providers = {"ours linear attention (Triton)": lambda q, k, v, g: linear_attention(q, k, v, g),
                 "SDPA cuDNN (softmax)": lambda q, k, v, g: softmax["SDPA cuDNN"](q, k, v, True),
                 "ours FlashAttention (softmax)": lambda q, k, v, g: softmax["ours"](q, k, v, True)}
    seqs = args.seqs or MIXER_SEQS
    times = {name: [] for name in providers}
    for seq in seqs:
        q, k, v, g, do = case(seq)
        leaves = [t.requires_grad_() for t in (q, k, v, g)]
        for name, fn in providers.items():
            times[name].append(milliseconds(lambda fn=fn: fn(q, k, v, g).backward(do), leaves))
        print(f"  S={seq}: " + ", ".join(f"{n} {t[-1]:.2f} ms" if t[-1] else f"{n} n/a" for n, t in times.items()),
              file=sys.stderr, flush=True)
        q = k = v = g = do = leaves = None  # the lambdas above hold them too: drop them before free_gpu()
        free_gpu()

    def per_32k(ms, seq):
        return f"{ms * 32768 / seq:.2f}" if ms else "n/a"

    lines = ["| op (fwd+bwd, batch 1, 16 x 128, bf16) | " + " | ".join(f"S={s}" for s in seqs) + " |",
             "|---|" + "---|" * len(seqs)]
    for name, ms in times.items():
        lines.append(f"| {name}: ms per 32k tokens | " + " | ".join(per_32k(t, s) for t, s in zip(ms, seqs)) + " |")
    ours = times["ours linear attention (Triton)"]
    summary = []
    if 32768 in seqs and ours[seqs.index(32768)]:
        at_32k = ours[seqs.index(32768)]
        summary.append(f"At S=32k ours takes {at_32k:.2f} ms per 32k tokens per layer: "
                       f"{'meets' if at_32k <= GOAL_MS else 'misses'} the {GOAL_MS} ms goal.")
    per_token = [t / s for t, s in zip(ours, seqs) if t]
    if len(per_token) > 1:
        summary.append(f"Our time per token varies {max(per_token) / min(per_token):.2f}x over "
                       f"S={seqs[0]}..{seqs[-1]} (1.00x is flat).")
    print(" ".join(summary))
    return "\n".join(lines) + "\n\n" + " ".join(summary)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the mixing ops alone on the CPU (the default without CUDA)")
    parser.add_argument("--mixer", action="store_true", help="GPU: the mixing op alone at 32k, and 4k..128k")
    parser.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated lengths")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per training step (GPU steps mode)")
    parser.add_argument("--heads", type=int, default=4, help="CPU mode: heads")
    parser.add_argument("--head-dim", type=int, default=64, help="CPU mode: head size")
    parser.add_argument("--repeats", type=int, default=3, help="CPU mode: timed calls per length")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides for both phases (GPU steps mode)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m bench.phase8_vs_phase7", *argv])
    if args.mixer:
        if not torch.cuda.is_available():
            print("error: --mixer needs a CUDA GPU (without one, the default mode measures on the CPU)",
                  file=sys.stderr)
            return 1
        markdown, name = run_mixer(args), "bench-phase8-vs-phase7 MIXER=1"
    elif args.cpu or not torch.cuda.is_available():
        markdown, name = run_cpu(args), "bench-phase8-vs-phase7 (CPU, mixing ops alone)"
    else:
        markdown, name = run_training_steps(args), "bench-phase8-vs-phase7"
    print(markdown)
    if not args.no_record:
        record(name, command, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
