"""Phase hf's config keys: which transformers causal LM to train, from which weights, through which kernels; the
two engine keys that follow the model (tokenizer, vocab_size), filled when a run starts; and the model's own
transformers config, read from a local folder or the hub with one-line errors."""

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from data.hub import hub_reachable
from engine.config import Config, ConfigError, choose
from kernels.support import ATTENTION_HEAD_DIMS, RMS_NORM_MAX_HIDDEN, triton_available

SHAPE_KEYS = ("model_name", "vocab_size")  # the architecture comes with the model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # owner/name; anything else that is not a folder is a wrong path


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


def attention_backend(cfg: HFConfig, head_size: int) -> str:
    """attention=triton runs our kernel where it can (CUDA, triton installed, a head size it compiles for)."""
    if cfg.attention == "triton":
        return "triton" if triton_available() and head_size in ATTENTION_HEAD_DIMS else "sdpa"
    return cfg.attention


def norm_backend(cfg: HFConfig, hidden_size: int) -> str:
    fits = hidden_size <= RMS_NORM_MAX_HIDDEN
    return "triton" if cfg.rms_norm == "triton" and triton_available() and fits else "torch"


def text_config(config):
    """The language model's config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars or load reports: the run header says what was loaded."""
    from transformers.utils import logging

    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def not_cached(name: str) -> ConfigError:
    folder = f"/models/{name.rstrip('/').split('/')[-1]}"
    return ConfigError(f"model_name={name} is no local folder and is not in the Hugging Face cache, and the hub "
                       f"cannot be reached from here: download it where there is internet with `hf download {name} "
                       f"--local-dir {folder}`, copy that folder here, and set model_name={folder}")


def local_folder(name: str) -> Path | None:
    """The model folder model_name names, or None for a hub name; ConfigError for a path that is no model folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {name} has no config.json: point model_name at a folder written by "
                              "save_pretrained or `hf download`")
        return path
    if path.exists():
        raise ConfigError(f"model_name={name} is a file: give the folder that holds its config.json")
    if not HUB_NAME.fullmatch(name):
        raise ConfigError(f"model folder {name} not found: give an existing folder with config.json, or a hub name "
                          "such as Qwen/Qwen3-0.6B")
    return None


def from_folder_or_hub(load, name: str):
    """load(source, local_files_only): a local folder as it is; a hub name from the cache first (no network
    wait when it is there), then from the hub if it answers."""
    folder = local_folder(name)
    if folder is not None:
        return load(str(folder), True)
    try:
        return load(name, True)
    except OSError:
        if not hub_reachable():
            raise not_cached(name) from None
    return load(name, False)


def check_causal_lm(config, name: str) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    decoder_only = not getattr(config, "is_encoder_decoder", False) and getattr(config, "is_decoder", True)
    if not decoder_only or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"{name} is a '{config.model_type}' model ({type(config).__name__}), not a causal LM that "
                          "AutoModelForCausalLM can train: give a decoder-only model, e.g. Qwen/Qwen3-0.6B")


def load_hf_config(name: str):
    """The model's transformers config; ConfigError (one line) for a missing folder, an uncached hub name without
    network, a config transformers cannot read, or a model that is not a causal LM."""
    from transformers import AutoConfig

    def load(source, local_files_only):
        with quiet_transformers():
            return AutoConfig.from_pretrained(source, local_files_only=local_files_only)

    try:
        config = from_folder_or_hub(load, name)
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"cannot read the config of {name} ({str(e).splitlines()[0][:160]})") from None
    except ValueError as e:  # e.g. a model_type this transformers does not know
        raise ConfigError(f"transformers cannot build {name}: {str(e).splitlines()[0][:200]}") from None
    check_causal_lm(config, name)
    return config
