"""make bench-adam8bit: which 8-bit AdamW memory mode should use, measured against bitsandbytes and torchao.

Every run is the engine's Trainer on the same config: same initial weights, same batches, same schedule,
clipping and weight decay; only the weights' dtype and the optimizer differ.

    fp32 AdamW             fp32 weights, torch's AdamW: the reference curve (bf16 autocast on CUDA)
    ours (memory mode)     bf16 weights, engine/memory_mode/: 8-bit states, update inside backward,
                           stochastic rounding into bf16
    bitsandbytes           bf16 weights, bitsandbytes.optim.AdamW8bit stepping after backward
    torchao                bf16 weights, torchao.optim.AdamW8bit with bf16_stochastic_round=True

Reported: the mean training loss over the last quarter of the logged steps and the final val loss, each
relative to the reference, and on CUDA tok/s and peak GiB. A peer that is not installed is named, not run
(pip install bitsandbytes torchao). The table is appended to bench/RESULTS.md.
"""

import argparse
import importlib.metadata
import sys

import torch

from bench.phase7 import free_gpu
from bench.results import record
from engine.cli import run_cli
from engine.memory_mode.optimizer import prepare_model_for_memory_mode
from engine.optim import AfterBackward, decay_groups
from engine.train import Trainer
from phases import load_config

CONFIG = "configs/phase7_test.yaml"


class TensorLrAfterBackward(AfterBackward):
    """torchao's optimizers keep each group's lr as a tensor, to be filled in place."""

    def begin_step(self, lr: float, micro_steps: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)


def bitsandbytes_adamw(groups, cfg):
    import bitsandbytes

    optimizer = bitsandbytes.optim.AdamW8bit(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    return AfterBackward(optimizer, cfg.grad_clip)


def torchao_adamw(groups, cfg):
    from torchao.optim import AdamW8bit

    optimizer = AdamW8bit(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), bf16_stochastic_round=True)
    return (TensorLrAfterBackward if isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
            else AfterBackward)(optimizer, cfg.grad_clip)


# name -> (config overrides, optimizer factory for bf16 weights or None for the engine's own choice)
RUNS = {
    "fp32 AdamW (reference)": (["memory_mode=false"], None),
    "ours (memory mode)": (["memory_mode=true"], None),
    "bitsandbytes AdamW8bit": (["memory_mode=false"], bitsandbytes_adamw),
    "torchao AdamW8bit + SR": (["memory_mode=false"], torchao_adamw),
}


def run(name, args) -> dict:
    overrides, make_optimizer = RUNS[name]
    cfg = load_config(args.config, [f"fast_dev_run={args.steps}", f"max_steps={args.steps}",
                                    f"eval_every={args.steps}", *overrides, *args.overrides])
    trainer = Trainer(cfg)
    if make_optimizer is not None:
        try:
            bf16_model = prepare_model_for_memory_mode(trainer.model)
            trainer.optimizer = make_optimizer(decay_groups(bf16_model, cfg.weight_decay), cfg)
        except ImportError as e:
            print(f"{name}: not installed ({e.name}); skipped", file=sys.stderr)
            return {"name": name, "missing": e.name}
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    log = trainer.log
    tail = log[-max(1, len(log) // 4):]
    result = {"name": name, "train_loss": sum(r["loss"] for r in tail) / len(tail), "val_loss": log[-1]["val_loss"],
              "tok_per_s": sum(r["tok_per_s"] for r in tail) / len(tail)}
    if trainer.device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer
    if torch.cuda.is_available():
        free_gpu()
    return result


def table(rows: list[dict]) -> str:
    reference = rows[0]
    lines = ["| optimizer | train loss (last quarter) | vs fp32 | val loss | vs fp32 | tok/s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['name']} | not installed ({r['missing']}) | | | | | |")
            continue
        rel = {k: f"{100 * (r[k] / reference[k] - 1):+.2f}%" for k in ("train_loss", "val_loss")}
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        lines.append(f"| {r['name']} | {r['train_loss']:.4f} | {rel['train_loss']} | {r['val_loss']:.4f} | "
                     f"{rel['val_loss']} | {r['tok_per_s']:,.0f} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.adam8bit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-record", action="store_true", help="print the table only")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides for every run")
    args = parser.parse_args(argv)
    rows = [run(name, args) for name in RUNS]
    markdown = table(rows)
    print(markdown)
    if not args.no_record:
        record("bench-adam8bit", " ".join(["python -m bench.adam8bit", *argv]), markdown,
               f"{args.steps} steps of {args.config}", tuple(peer_versions()))


def peer_versions() -> list[str]:
    found = []
    for package in ("bitsandbytes", "torchao"):
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
