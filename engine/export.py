"""python -m engine.export CHECKPOINT OUT_DIR: a checkpoint (or a run folder's best/final/latest) exported by its
phase's own exporter, `<phase module>/export.py`, whose main(argv) takes the same two arguments."""

import importlib
import sys
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.cli import run_cli


def checkpoint_phase(path: Path) -> str:
    """The phase module named in the checkpoint's config; the tensors are memory-mapped, not read."""
    if not path.is_file():
        raise ckpt.missing_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        state = ckpt.load_checkpoint(path)  # raises the checkpoint error that says what is wrong
    if not isinstance(state, dict) or "config" not in state:
        raise ckpt.CheckpointError(f"{path} is not a checkpoint of this repo (no config inside)")
    return state["config"].get("phase", "phase7")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m engine.export CHECKPOINT OUT_DIR")
    path = Path(argv[0])
    if path.is_dir():
        found = ckpt.find_latest(path)
        if found is None:
            raise ckpt.CheckpointError(f"no checkpoint in {path}/: give a .pt file or a run folder that holds one")
        path = found
    phase = checkpoint_phase(path)
    module = f"{phase if '.' in phase else 'phases.' + phase}.export"
    try:
        exporter = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ckpt.CheckpointError(f"{path} is a '{phase}' checkpoint and that phase has no exporter "
                                   f"({module.replace('.', '/')}.py)") from None
    exporter.main([str(path), argv[1]])


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
