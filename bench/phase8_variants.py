"""make bench-phase8-variants: which phase 8 variant to default to, by val loss at equal steps against phase 7.

Each variant trains through the engine (engine.train.Trainer, in this process, saving nothing) from
configs/phase8_test.yaml, phase 7 from configs/phase7_test.yaml: the same sizes (d 128, 4 layers, 4 heads,
SwiGLU 384), data-lite, n_seq 128, 16 sequences per step, the same schedule and seeds. Reported per variant:
the final val loss per seed and their mean, parameters (without the input embedding), and CPU tok/s (the median
over log windows; on a CPU, and at n_seq 128, it says nothing about a GPU at long sequences: see
bench/phase8_vs_phase7.py). The table and the lowest-loss phase 8 variant are appended to bench/RESULTS.md.
"""

import argparse
import statistics
import sys
import time

import torch

from bench.results import record
from engine.train import Trainer
from phases import load_config

PHASE7 = "configs/phase7_test.yaml"
PHASE8 = "configs/phase8_test.yaml"
# (name, config, overrides); the phase 8 rows all start from the recipe's keys and set every variant key
VARIANTS = [
    ("phase 7 (softmax attention in every block)", PHASE7, []),
    ("phase 8 pure, no conv", PHASE8, ["hybrid_every=0", "sliding_window=0", "short_conv=0"]),
    ("phase 8 pure", PHASE8, ["hybrid_every=0", "sliding_window=0", "short_conv=4"]),
    ("phase 8 hybrid_every=4", PHASE8, ["hybrid_every=4", "sliding_window=0", "short_conv=4"]),
    ("phase 8 hybrid_every=2", PHASE8, ["hybrid_every=2", "sliding_window=0", "short_conv=4"]),
    ("phase 8 hybrid_every=2, sliding_window=32", PHASE8, ["hybrid_every=2", "sliding_window=32", "short_conv=4"]),
]


def train(config: str, overrides: list[str], seed: int, steps: int | None) -> dict:
    extra = [f"seed={seed}", "device=cpu"] + ([f"max_steps={steps}"] if steps else [])
    cfg = load_config(config, overrides + extra)
    trainer = Trainer(load_config(config, overrides + extra + [f"fast_dev_run={cfg.max_steps}"]))
    start = time.perf_counter()
    trainer.fit()
    val = [r["val_loss"] for r in trainer.log if "val_loss" in r]
    return {"val_loss": val[-1], "params": trainer.model.num_params(), "seconds": time.perf_counter() - start,
            "tok_per_s": statistics.median(r["tok_per_s"] for r in trainer.log)}


def table(rows: list[dict], seeds: list[int]) -> str:
    lines = ["| variant | params (non-emb.) | " + " | ".join(f"val loss seed {s}" for s in seeds)
             + " | mean val loss | vs phase 7 | CPU tok/s |", "|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    base = next((r["mean"] for r in rows if r["name"] == VARIANTS[0][0]), None)
    for r in rows:
        losses = " | ".join(f"{v:.4f}" for v in r["val_losses"])
        delta = f"{r['mean'] - base:+.4f}" if base is not None else "-"
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {losses} | {r['mean']:.4f} | {delta} | "
                     f"{r['tok_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1337,1", help="comma-separated seeds, each variant trains once per seed")
    parser.add_argument("--steps", type=int, help="max_steps for every run (default: the recipes' 300)")
    parser.add_argument("--only", help="comma-separated variant indices to run (default: all)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [VARIANTS[int(i)] for i in args.only.split(",")] if args.only else VARIANTS
    rows = []
    for name, config, overrides in chosen:
        runs = [train(config, overrides, seed, args.steps) for seed in seeds]
        rows.append({"name": name, "val_losses": [r["val_loss"] for r in runs], "params": runs[0]["params"],
                     "mean": statistics.mean(r["val_loss"] for r in runs),
                     "tok_per_s": statistics.median(r["tok_per_s"] for r in runs)})
        print(f"--- {name}: {rows[-1]['mean']:.4f}", flush=True)
    markdown = table(rows, seeds)
    best = min((r for r in rows if r["name"].startswith("phase 8")), key=lambda r: r["mean"], default=None)
    pick = f"Lowest mean val loss among phase 8 variants: **{best['name']}**." if best else ""
    print(markdown + "\n" + pick)
    if not args.no_record:
        steps = args.steps or load_config(PHASE8).max_steps
        record("bench-phase8-variants", " ".join(["python -m bench.phase8_variants", *argv]), markdown + "\n\n" + pick,
               f"{steps} steps x 16 x 128 tokens of data-lite per run, phase7_test sizes, "
               f"{torch.get_num_threads()} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
