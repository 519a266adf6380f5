"""Flat run configuration: one YAML file per recipe, any key overridable as key=value. A recipe that differs
from another in a few keys says `base: other.yaml` and gives only those keys; the resolved config (what
print_config shows and a run saves) has no `base`.

`Config` holds the engine's keys (run, data, optimisation, logging). A phase adds its own (model shape,
objective) by subclassing it: `phases/<name>/` names that class in its `Phase`, and the `phase` key of a
config decides which class checks the rest: the phase registry's `phases.load_config` picks it, and gives it to
the functions here. Every key is a typed field; a typo is an error that names the key and suggests close
matches, never a silent default.
"""

import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, ClassVar

import yaml

from engine.errors import UserError


class ConfigError(UserError, ValueError):
    """A user mistake in a config file or override; the message says what to change."""


@dataclass
class Config:
    # Older names of keys, as {old key: (key, {old value: value})}: the seed's configs keep working.
    ALIASES: ClassVar[dict] = {}

    # --- run ---
    phase: str = "phase7"  # which phases/<name> supplies the model, objective and sampler (or a module path)
    out_dir: str = "checkpoints/run"  # run directory: checkpoints, config.yaml, training_log.json
    seed: int = 1337
    device: str = "auto"  # auto | cuda | cpu
    resume: str = ""  # checkpoint to continue from (Make's CHECKPOINT=); auto: out_dir's newest, if any
    print_config: bool = False  # print the resolved config and exit
    fast_dev_run: int = 0  # >0: run this many steps, save nothing
    experiment: str = ""  # a name for the run in logs and wandb
    tags: str = ""  # comma-separated, for wandb
    notes: str = ""
    logger: str = "json"  # json | wandb (training_log.json is always written)

    # --- data ---
    data: str = "data/lite"  # packed-shard folder | dummy | recipe .yaml | text files | hf:<name>
    tokenizer: str = "data/lite/tokenizer.json"  # tokenizer.json path, folder or transformers name
    n_seq: int = 256  # tokens per training sequence
    vocab_size: int = 32000  # the model's; the data's tokenizer must fit in it

    # --- optimisation ---
    max_steps: int = 1000
    flops_budget: float = 0.0  # >0 sets max_steps = budget / (6 N x tokens per step), N = non-embedding params
    epochs: float = 0.0  # >0 sets max_steps to this many passes over the training tokens
    batch_size: int = 8  # sequences per micro-step
    gradient_accumulation_steps: int = 1
    # Re-split each step's batch_size x gradient_accumulation_steps sequences into micro-batches of N, or with
    # auto of the largest N that fits the GPU: same sequences and loss per step, another split. "": as given.
    micro_batch_size: str = ""
    learning_rate: float = 3e-4
    min_lr: float = 3e-5  # cosine decays to this
    warmup_steps: int = 100
    weight_decay: float = 0.1  # applied to matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still reported)
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops

    # --- switches (the seed's names) ---
    use_mixed_precision: bool = True  # bf16 autocast on CUDA; CPU always runs fp32
    use_gradient_checkpointing: bool = False  # recompute each block's activations in backward
    use_fused_optimizer: bool = True  # fused AdamW on CUDA
    use_compile: bool = False  # torch.compile each block (CUDA only)
    memory_mode: bool = False  # bf16 weights, 8-bit AdamW applied inside backward (engine/memory_mode/)

    # --- several GPUs (torchrun: make ... NPROC=N; engine/distributed.py) ---
    # Free each block's gathered weights after its forward and gather them again in backward (FSDP2's
    # reshard_after_forward): less memory, one more all-gather per block and step.
    fsdp_reshard_after_forward: bool = True

    # --- logging, evaluation, checkpoints ---
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20  # val batches per evaluation (fixed windows, so evals are comparable)
    save_every: int = 2000
    keep_last: int = 0  # keep the newest K step checkpoints (best, final and `latest`'s always stay); 0: all
    verify_checksums: bool = True  # check each checkpoint file against the checksums written when it was saved

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens per optimizer step over all ranks: batch_size is each rank's micro-batch."""
        return self.batch_size * self.gradient_accumulation_steps * self.n_seq * world_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Values that are each well typed but wrong, alone or together; a phase's class extends this."""
        positive = ["n_seq", "vocab_size", "max_steps", "batch_size", "gradient_accumulation_steps", "log_every",
                    "eval_every", "save_every", "eval_batches"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key '{key}' must be > 0, got {getattr(self, key)}")
        choose(self, "device", ["auto", "cuda", "cpu"])
        choose(self, "logger", ["json", "wandb"])
        per_step = self.batch_size * self.gradient_accumulation_steps
        size = self.micro_batch_size
        if size not in ("", "auto") and not (size.isdigit() and 0 < int(size) and per_step % int(size) == 0):
            raise ConfigError(f"micro_batch_size must be auto or a divisor of batch_size x gradient_accumulation_steps"
                              f" = {per_step}; got '{size}'")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must be between 0 and learning_rate ({self.learning_rate})")
        for key in ("warmup_steps", "weight_decay", "grad_clip", "keep_last"):  # `not >= 0`: NaN too
            if not getattr(self, key) >= 0:
                raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"max_bad_steps must be >= 1 (the run stops after that many non-finite steps in a row)"
                              f", got {self.max_bad_steps}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be in [0, 1), got {getattr(self, key)}")
        if self.epochs < 0 or self.flops_budget < 0:
            raise ConfigError("epochs and flops_budget must be >= 0")
        if self.epochs > 0 and self.flops_budget > 0:
            raise ConfigError("epochs and flops_budget both set max_steps: give one of them")


