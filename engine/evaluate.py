"""Zero-shot benchmarks through lm-evaluation-harness:
python -m engine.evaluate CHECKPOINT TASKS [limit=N] [device=cuda] [batch_size=16 mc_num=128 nll=mc cfg=0 ...]

CHECKPOINT: a .pt, a checkpoint folder, a run folder (its best/final/latest) or a folder of runs (a sweep or
scaling folder: each run is evaluated). TASKS: lm-eval task names and paths of task YAML files, comma-separated.
Each run gets eval_<tasks>.json beside its checkpoint; one table (run, task, metric, value, stderr) is printed.
The model is engine/lm_eval_model.py's, scoring as its phase says (engine/likelihood.py, Phase.scorer).
"""

import functools
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path

import yaml

from engine import checkpoint as ckpt
from engine.cli import run_cli
from engine.config import ConfigError, parse_overrides
from engine.sweep import markdown_table

TABLE_COLUMNS = ["run", "task", "metric", "value", "stderr"]


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("`make eval` needs lm-evaluation-harness: pip install lm-eval (see requirements.txt)") \
            from None
    return lm_eval


class TaskFileLoader(yaml.SafeLoader):
    """Reads a task YAML without running anything: lm-eval's `!function module.name` tags stay strings."""


TaskFileLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def split_tasks(text: str) -> tuple[list[str], list[str], list[str]]:
    """(task names to run, folders to add to lm-eval's include path, names that need the hub) from TASKS."""
    names, folders, hub = [], [], []
    for item in [t for t in re.split(r"[,\s]+", text or "") if t]:
        if not item.endswith((".yaml", ".yml")):
            names.append(item)
            hub.append(item)
            continue
        path = Path(item)
        if not path.is_file():
            raise ConfigError(f"task file {item} not found")
        try:
            spec = yaml.load(path.read_text(), Loader=TaskFileLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"task file {item} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
            raise ConfigError(f"task file {item} names no task (a `task: <name>` line)")
        names.append(spec["task"])
        folders.append(str(path.resolve().parent))
    if not names:
        raise ConfigError("no tasks given: TASKS=hellaswag,arc_easy,piqa,lambada_openai or a task YAML path")
    return names, list(dict.fromkeys(folders)), hub


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # through a proxy only the hub client can tell: let it try
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)  # HF_ENDPOINT: a mirror, if the user set one
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@functools.cache
def task_manager(folders: tuple[str, ...]):
    """lm-eval's index of its tasks and ours: built once per process (it reads every task YAML it ships, seconds)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders) or None)


def load_tasks(names: list[str], folders: list[str], hub: list[str]):
    """lm-eval's TaskManager with our include path, after checking that every task exists and its data loads:
    a task whose dataset is not cached, with the hub out of reach, fails here in one line, before any model."""
    if hub and not hub_reachable():
        # Else datasets retries for a minute per task; must be set before datasets and the hub client load.
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    manager = task_manager(tuple(folders))
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}: give lm-eval task names (`lm_eval ls tasks`) "
                          "or task YAML paths")
    try:
        manager.load(names)
    except OSError as e:  # ConnectionError, FileNotFoundError: the dataset is neither cached nor reachable
        if os.environ.get("HF_DATASETS_OFFLINE") != "1":
            raise
        raise ConfigError(f"task(s) {', '.join(hub)} need their datasets from the Hugging Face hub, which are not "
                          f"cached here, and the hub cannot be reached ({str(e).splitlines()[0][:120]}): run once "
                          "with network access, or give a local task YAML") from None
    return manager


def runs_in(path: str) -> list[Path]:
    """The checkpoints to evaluate: the one CHECKPOINT names, or each run's of a sweep or scaling folder."""
    folder = Path(path)
    if folder.is_dir() and not ckpt.is_distributed_checkpoint(folder) and not ckpt.checkpoints_in(folder):
        runs = [found for run in sorted(folder.iterdir()) if run.is_dir() and (found := ckpt.best_checkpoint_in(run))]
        if runs:
            return runs
    return [ckpt.resolve_checkpoint(path)]


def parse_limit(text: str | None) -> int | float | None:
    """LIMIT: a number of examples per task, or a fraction of each task below 1."""
    if not text:
        return None
    try:
        limit = float(text)
    except ValueError:
        raise ConfigError(f"limit expects a number of examples (or a fraction below 1); got '{text}'") from None
    return limit if limit < 1 else int(limit)


