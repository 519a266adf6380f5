"""Training curves as PNGs: python -m engine.plot RUN [RUN ...] [--out PATH]

A RUN is a run folder holding training_log.json, or a sweep or scaling folder whose subfolders hold them
(each of its runs is labelled by its subfolder's name). One PNG per metric group, one colour per run, one
subplot per x axis: step, tokens, and FLOPs when every run logged them (runs with a flops_budget):

    <out>_loss.png        train loss raw (faint) and EMA-smoothed (solid), val loss (dots)
    <out>_lr.png          learning rate
    <out>_grad_norm.png   gradient norm before clipping (log scale: spikes stay readable)
    <out>_throughput.png  tok/s

OUT is a file stem (a trailing .png is dropped) or a folder, which stands for <folder>/plot; by default the
first RUN folder, so `python -m engine.plot checkpoints/x` writes checkpoints/x/plot_loss.png and so on.
The training loop calls save_loss_plot after each evaluation to keep <run>/loss.png current.
"""

import argparse
import json
import sys
from pathlib import Path

from engine.checkpoint import atomic_write_bytes
from engine.cli import run_cli
from engine.errors import UserError

LOG = "training_log.json"
MAX_SMOOTHING = 100  # the EMA averages over at most this many log steps (fewer on short runs: see ema_decay)
X_LABELS = {"step": "step", "tokens": "tokens", "flops": "training FLOPs (6 N D)"}
# group: (record key, y label, y scale, title)
GROUPS = {
    "loss": ("loss", "loss (nats/token)", "linear", "train loss: raw (faint), EMA (solid); val loss (dots)"),
    "lr": ("lr", "learning rate", "linear", "learning rate"),
    "grad_norm": ("grad_norm", "grad norm", "log", "grad norm before clipping"),
    "throughput": ("tok_per_s", "tok/s", "linear", "throughput (tokens per second)"),
}

Run = tuple[str, list[dict]]  # (label, records of its training_log.json)


class PlotError(UserError):
    """Nothing to plot: no training log, or a damaged one; the message names the file and what to do."""


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, so it runs on headless GPU boxes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_log(path: Path) -> list[dict]:
    """The records of one training_log.json; PlotError unless it is a non-empty list of records with step
    and loss."""
    try:
        log = json.loads(path.read_text())
    except ValueError as e:
        raise PlotError(f"{path} is damaged ({e}): it is not the JSON list the engine writes; restore it "
                        "or train the run again") from None
    if not isinstance(log, list) or not log:
        raise PlotError(f"{path} holds no records: train past the first log step (log_every) first")
    if not all(isinstance(r, dict) and "step" in r and "loss" in r for r in log):
        raise PlotError(f"{path} is damaged: every record needs a step and a loss; restore it or train the run "
                        "again")
    return log


def find_runs(folder: Path) -> list[Run]:
    """The folder's own log, else the logs of its subfolders (a sweep or scaling folder), by name."""
    if (folder / LOG).is_file():
        return [(folder.resolve().name, read_log(folder / LOG))]
    if not folder.is_dir():
        raise PlotError(f"{folder} is not a folder: RUN is a run folder (checkpoints/<run>) or a sweep folder")
    runs = [(sub.name, read_log(sub / LOG)) for sub in sorted(folder.iterdir()) if (sub / LOG).is_file()]
    if not runs:
        raise PlotError(f"no {LOG} in {folder} or its subfolders: train first (make train CONFIG=...) "
                        "and plot its out_dir")
    return runs


def ema_decay(points: int) -> float:
    """An EMA over about a tenth of the curve (1 to MAX_SMOOTHING points): a fixed window of 10 lags a
    15-point curve of a short run far behind its raw loss."""
    window = min(MAX_SMOOTHING, max(1.0, points / 10))
    return 1 - 1 / window


