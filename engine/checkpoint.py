"""Checkpoints: everything needed to continue a run exactly, written atomically, loaded without pickle code.

A checkpoint is a dict of tensors and plain values (torch.load(weights_only=True) accepts it):
phase, config, model, optimizer, step, tokens_seen, sequences_drawn, best_val_loss, rng, tokenizer.
The learning-rate schedule is a pure function of the step, so `step` is its whole state.
"""

import json
import os
import re
from pathlib import Path

import torch

from engine.config import Config, config_from_dict
from phases import get_phase


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or belongs to another model; the message says what to do."""


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def save_json(path: Path, value) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def missing_checkpoint(path: Path) -> CheckpointError:
    """Name what the folder does hold: the seed's examples say step_2000.pt where files are phase7_step_2000.pt."""
    held = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
    if held:
        return CheckpointError(f"checkpoint {path} not found; {path.parent}/ holds: {', '.join(held)}")
    return CheckpointError(f"checkpoint {path} not found: give CHECKPOINT=<path to a .pt file>")


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise missing_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disk error: all mean "not a usable checkpoint"
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}); use an earlier one") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this repo (no model/config inside)")
    return state


def check_compatible(state: dict, cfg: Config, path) -> None:
    """Refuse to load a checkpoint into a model of another phase or shape, naming the differences."""
    saved = config_from_dict(state["config"])
    if saved.phase != cfg.phase:
        raise CheckpointError(f"{path} is a '{saved.phase}' checkpoint; this run is phase '{cfg.phase}'")
    diffs = [f"{k}={getattr(saved, k)} (config: {getattr(cfg, k)})"
             for k in get_phase(cfg.phase).shape_keys if getattr(saved, k) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"{path} has another model shape: {', '.join(diffs)}; "
                              f"use the config it was trained with ({Path(path).parent / 'config.yaml'})")
    if saved.memory_mode != cfg.memory_mode:  # bf16 weights and 8-bit states vs fp32 and torch's AdamW
        raise CheckpointError(f"{path} was trained with memory_mode={str(saved.memory_mode).lower()}: "
                              f"resume with the same (its optimizer state is of the other kind)")


def find_latest(run_dir: str | Path) -> Path | None:
    """best, then final, then the highest step: the checkpoint chat should load from a run folder."""
    run_dir = Path(run_dir)
    for pattern in ("*_best.pt", "*_final.pt"):
        found = sorted(run_dir.glob(pattern))
        if found:
            return found[0]
    steps = [(int(m.group(1)), p) for p in run_dir.glob("*_step_*.pt")
             if (m := re.fullmatch(r".+_step_(\d+)\.pt", p.name))]
    return max(steps)[1] if steps else None