def result_path(checkpoint: Path, names: list[str]) -> Path:
    return checkpoint.parent / f"eval_{'_'.join(names)}.json"


def evaluate_checkpoint(checkpoint: Path, names: list[str], manager, limit=None, options: dict | None = None,
                        log_samples: bool = False) -> dict:
    """lm-eval's results for one checkpoint, also written to eval_<tasks>.json beside it."""
    import lm_eval
    import torch

    from engine.lm_eval_model import CheckpointLM

    model = CheckpointLM(str(checkpoint), **(options or {}))
    if model.phase.name == "mdm" and not getattr(model.options, "greedy", True):
        print("note: mdm with greedy=false scores is_greedy as false (LAMBADA's acc reads 0); ARGS=\"greedy=true\" "
              "computes it by greedy unmasking", file=sys.stderr)
    results = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit,
                                      log_samples=log_samples)
    record = {"checkpoint": str(checkpoint), "phase": model.phase.name, "tasks": names, "limit": limit,
              "args": options or {}, "options": vars(model.options), "lm_eval": lm_eval.__version__,
              "results": results["results"],
              "n-samples": results.get("n-samples", {})}
    ckpt.atomic_write_bytes(result_path(checkpoint, names),
                            lambda f: f.write(json.dumps(record, indent=1, default=str).encode()))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def headline_metric(metrics: dict) -> tuple[str, float] | None:
    """The number a task is compared by: acc_norm, else acc, else exact_match, else its first metric."""
    values = {key.partition(",")[0]: v for key, v in metrics.items()
              if "," in key and "_stderr" not in key and isinstance(v, (int, float))}
    for name in ("acc_norm", "acc", "exact_match", *values):
        if name in values:
            return name, float(values[name])
    return None


def benchmark_scores(run_dir: Path, tasks: str, limit=None, options: dict | None = None) -> dict[str, float]:
    """{task: headline value} of a run's best/final/latest checkpoint, for the scaling table; read back from its
    eval file when one was written with the same tasks, LIMIT and ARGS."""
    names, folders, hub = split_tasks(tasks)
    checkpoint = ckpt.resolve_checkpoint(str(run_dir))
    path = result_path(checkpoint, names)
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("limit") != limit or record.get("args") != (options or {}):
        record = {"results": evaluate_checkpoint(checkpoint, names, load_tasks(names, folders, hub), limit,
                                                 options)["results"]}
    return {task: found[1] for task in names
            if (found := headline_metric(record["results"].get(task, {}))) is not None}


def table_rows(run: str, results: dict) -> list[dict]:
    """(run, task, metric, value, stderr) of each metric lm-eval reports; keys read 'acc,none', 'acc_stderr,none'."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if not kind or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{kind}")
            rows.append({"run": run, "task": task, "metric": metric if kind == "none" else f"{metric} ({kind})",
                         "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else ""})
    return rows


def evaluate(path: str, tasks: str, limit=None, options: dict | None = None) -> list[dict]:
    """Every run under `path` on `tasks`: their table rows."""
    names, folders, hub = split_tasks(tasks)
    runs = runs_in(path)
    manager = load_tasks(names, folders, hub)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would bury the table
    rows = []
    for i, checkpoint in enumerate(runs):
        print(f"=== eval {i + 1}/{len(runs)}: {checkpoint} on {', '.join(names)}", file=sys.stderr, flush=True)
        results = evaluate_checkpoint(checkpoint, names, manager, limit, options)
        rows += table_rows(checkpoint.parent.name, results)
        print(f"wrote {result_path(checkpoint, names)}", file=sys.stderr)
    return rows


def main(argv: list[str]) -> None:
    if len(argv) < 2 or "=" in argv[0] or "=" in argv[1]:
        raise ConfigError("usage: make eval CHECKPOINT=<checkpoint, run or sweep folder> TASKS=hellaswag,arc_easy "
                          "[LIMIT=N] [ARGS=\"batch_size=16 mc_num=128 nll=mc|chain_rule cfg=0 greedy=false\"]")
    options = parse_overrides(argv[2:])
    limit = parse_limit(options.pop("limit", None))
    print(markdown_table(evaluate(argv[0], argv[1], limit, options), TABLE_COLUMNS))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
