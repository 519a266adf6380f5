"""A phase is a model, an objective and a sampler; the engine in engine/ does everything else.

Each phases/<name>/__init__.py defines `PHASE = Phase(...)`. Adding a phase adds no training loop.
"""

import importlib
from dataclasses import dataclass
from typing import Callable

from engine.config import ConfigError


@dataclass(frozen=True)
class Phase:
    name: str
    # Config -> nn.Module. The module exposes num_params(exclude_embedding=True) and flops_per_token(n_seq)
    # for MFU and FLOPs budgets, compile_blocks() for use_compile, and the names attention_backend and
    # norm_backend for the run header.
    build_model: Callable
    # (model, batch of token ids (B, n_seq + 1)) -> scalar training loss. Randomness (e.g. diffusion
    # noise) comes from torch's global RNG, whose state checkpoints save, so resume stays exact.
    loss: Callable
    # (model, prompt ids (1, T), settings: SamplingSettings, on_token: ids -> None) -> generated ids.
    generate: Callable
    # (model, batch) -> scalar validation loss; None means `loss`. Must not depend on RNG state.
    eval_loss: Callable | None = None


def get_phase(name: str) -> Phase:
    try:
        module = importlib.import_module(f"phases.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"phases.{name}":
            raise
        raise ConfigError(f"unknown phase '{name}'; phases live in phases/<name>/") from None
    return module.PHASE
