"""Phase hf's config keys: which transformers causal LM to train, from which weights, through which kernels; and
the two engine keys that follow the model (tokenizer, vocab_size), filled when a run starts."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from engine.config import Config, ConfigError, choose
from kernels.support import ATTENTION_HEAD_DIMS, RMS_NORM_MAX_HIDDEN, triton_available

SHAPE_KEYS = ("model_name", "vocab_size")  # the architecture comes with the model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class HFConfig(Config):
    # --- model ---
    model_name: str = "Qwen/Qwen3-0.6B"  # a local folder (config.json [+ weights]) or a hub name (offline: if cached)
    init: str = "pretrained"  # pretrained: the folder's weights | scratch: its architecture with fresh weights
    attention: str = "triton"  # triton (transformers' SDPA where Triton cannot run or a mask is needed) | sdpa | eager
    rms_norm: str = "triton"  # triton: the model's RMSNorm modules run kernels/norm.py on CUDA | torch: as shipped

    # --- objective ---
    fused_cross_entropy: bool = True  # lm_head + cross-entropy in chunks of tokens: never the full logits

    # --- the engine's data keys, here following the model ---
    tokenizer: str = ""  # "" = the model's own (model_name), when it has one
    vocab_size: int = 0  # 0 = the model's; with init=scratch another size builds the architecture with it

    def check(self) -> None:
        # vocab_size 0 is filled from the model when the run starts (fill_from_model): the engine's checks, which
        # want it > 0, look at a copy that holds a placeholder instead.
        Config.check(dataclasses.replace(self, vocab_size=self.vocab_size or 1))
        if not self.model_name:
            raise ConfigError("model_name is empty: give a local model folder or a hub name, e.g. Qwen/Qwen3-0.6B")
        choose(self, "init", ["pretrained", "scratch"])
        choose(self, "attention", ["triton", "sdpa", "eager"])
        choose(self, "rms_norm", ["triton", "torch"])


def fill_from_model(cfg: HFConfig) -> None:
    """tokenizer "" becomes model_name, vocab_size 0 the model's vocabulary. Reads the model's config (not its
    weights), so a missing model fails here, before any data is tokenized. Idempotent."""
    from phases.hf.model import load_hf_config, text_config

    model_vocab = text_config(load_hf_config(cfg.model_name)).vocab_size
    if not cfg.tokenizer and has_tokenizer(cfg.model_name):
        cfg.tokenizer = cfg.model_name
    if cfg.vocab_size == 0:
        cfg.vocab_size = model_vocab
    elif cfg.init == "pretrained" and cfg.vocab_size != model_vocab:
        raise ConfigError(f"vocab_size={cfg.vocab_size}, but the pretrained weights of {cfg.model_name} have "
                          f"{model_vocab} token ids: leave vocab_size unset (the model's), or use init=scratch to "
                          "train the architecture with another vocabulary")


def has_tokenizer(model_name: str) -> bool:
    """A hub model has its tokenizer; a local folder may hold only config.json (then transformers would build an
    empty tokenizer from the model type, so the tokenizer stays unset and what needs one asks for tokenizer=)."""
    folder = Path(model_name).expanduser()
    return not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES)


def attention_backend(cfg: HFConfig, head_dim: int) -> str:
    """attention=triton runs our kernel where it can (CUDA, triton installed, a head size it compiles for)."""
    if cfg.attention == "triton":
        return "triton" if triton_available() and head_dim in ATTENTION_HEAD_DIMS else "sdpa"
    return cfg.attention


def norm_backend(cfg: HFConfig, hidden_size: int) -> str:
    fits = hidden_size <= RMS_NORM_MAX_HIDDEN
    return "triton" if cfg.rms_norm == "triton" and triton_available() and fits else "torch"
