"""Flat run configuration: one YAML file per recipe, any key overridable as key=value.

Every key is a typed field of `Config`; a typo is an error that names the key and suggests close
matches, never a silent default.
"""

import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message says what to change."""


@dataclass
class Config:
    # --- run ---
    phase: str = "phase7"  # which phases/<name> supplies the model, objective and sampler
    out_dir: str = "checkpoints/run"  # run directory: checkpoints, config.yaml, training_log.json
    seed: int = 1337
    device: str = "auto"  # auto | cuda | cpu
    resume: str = ""  # checkpoint to continue from (Make's CHECKPOINT=)
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

    # --- model ---
    vocab_size: int = 32000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (no grouped-query attention)
    ffn_dim: int = 0  # SwiGLU hidden size; 0 = 8/3 * d_model rounded up to a multiple of 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention: str = "triton"  # triton (SDPA where Triton cannot run) | sdpa | eager | flash_attn
    rms_norm: str = "triton"  # triton (PyTorch where Triton cannot run; fuses each block's residual add) | torch

    # --- optimisation ---
    max_steps: int = 1000
    flops_budget: float = 0.0  # >0 sets max_steps = budget / (6 N x tokens per step), N = non-embedding params
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

    # --- masked diffusion (phase mdm) ---
    mdm_eps: float = 1e-3  # noise levels t are drawn from U(mdm_eps, 1)

    # --- switches (the seed's names) ---
    use_mixed_precision: bool = True  # bf16 autocast on CUDA; CPU always runs fp32
    use_gradient_checkpointing: bool = False
    use_flash_attention: bool = True  # false forces attention=sdpa
    use_fused_optimizer: bool = True  # fused AdamW on CUDA
    use_compile: bool = False  # torch.compile each Transformer block (CUDA only)
    fused_cross_entropy: bool = True  # lm_head + cross-entropy in chunks of tokens: never the full logits
    fused_projections: bool = True  # one matmul for q, k, v and one for gate, up (weights concatenated per call)
    memory_mode: bool = False  # bf16 weights, 8-bit AdamW applied inside backward (engine/low_memory.py)

    # --- logging, evaluation, checkpoints ---
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20  # val batches per evaluation (fixed windows, so evals are comparable)
    save_every: int = 2000

    def tokens_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.n_seq

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELD_TYPES = {f.name: f.type for f in fields(Config)}
TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}


def coerce(key: str, value):
    """Convert a YAML or command-line value to the key's declared type, or raise ConfigError."""
    if key not in FIELD_TYPES:
        close = difflib.get_close_matches(key, FIELD_TYPES, n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " Run with print_config=true to list keys."
        raise ConfigError(f"unknown config key '{key}'.{hint}")
    kind = FIELD_TYPES[key]
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


def parse_overrides(args: list[str]) -> dict:
    overrides = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got '{arg}'")
        overrides[key.strip()] = value
    return overrides


def load_config(path: str | None, overrides: dict | list[str] | None = None) -> Config:
    """Defaults < YAML file < overrides, each value type-checked."""
    values = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path} not found (see configs/ for the recipes)")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must be a flat mapping of key: value")
        for key, value in loaded.items():
            try:
                values[key] = coerce(key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        values[key] = coerce(key, value)
    cfg = Config(**values)
    validate(cfg)
    return cfg


def config_from_dict(values: dict) -> Config:
    """Rebuild a config stored in a checkpoint; keys this version no longer knows are dropped."""
    return Config(**{k: v for k, v in values.items() if k in FIELD_TYPES})


def validate(cfg: Config) -> None:
    positive = ["n_seq", "vocab_size", "d_model", "n_layers", "n_heads", "max_steps", "batch_size",
                "gradient_accumulation_steps", "log_every", "eval_every", "save_every", "eval_batches"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {getattr(cfg, key)}")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
    if (cfg.d_model // cfg.n_heads) % 2:
        raise ConfigError("head size d_model/n_heads must be even for RoPE")
    kv_heads = cfg.n_kv_heads or cfg.n_heads
    if cfg.n_heads % kv_heads:
        raise ConfigError(f"n_heads ({cfg.n_heads}) must be divisible by n_kv_heads ({kv_heads})")
    choices = {"attention": ["triton", "sdpa", "eager", "flash_attn"], "rms_norm": ["triton", "torch"],
               "device": ["auto", "cuda", "cpu"],
               "logger": ["json", "wandb"]}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got '{getattr(cfg, key)}'")
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    if cfg.micro_batch_size not in ("", "auto") and not (cfg.micro_batch_size.isdigit() and
                                                         0 < int(cfg.micro_batch_size) and
                                                         per_step % int(cfg.micro_batch_size) == 0):
        raise ConfigError(f"micro_batch_size must be auto or a divisor of batch_size x gradient_accumulation_steps"
                          f" = {per_step}; got '{cfg.micro_batch_size}'")
    if not 0 <= cfg.min_lr <= cfg.learning_rate:
        raise ConfigError(f"min_lr ({cfg.min_lr}) must be between 0 and learning_rate ({cfg.learning_rate})")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
