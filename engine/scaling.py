"""Loss against compute: python -m engine.scaling --phase mdm --sizes 6M,170M --budgets 1e18,3e18
[--out DIR] [--compare] [--reference phase7] [key=value ...]

Every size x budget trains configs/<phase>_<size>.yaml (a size may also be the path of any config, run as
--phase) with flops_budget=<budget>, from which the engine sets max_steps = floor(C / (6 N x tokens per
step)): C = 6 N D, N the parameters other than the input embedding, D the tokens trained on. The lowest final
val loss at each budget is the compute-optimal frontier, and log L = a + b log C is fitted to it. Writes
OUT/<phase>_results.csv (every run of the phase in OUT, so calls add up), OUT/<phase>_scaling.md and
OUT/<phase>_scaling.png; finished runs are read back, not retrained. --eval-tasks piqa,arc_easy adds each run's
benchmark score (engine/evaluate.py: acc_norm, else acc) to the table, CSV and a second plot panel.
Once OUT holds results of a phase and of the reference phase (phase7, the causal LM, by default), or with
--compare alone, OUT/<phase>_vs_<reference>.md and .png give the factor of compute the phase needs to reach
the reference's loss (SMDM reports about 16x for its masked diffusion LM against the causal one).
"""

import argparse
import csv
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from engine.cli import run_cli
from engine.config import ConfigError, parse_overrides
from engine.plot import pyplot
from engine.sweep import markdown_table, train_run, write_csv
from phases import get_phase, load_config, phase_names

REFERENCE = "phase7"
COLUMNS = ["run", "size", "params", "budget", "steps", "tokens", "val_loss", "status"]
NUMERIC = {"params": int, "budget": float, "steps": int, "tokens": int, "val_loss": float}


def size_config(phase: str, size: str) -> tuple[str, str]:
    """(label, config path) of a size: '170M' -> configs/mdm_170M.yaml; a .yaml path stands for itself."""
    if size.endswith((".yaml", ".yml")):
        return Path(size).stem, size
    return size, f"configs/{phase}_{size}.yaml"


def budget_label(budget: float) -> str:
    """1e+18 -> 1e18, 2.5e+15 -> 2.5e15: short, and no '+' in folder names."""
    return re.sub(r"e\+?0*", "e", f"{budget:g}")


def count_params(cfg) -> int:
    """N as the engine counts it, from a model built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return get_phase(cfg.phase).build_model(cfg).num_params()


def results_path(out: Path, phase: str) -> Path:
    return out / f"{phase}_results.csv"


def load_results(out: Path, phase: str) -> list[dict]:
    path = results_path(out, phase)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: NUMERIC[k](v) if k in NUMERIC else v if k in COLUMNS else float(v) for k, v in row.items() if v}
            for row in rows]  # columns beyond COLUMNS are benchmark scores


def add_benchmarks(out: Path, phase: str, rows: list[dict], tasks: str, eval_args: str) -> list[str]:
    """Each finished run's benchmark scores as columns of its row (results CSV rewritten); the column names."""
    from engine.evaluate import benchmark_scores, split_tasks

    names = split_tasks(tasks)[0]
    for row in rows:
        if "val_loss" in row:
            print(f"=== benchmarks of {row['run']}: {', '.join(names)}", flush=True)
            row.update(benchmark_scores(out / row["run"], tasks, options=parse_overrides(split_list(eval_args))))
    write_csv(results_path(out, phase), rows, COLUMNS + names)
    return names


def run_grid(phase: str, sizes: list[str], budgets: list[float], out: Path, overrides: dict) -> list[dict]:
    """Train every size x budget (all configs are checked first); merge the rows into OUT/<phase>_results.csv."""
    runs = []
    for size in sizes:
        label, path = size_config(phase, size)
        for budget in budgets:
            name = f"{phase}_{label}_{budget_label(budget)}"
            cfg = load_config(path, {**overrides, "phase": phase, "flops_budget": budget,
                                     "out_dir": str(out / name), "experiment": name})
            runs.append({"run": name, "size": label, "params": count_params(cfg), "budget": budget, "cfg": cfg})
    out.mkdir(parents=True, exist_ok=True)
    rows = {row["run"]: row for row in load_results(out, phase)}
    for i, run in enumerate(runs):
        print(f"=== scaling run {i + 1}/{len(runs)}: {run['run']} (N = {run['params']:,})", flush=True)
        cfg = run.pop("cfg")
        rows[run["run"]] = {**run, **train_run(cfg)}
        write_csv(results_path(out, phase), list(rows.values()), COLUMNS)
    return list(rows.values())


def frontier(rows: list[dict]) -> list[dict]:
    """The row with the lowest val loss at each budget, by budget."""
    best = {}
    for row in rows:
        if "val_loss" in row and (row["budget"] not in best or row["val_loss"] < best[row["budget"]]["val_loss"]):
            best[row["budget"]] = row
    return [best[b] for b in sorted(best)]


