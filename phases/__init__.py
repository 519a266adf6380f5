"""A phase is a model, an objective, a sampler and the config keys they need; engine/ does everything else.

Each phases/<name>/__init__.py defines `PHASE = Phase(...)`. Adding a phase adds no training loop and no
edit in engine/: the engine reads what it needs from the Phase and from the model's `LanguageModel` methods.
A phase kept elsewhere is named by its module path (`phase: tests.toy_phase`).
"""

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from engine.config import Config, ConfigError


@runtime_checkable
class LanguageModel(Protocol):
    """What the engine relies on in a phase's model (besides being an nn.Module)."""

    # The repeated blocks, in order: the engine applies checkpointing and torch.compile to each (and FSDP).
    layers: nn.ModuleList

    def hidden_states(self, idx: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        """Final-normed hidden states (B, S, d) of token ids (B, S)."""

    def output_weight(self) -> torch.Tensor:
        """The output projection's (vocab, d) weight; objectives apply it to hidden_states, possibly fused
        with their loss (kernels/cross_entropy.py). It may be computed (a tied tensor-train head is built
        from its cores at each call), so an objective or sampler takes it once per step or per sample."""

    def num_params(self, exclude_embedding: bool = True) -> int:
        """Parameter count; without the input embedding it is the N of C = 6 N D (FLOPs budgets)."""

    def flops_per_token(self, n_seq: int) -> float:
        """Training FLOPs per token at this sequence length (forward + backward), for MFU."""

    def describe(self) -> str:
        """The kernels/backends in use, for the run header, e.g. 'attention triton | rms_norm torch'."""


@dataclass(frozen=True)
class Phase:
    name: str
    # config -> LanguageModel. The engine moves it to the device, wraps its blocks and builds the optimizer.
    build_model: Callable
    # (model, batch of token ids (B, n_seq + 1)) -> scalar training loss. Randomness (e.g. diffusion
    # noise) comes from torch's global RNG, whose state checkpoints save, so resume stays exact.
    loss: Callable
    # (model, prompt ids (1, T), settings: SamplingSettings, on_token: ids -> None) -> generated ids.
    generate: Callable
    # (model, batch) -> scalar validation loss; None means `loss`. Must not depend on RNG state.
    eval_loss: Callable | None = None
    # The phase's config class: engine.config.Config plus the keys of this phase's model and objective.
    config: type[Config] = Config
    # Keys that decide parameter shapes: a checkpoint loads only into a run that agrees on all of them.
    shape_keys: tuple[str, ...] = ("vocab_size",)
    # (cfg) -> None: fills keys that follow from something outside the config (phase hf: the tokenizer and
    # vocab_size of a pretrained model) when a run starts, before the resume check and the data. None: nothing.
    resolve_config: Callable | None = None
    # (model, step, cfg) -> None, before each training step (steps count from 1): sets model state that is a pure
    # function of the step, like the learning rate (phase 7's curvature schedule), so resume replays it. None: nothing.
    on_step: Callable | None = None


def get_phase(name: str) -> Phase:
    module_name = name if "." in name else f"phases.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise
        raise ConfigError(f"unknown phase '{name}': phases are the folders of phases/ "
                          f"({', '.join(phase_names())}) or a module path") from None
    if not isinstance(getattr(module, "PHASE", None), Phase):
        raise ConfigError(f"{module_name} defines no `PHASE = Phase(...)`")
    return module.PHASE


def phase_names() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(__path__) if m.ispkg]


def all_phases() -> list[Phase]:
    return [get_phase(name) for name in phase_names()]