def ema(values: list[float], decay: float) -> list[float]:
    """Exponential moving average, debiased so that the first points are not pulled towards 0."""
    smoothed, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = decay * average + (1 - decay) * value
        smoothed.append(average / (1 - decay ** i))
    return smoothed


def series(log: list[dict], x: str, y: str) -> tuple[list, list]:
    """(xs, ys) over the records that hold both keys: val_loss is only on evaluation steps."""
    points = [(r[x], r[y]) for r in log if x in r and y in r]
    return [p[0] for p in points], [p[1] for p in points]


def x_axes(runs: list[Run]) -> list[str]:
    """step and tokens; FLOPs too when every record of every run has them (a comparison needs all runs)."""
    with_flops = all("flops" in r for _, log in runs for r in log)
    return ["step", "tokens", "flops"] if with_flops else ["step", "tokens"]


def run_colors(plt, n: int) -> list:
    """Distinct colours for up to 10 runs; beyond that a gradient, which reads as the order of the runs."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    return [plt.get_cmap("viridis")(i / (n - 1)) for i in range(n)]


def draw_loss(ax, log: list[dict], x: str, label: str, color) -> None:
    xs, losses = series(log, x, "loss")
    ax.plot(xs, losses, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(xs, ema(losses, ema_decay(len(losses))), color=color, label=label)
    val_xs, val_losses = series(log, x, "val_loss")
    if val_xs:
        ax.plot(val_xs, val_losses, "o--", color=color, markersize=4, linewidth=0.8, label=f"{label} (val)")


def draw(runs: list[Run], group: str, axes: list[str], path: Path) -> Path:
    """One PNG of a metric group: a subplot per x axis, a colour per run; written atomically."""
    key, ylabel, yscale, title = GROUPS[group]
    plt = pyplot()
    fig, subplots = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 4.2), squeeze=False,
                                 layout="constrained")
    colors = run_colors(plt, len(runs))
    for ax, x in zip(subplots[0], axes):
        for (label, log), color in zip(runs, colors):
            if group == "loss":
                draw_loss(ax, log, x, label, color)
            else:
                ax.plot(*series(log, x, key), color=color, label=label)
        ax.set(xlabel=X_LABELS[x], ylabel=ylabel, yscale=yscale, xscale="log" if x == "flops" else "linear")
        ax.grid(alpha=0.3)
    subplots[0][0].legend(fontsize=8)
    fig.suptitle(title)
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def out_stem(out: str | None, first_run: str) -> Path:
    """The <stem> of <stem>_<group>.png: OUT less a .png suffix; a folder (by default the first RUN) means
    <folder>/plot."""
    if out is None or out.endswith("/") or Path(out).is_dir():
        return Path(out or first_run) / "plot"
    return Path(out).with_suffix("") if out.endswith(".png") else Path(out)


def plot(folders: list[str], out: str | None = None) -> list[Path]:
    """Every metric group that some run logged, for all runs under the folders; the paths written."""
    runs = [run for folder in folders for run in find_runs(Path(folder))]
    stem, axes = out_stem(out, folders[0]), x_axes(runs)
    return [draw(runs, group, axes, stem.with_name(f"{stem.name}_{group}.png"))
            for group, (key, *_) in GROUPS.items() if any(key in r for _, log in runs for r in log)]


def save_loss_plot(run_dir: Path, log: list[dict]) -> Path | None:
    """<run_dir>/loss.png: loss against step and tokens, for the training loop after each evaluation.
    None where matplotlib cannot be imported: a missing plot never stops a run."""
    try:
        pyplot()
    except ImportError:
        return None
    return draw([(run_dir.name, log)], "loss", ["step", "tokens"], run_dir / "loss.png")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, or sweep/scaling folders of runs")
    parser.add_argument("--out", help="file stem or folder (default: the first RUN folder, as <RUN>/plot_*.png)")
    args = parser.parse_args(argv)
    for path in plot(args.runs, args.out):
        print(path)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
