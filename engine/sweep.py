"""Grid search: python -m engine.sweep CONFIG GRID... [--out DIR] [key=value ...]

Every key=value argument is an axis and commas separate its values, so
`learning_rate=1e-4,2e-4,5e-4 batch_size=128,256` is 6 points and `max_steps=500` is a plain override.
Each point trains in-process with the one engine (engine.train.Trainer) in OUT/<point>/ (default
checkpoints/sweep_<config stem>); OUT/summary.md and OUT/summary.csv list the grid values and final val loss
of every point and are rewritten after each point. Every point's config is checked before the first one
trains, so a typo fails at once, not after hours. A point whose folder already holds a finished run of the
same config is read back, not trained again, so an interrupted sweep continues where it stopped.
"""

import argparse
import csv
import itertools
import json
import sys
from pathlib import Path

import torch
import yaml

from engine.checkpoint import is_distributed_checkpoint
from engine.cli import run_cli
from engine.config import Config, ConfigError
from engine.train import Trainer, TrainingError
from phases import get_phase, load_config


def parse_grid(args: list[str]) -> dict[str, list[str]]:
    """{key: [value text, ...]}. Keys and values are checked when each point's config is loaded, against its
    phase's keys, before anything trains."""
    axes = {}
    for arg in args:
        key, sep, values = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected key=value[,value...], got '{arg}'")
        axes[key] = values.split(",")
    return axes


def grid_points(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cartesian product of the axes, in the order given."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def point_name(point: dict[str, str], varying: list[str]) -> str:
    """A folder name from the values that change across the grid, e.g. learning_rate-1e-4_batch_size-128."""
    name = "_".join(f"{key}-{point[key]}" for key in varying).replace("/", "-")
    return name or "default"


def finished(cfg: Config) -> bool:
    """Whether cfg.out_dir holds a completed run of this config (the engine derives max_steps from a budget)."""
    folder = Path(cfg.out_dir)
    final = (folder / f"{cfg.phase}_final.pt").is_file() or is_distributed_checkpoint(folder / f"{cfg.phase}_final")
    if not final or not (folder / "config.yaml").is_file():
        return False
    resolve = get_phase(cfg.phase).resolve_config
    if resolve is not None:  # the run saved the values its phase filled in (phase hf: the model's vocab_size)
        resolve(cfg)
    saved, wanted = yaml.safe_load((folder / "config.yaml").read_text()), cfg.to_dict()
    ignored = {"max_steps", "resume"} if cfg.flops_budget > 0 else {"resume"}
    return all(saved.get(key) == value for key, value in wanted.items() if key not in ignored)


def train_run(cfg: Config) -> dict:
    """Train one run in-process, or read back a finished one; its final step, tokens and val loss.

    A run that diverges or runs out of GPU memory is reported in `status` rather than stopping the sweep.
    """
    if not finished(cfg):
        try:
            Trainer(cfg).fit()
        except (TrainingError, torch.cuda.OutOfMemoryError) as e:
            return {"status": f"failed: {str(e).splitlines()[0]}"}
        finally:
            torch.compiler.reset()  # each run compiles a new module; do not let them share a cache
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if cfg.fast_dev_run:
        return {"status": "fast_dev_run: ran, saved nothing"}
    last = json.loads((Path(cfg.out_dir) / "training_log.json").read_text())[-1]
    return {"steps": last["step"], "tokens": last["tokens"], "val_loss": last["val_loss"], "status": "ok"}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:.5g}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_summary(out: Path, config: str, rows: list[dict], varying: list[str]) -> None:
    columns = ["point", *varying, "steps", "tokens", "val_loss", "status"]
    write_csv(out / "summary.csv", rows, columns)
    done = [r for r in rows if "val_loss" in r]
    best = f"\nBest: **{min(done, key=lambda r: r['val_loss'])['point']}**\n" if done else ""
    (out / "summary.md").write_text(f"# Sweep of {config}: final val loss per point\n\n"
                                    f"{markdown_table(rows, columns)}{best}")


def sweep(config: str, grid: list[str], out: str | None = None) -> list[dict]:
    axes = parse_grid(grid)
    varying = [key for key, values in axes.items() if len(values) > 1]
    out_dir = Path(out or f"checkpoints/sweep_{Path(config).stem}")
    points = []
    for point in grid_points(axes):
        name = point_name(point, varying)
        points.append((name, point, load_config(config, {**point, "out_dir": str(out_dir / name),
                                                         "experiment": name})))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, point, cfg in points:
        print(f"=== sweep point {len(rows) + 1}/{len(points)}: {name}", flush=True)
        rows.append({"point": name, **{key: point[key] for key in varying}, **train_run(cfg)})
        write_summary(out_dir, config, rows, varying)
    print(f"Sweep done: {out_dir / 'summary.md'}")
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="configs/<name>.yaml")
    parser.add_argument("grid", nargs="*", help="key=v1,v2,... axes; key=value overrides")
    parser.add_argument("--out", help="output folder (default checkpoints/sweep_<config stem>)")
    args = parser.parse_intermixed_args(argv)
    sweep(args.config, args.grid, args.out)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