def fit_power_law(points: list[dict]) -> tuple[float, float] | None:
    """(a, b) of log L = a + b log C by least squares over the frontier; None with fewer than 2 budgets."""
    if len(points) < 2:
        return None
    b, a = np.polyfit(np.log([p["budget"] for p in points]), np.log([p["val_loss"] for p in points]), 1)
    return float(a), float(b)


def fit_text(fit) -> str:
    if fit is None:
        return "no fit: it needs final losses at 2 budgets or more"
    a, b = fit
    return f"log L = {a:.4f} + ({b:.4f}) log C, i.e. L = {math.exp(a):.4g} x C^{b:.4f}"


def draw_fit(ax, fit, budgets, label, color="k"):
    if fit is not None:
        c = np.geomspace(min(budgets), max(budgets), 50)
        ax.plot(c, np.exp(fit[0]) * c ** fit[1], "--", color=color, label=label)


def report_phase(out: Path, phase: str, rows: list[dict], benchmarks: list[str] = ()) -> None:
    """OUT/<phase>_scaling.md (all runs, frontier, fit) and OUT/<phase>_scaling.png; with benchmarks, their
    scores as columns and, beside the loss, a panel of score against compute."""
    best = frontier(rows)
    fit = fit_power_law(best)
    text = (f"# Scaling of {phase}: final val loss (nats/token) against training compute C = 6 N D\n\n"
            f"{markdown_table(rows, COLUMNS + list(benchmarks))}\n"
            "## Compute-optimal frontier (lowest loss per budget)\n\n"
            f"{markdown_table(best, ['budget', 'size', 'params', 'val_loss'])}\nFit on the frontier: {fit_text(fit)}\n")
    (out / f"{phase}_scaling.md").write_text(text)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if benchmarks else 1, figsize=(14 if benchmarks else 7, 5), squeeze=False)
    ax = axes[0][0]
    for size in dict.fromkeys(r["size"] for r in rows):
        done = sorted((r for r in rows if r["size"] == size and "val_loss" in r), key=lambda r: r["budget"])
        if done:
            ax.plot([r["budget"] for r in done], [r["val_loss"] for r in done], "o-", alpha=0.6,
                    label=f"{size} (N = {done[0]['params'] / 1e6:.3g}M)")
    if best:
        ax.plot([r["budget"] for r in best], [r["val_loss"] for r in best], "k*", markersize=12, label="frontier")
        draw_fit(ax, fit, [r["budget"] for r in best], f"fit: {fit_text(fit).split('i.e. ')[-1]}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C = 6 N D", ylabel="final val loss (nats/token)",
           title=f"{phase}: loss against compute")
    ax.legend(fontsize=8)
    if benchmarks:
        draw_benchmarks(axes[0][1], phase, rows, benchmarks)
    fig.savefig(out / f"{phase}_scaling.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def draw_benchmarks(ax, phase: str, rows: list[dict], benchmarks) -> None:
    """Each benchmark's score of the best run at each budget (the loss frontier's runs), against compute."""
    best = frontier(rows)
    for task in benchmarks:
        points = [r for r in best if isinstance(r.get(task), float)]
        ax.plot([r["budget"] for r in points], [r[task] for r in points], "o-", label=task)
    ax.set(xscale="log", xlabel="training FLOPs C = 6 N D", ylabel="benchmark score (acc_norm, else acc)",
           title=f"{phase}: benchmarks of the frontier runs")
    ax.legend(fontsize=8)


def compute_gap(fit, reference_points: list[dict], budgets: list[float]) -> list[dict]:
    """At each reference frontier point (C, L): the compute C' at which the phase's fitted law reaches L, and
    C'/C; `extrapolated` says whether C' lies outside the budgets the phase was trained at."""
    a, b = fit
    rows = []
    for p in reference_points:
        row = {"budget": p["budget"], "reference_loss": p["val_loss"]}
        if b < 0:  # the loss must fall with compute for the inverse to exist
            row["phase_flops"] = math.exp((math.log(p["val_loss"]) - a) / b)
            row["gap"] = row["phase_flops"] / p["budget"]
            row["extrapolated"] = "no" if min(budgets) <= row["phase_flops"] <= max(budgets) else "yes"
        rows.append(row)
    return rows


def compare_path(out: Path, phase: str, reference: str, suffix: str) -> Path:
    return out / f"{phase}_vs_{reference}.{suffix}"


def compare(out: Path, phase: str, reference: str) -> None:
    """OUT/<phase>_vs_<reference>.md and .png: both frontiers, both fits, and the phase's compute gap."""
    results = {name: load_results(out, name) for name in (phase, reference)}
    missing = [name for name, rows in results.items() if not frontier(rows)]
    if missing:
        raise ConfigError(f"--compare needs finished runs of {phase} and {reference} in {out}; none for "
                          f"{', '.join(missing)}: run `make scaling PHASE=<phase> SIZES=... BUDGETS=... OUT={out}` "
                          "first")
    fronts = {name: frontier(rows) for name, rows in results.items()}
    fits = {name: fit_power_law(points) for name, points in fronts.items()}
    gaps = compute_gap(fits[phase], fronts[reference], [p["budget"] for p in fronts[phase]]) if fits[phase] else []
    factors = [g["gap"] for g in gaps if "gap" in g]
    gap = f"{math.exp(np.mean(np.log(factors))):.3g}x" if factors else "n/a"
    summary = (f"geometric mean over {reference}'s budgets: **{gap}**" if factors else
               f"not measurable: {phase}'s frontier needs 2 budgets or more and a loss that falls with compute")
    text = (f"# {phase} against {reference}: compute to reach the same loss\n\n"
            f"{phase} frontier fit: {fit_text(fits[phase])}\n\n"
            f"{reference} frontier fit: {fit_text(fits[reference])}\n\n"
            f"For each {reference} frontier point (budget C, loss L), `phase_flops` is the compute at which {phase}'s"
            " fitted law reaches L and `gap` = phase_flops / C. Each loss is its phase's validation loss: for a"
            " masked diffusion LM an upper bound on NLL, for a causal LM the exact NLL, as in SMDM (which reports"
            " about 16x for the MDM).\n\n"
            f"{markdown_table(gaps, ['budget', 'reference_loss', 'phase_flops', 'gap', 'extrapolated'])}\n"
            f"Compute gap: {summary}\n")
    compare_path(out, phase, reference, "md").write_text(text)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    budgets = [p["budget"] for p in fronts[phase] + fronts[reference]]
    for name, color in ((phase, "tab:red"), (reference, "tab:blue")):
        points = fronts[name]
        ax.plot([p["budget"] for p in points], [p["val_loss"] for p in points], "o", color=color,
                label=f"{name} frontier")
        draw_fit(ax, fits[name], budgets, f"{name} fit", color)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C = 6 N D", ylabel="final val loss (nats/token)",
           title=f"{phase} vs {reference}: {phase} needs {gap} the compute for {reference}'s loss")
    ax.legend(fontsize=8)
    fig.savefig(compare_path(out, phase, reference, "png"), dpi=120, bbox_inches="tight")
    plt.close(fig)


