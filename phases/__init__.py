"""A phase is a model, an objective, a sampler and the config keys they need; engine/ does everything else.

Each phases/<name>/__init__.py defines `PHASE = Phase(...)`. Adding a phase adds no training loop and no
edit in engine/: the engine reads what it needs from the Phase and from the model's `LanguageModel` methods.
A phase kept elsewhere is named by its module path (`phase: tests.toy_phase`), and only by the user: a
module path is imported when the user's own config file or command line names it (load_config calls
allow_phase_module), never because a checkpoint says so, or a downloaded checkpoint could name a file of its
own folder (`phase: checkpoints.evilrun.payload`) and have it run on chat, export and resume. The registry
also reads a run's config (load_config, config_from_dict): the phase it names decides the config class.
"""

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from engine.config import (Config, ConfigError, build_config, field_types, parse_overrides, read_config_files,
                           restore_config)


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

    def init_weights(self, seed: int) -> None:
        """Compute the buffers (RoPE tables) and give every parameter its initial values, each drawn whole from
        a generator seeded by (seed, its name) through engine.init.init_parameter: the engine builds the model
        on the meta device and calls this after sharding, so every rank fills its own shards and N ranks start
        from 1 process's weights."""

    def input_embedding(self) -> nn.Module | None:
        """The input embedding, an FSDP unit of its own; None when the output head shares its weight."""


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
    # Benchmark scoring (`make eval`, engine/evaluate.py): a class built from (model, options) with
    # loglikelihood(pairs of context and continuation ids). None: engine.likelihood.CausalScorer, exact
    # next-token log-likelihoods; phases/mdm/likelihood.py is the diffusion one.
    scorer: type | None = None
    # (model, step, cfg) -> None, before each training step (steps count from 1): sets model state that is a pure
    # function of the step, like the learning rate (phase 7's curvature schedule), so resume replays it. None: nothing.
    on_step: Callable | None = None


# Module paths of phases outside phases/ that the user named in this process.
USER_NAMED_MODULES: set[str] = set()


def allow_phase_module(name: str) -> None:
    USER_NAMED_MODULES.add(name)


def get_phase(name: str) -> Phase:
    """The phase named: a folder of phases/, or a module path the user named (see allow_phase_module)."""
    if "." in name and name not in USER_NAMED_MODULES:
        raise ConfigError(f"phase '{name}' is a module path that your own config or command line does not name: "
                          f"only those are imported (give phase={name} if you trust that module's code); "
                          f"phases of phases/: {', '.join(phase_names())}")
    if "." not in name and name not in phase_names():  # never a path or a name import_module would reinterpret
        raise ConfigError(f"unknown phase '{name}': phases are the folders of phases/ "
                          f"({', '.join(phase_names())}) or a module path")
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


def owners_of(key: str) -> list[str]:
    """The phases under phases/ whose config has this key (for the error when this run's phase has not)."""
    return [phase.name for phase in all_phases() if key in field_types(phase.config)]


def load_config(path: str | None, overrides: dict | list[str] | None = None) -> Config:
    """Defaults < the YAML file's bases < the YAML file < overrides, each value type-checked against the config
    class of the phase they name (the last of them to name one)."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    files = read_config_files(path) if path else []  # the file's bases first, then the file
    phase = Config.phase
    for _, values in [*files, (None, overrides)]:
        phase = values.get("phase", phase)
    phase = str(phase).strip()
    if "." in phase:  # a phase outside phases/, named by the user's own files or command line: trusted
        allow_phase_module(phase)
    return build_config(get_phase(phase).config, [*files, (None, overrides)], owners_of)


def config_from_dict(values: dict) -> Config:
    """Rebuild a config stored in a checkpoint with its phase's class; keys this version no longer knows are dropped."""
    return restore_config(get_phase(values.get("phase", Config.phase)).config, values)