def choose(cfg: Config, key: str, allowed: list[str]) -> None:
    if getattr(cfg, key) not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got '{getattr(cfg, key)}'")


TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}


def field_types(cls: type[Config]) -> dict[str, type]:
    return {f.name: f.type for f in fields(cls)}


def unknown_key(key: str, cls: type[Config], owners: list[str]) -> ConfigError:
    """owners: the phases whose config has the key that cls lacks."""
    if owners:
        return ConfigError(f"config key '{key}' belongs to phase {' / '.join(owners)}; "
                           "this run's phase has no such key")
    close = difflib.get_close_matches(key, field_types(cls), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " Run with print_config=true to list keys."
    return ConfigError(f"unknown config key '{key}'.{hint}")


def coerce(key: str, value, cls: type[Config], owners_of: Callable[[str], list[str]]):
    """Convert a YAML or command-line value to the key's declared type, or raise ConfigError."""
    types = field_types(cls)
    if key not in types:
        raise unknown_key(key, cls, owners_of(key))
    return parse_value(key, types[key], value)


def parse_value(key: str, kind: type, value):
    text = str(value).strip()
    bad = ConfigError(f"config key '{key}' expects {kind.__name__}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise bad
    if kind is int:
        if isinstance(value, bool):
            raise bad
        try:
            number = float(text)  # accepts 1e3 and 2_000
        except ValueError:
            raise bad from None
        if not number.is_integer():
            raise bad
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(text)  # YAML reads 3e-4 as a string; accept it
        except ValueError:
            raise bad from None
    return "" if value is None else text


def resolve_aliases(values: dict, cls: type[Config], alias_wins: bool = False) -> dict:
    """Old boolean key names mapped onto the current keys, within one source (a file, or the overrides).
    An alias value that maps to None changes nothing. A user giving both an alias and its key with other
    meanings gets an error; a config saved by an older version (alias_wins) ran with the alias's meaning."""
    values = dict(values)
    for old, (key, mapping) in cls.ALIASES.items():
        if old not in values:
            continue
        flag = parse_value(old, bool, values.pop(old))
        new_value = mapping[flag]
        if new_value is None:
            continue
        if key in values and str(values[key]).strip() != new_value and not alias_wins:
            raise ConfigError(f"{old}={str(flag).lower()} means {key}={new_value}, but {key}={values[key]} is set "
                              f"too: keep one ({old} is the seed's name for it)")
        values[key] = new_value
    return values


def parse_overrides(args: list[str]) -> dict:
    overrides = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got '{arg}'")
        overrides[key.strip()] = value
    return overrides


def yaml_problem(e: yaml.YAMLError) -> str:
    """' at line L, column C: problem (what it was reading at line L', column C')': where to look, 1-based."""
    def at(mark) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""

    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)  # e.g. "while scanning a quoted scalar" opened lines above
    where_begun = f" ({context}{at(e.context_mark)})" if context else ""
    return f"{at(getattr(e, 'problem_mark', None))}: {problem}{where_begun}"


def read_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} not found (see configs/ for the recipes)")
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML{yaml_problem(e)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must be a flat mapping of key: value")
    return loaded


def read_config_files(path: str) -> list[tuple[str, dict]]:
    """The config file and the chain of bases it names (`base: other.yaml`), base first, each as (path, its keys
    without `base`), so each key's errors name the file that set it. A base's path is relative to the file that
    names it. A base is a file the user named through their config, read as safely as the config itself."""
    chain = []
    while True:
        values = read_yaml(path)
        chain.insert(0, (path, values))
        if "base" not in values:
            return chain
        base = values.pop("base")
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: base must name another config file, got {base!r}")
        base_path = str(Path(path).parent / base.strip())
        if not Path(base_path).is_file():
            raise ConfigError(f"{path}: base '{base.strip()}' not found (looked for {base_path})")
        named = [Path(p).resolve() for p, _ in reversed(chain)]
        if Path(base_path).resolve() in named:
            files = [p for p, _ in reversed(chain)]
            cycle = files[named.index(Path(base_path).resolve()):] + [base_path]
            raise ConfigError(f"config bases form a cycle: {' -> '.join(cycle)}")
        path = base_path


def build_config(cls: type[Config], sources: list[tuple[str | None, dict]],
                 owners_of: Callable[[str], list[str]]) -> Config:
    """Defaults < each source's values in turn (a YAML file's bases, the file's, then the overrides), each value
    type-checked against cls. A source's name prefixes its errors; owners_of(key) names the phases that have a key
    cls lacks."""
    values = {}
    for source, raw in sources:
        try:
            for key, value in resolve_aliases(raw, cls).items():
                values[key] = coerce(key, value, cls, owners_of)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    cfg = cls(**values)
    cfg.check()
    return cfg


def restore_config(cls: type[Config], values: dict) -> Config:
    """Rebuild a config stored in a checkpoint; keys this version no longer knows are dropped."""
    known = {k: v for k, v in values.items() if k in field_types(cls) or k in cls.ALIASES}
    values = resolve_aliases(known, cls, alias_wins=True)
    return cls(**values)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