def phases_with_results(out: Path) -> list[str]:
    return [name for name in phase_names() if frontier(load_results(out, name))]


def split_list(text: str) -> list[str]:
    return [item for item in re.split(r"[,\s]+", text or "") if item]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=phase_names(), help="the phase to train (configs/<phase>_<size>.yaml)")
    parser.add_argument("--sizes", help="comma-separated: 6M,170M,1B or config paths")
    parser.add_argument("--budgets", help="comma-separated FLOPs budgets: 1e18,3e18")
    parser.add_argument("--out", default="checkpoints/scaling", help="output folder (default checkpoints/scaling)")
    parser.add_argument("--compare", action="store_true", help="each phase with results in OUT against --reference")
    parser.add_argument("--reference", default=REFERENCE, help=f"the phase compared against (default {REFERENCE})")
    parser.add_argument("--eval-tasks",
                        help="lm-eval tasks scored on every run (make eval's TASKS), e.g. piqa,arc_easy")
    parser.add_argument("--eval-args", default="", help="make eval's ARGS for those, e.g. 'batch_size=32 mc_num=128'")
    parser.add_argument("overrides", nargs="*", help="key=value for every run, e.g. data=dummy n_seq=128")
    args = parser.parse_intermixed_args(argv)
    out = Path(args.out)
    sizes, budgets = split_list(args.sizes), split_list(args.budgets)
    if sizes or budgets or not args.compare:
        if not (args.phase and sizes and budgets):
            raise ConfigError("scaling runs need --phase, --sizes and --budgets (or --compare alone to compare)")
        try:
            budget_values = [float(b) for b in budgets]
        except ValueError:
            raise ConfigError(f"--budgets expects numbers like 1e18,3e18; got '{args.budgets}'") from None
        rows = run_grid(args.phase, sizes, budget_values, out, parse_overrides(args.overrides))
        benchmarks = add_benchmarks(out, args.phase, rows, args.eval_tasks, args.eval_args) if args.eval_tasks else []
        report_phase(out, args.phase, rows, benchmarks)
        print(f"Scaling of {args.phase}: {out / f'{args.phase}_scaling.md'}, {out / f'{args.phase}_scaling.png'}")
    measured = phases_with_results(out)
    others = [name for name in measured if name != args.reference]
    if args.compare and not (others and args.reference in measured):
        raise ConfigError(f"--compare needs finished runs of {args.reference} and of another phase in {out} "
                          f"(found: {', '.join(measured) or 'none'}): run `make scaling PHASE=<phase> SIZES=... "
                          f"BUDGETS=... OUT={out}` first")
    if args.reference in measured:  # each phase against the reference, once both have results
        for phase in others:
            compare(out, phase, args.reference)
            print(f"{phase} vs {args.reference}: {compare_path(out, phase, args.reference, 'md')}, "
                  f"{compare_path(out, phase, args.reference, 'png')}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
