"""python -m bench.hyperbolic_attention: is hyperbolic attention (and its curvature schedule) worth using? Measured
against euclidean attention.

Every run is the engine's Trainer on the same config (default configs/phase7_test.yaml on data-lite) for the same
steps, batches and learning-rate schedule, per seed; only attention_geometry and the curvature keys differ. Runs
go to RUNS/<variant>_s<seed> with resume=auto, so an interrupted bench (or runs started by hand with the same
overrides, one variant per process) picks up where it stopped, and a finished run is only read. Reported per
variant: the val loss per seed at the last step, the mean, its difference from euclidean, and the CPU or GPU time
per optimizer step, from a separate pass that times steps of all variants in interleaved rounds and keeps each
one's fastest, so load from other processes on a shared machine hits them alike. Appended to bench/RESULTS.md.
"""

import argparse
import sys

import torch

from bench.phase7 import fastest_seconds_per_step
from bench.results import record
from engine.cli import run_cli
from engine.train import Trainer
from phases import load_config

CONFIG = "configs/phase7_test.yaml"
HYPERBOLIC = ["attention_geometry=hyperbolic"]
WARMUP = ["curvature_start=0.1", "curvature=1.0", "curvature_warmup_steps=100"]
# key (for --variants, and the run folder's name) -> (name in the table, config overrides); euclid is the reference
VARIANTS = {
    "euclid": ("euclidean", []),
    "hconst": ("hyperbolic, c = 1", HYPERBOLIC),
    "hlinear": ("hyperbolic, c linear 0.1 -> 1 over 100 steps", [*HYPERBOLIC, "curvature_schedule=linear", *WARMUP]),
    "hcosine": ("hyperbolic, c cosine 0.1 -> 1 over 100 steps", [*HYPERBOLIC, "curvature_schedule=cosine", *WARMUP]),
    "hlearned": ("hyperbolic, c = 1 x learned per head", [*HYPERBOLIC, "curvature_learned=true"]),
}


def train_variant(key: str, seed: int, args) -> float:
    """The val loss at the last step of one variant and seed (trained, resumed or only read)."""
    cfg = load_config(args.config, [f"max_steps={args.steps}", f"seed={seed}", f"out_dir={args.runs}/{key}_s{seed}",
                                    "resume=auto", f"save_every={args.steps}", *args.overrides, *VARIANTS[key][1]])
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer.log[-1]["val_loss"]


def time_variants(args) -> dict[str, float]:
    """Seconds per optimizer step: the fastest of `rounds` rounds of `steps_per_round` steps, variants interleaved."""
    trainers = {key: Trainer(load_config(args.config, ["fast_dev_run=1", *args.overrides, *VARIANTS[key][1]]))
                for key in args.variants}
    return fastest_seconds_per_step(trainers, args.rounds, args.steps_per_round)


def table(val_losses: dict[str, list[float]], seconds: dict[str, float], seeds: list[int]) -> str:
    mean = {key: sum(losses) / len(losses) for key, losses in val_losses.items()}
    reference = next(iter(val_losses))
    lines = [f"| variant | {' | '.join(f'val loss seed {s}' for s in seeds)} | mean | vs euclidean | s/step | "
             "vs euclidean |", "|---|" + "---|" * (len(seeds) + 4)]
    for key, losses in val_losses.items():
        lines.append(f"| {VARIANTS[key][0]} | {' | '.join(f'{v:.4f}' for v in losses)} | {mean[key]:.4f} | "
                     f"{mean[key] - mean[reference]:+.4f} | {seconds[key]:.3f} | "
                     f"{seconds[key] / seconds[reference]:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hyperbolic_attention", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="1337,1", help="comma-separated")
    parser.add_argument("--runs", default="checkpoints/bench_hyperbolic", help="the runs' folder")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (each variant once per round)")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--variants", default="euclid,hconst,hlinear,hcosine",
                        help=f"comma-separated, euclid first (the reference): {', '.join(VARIANTS)}")
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides for every run")
    args = parser.parse_args(argv)
    args.variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    if args.variants[0] != "euclid" or not set(args.variants) <= set(VARIANTS):
        parser.error(f"--variants: euclid first, then any of {', '.join(VARIANTS)}; got {','.join(args.variants)}")
    val_losses = {key: [train_variant(key, seed, args) for seed in seeds] for key in args.variants}
    measured = table(val_losses, time_variants(args), seeds)
    print(measured)
    if not args.no_record:
        device = "GPU" if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} torch thread(s)"
        record("bench-hyperbolic-attention", " ".join(["python -m bench.hyperbolic_attention", *argv]), measured,
               f"{args.steps} steps of {args.config} per variant and seed; s/step on {device}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
