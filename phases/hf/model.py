"""Any transformers causal LM as the engine's LanguageModel: loading with one-line errors, and a thin wrapper.

HFCausalLM registers the transformers model's own children (Qwen3ForCausalLM: `model`, `lm_head`) as its
children, so its state_dict keys are transformers' keys: export is save_pretrained of the same weights. `layers`
is the model's own ModuleList of decoder layers, so what the engine applies per block (torch.compile,
checkpointing, FSDP) replaces entries inside the transformers model, which then runs them.
"""

import contextlib
import re
from pathlib import Path

import torch
from torch import nn

from data.hub import hub_reachable
from engine.config import ConfigError
from phases.hf.config import HFConfig, attention_backend, norm_backend
from phases.phase7.model import dense_flops_per_token

HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # owner/name; anything else that is not a folder is a wrong path


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


def load_transformers_model(cfg: HFConfig, attn_implementation: str, init: str | None = None):
    """AutoModelForCausalLM in fp32 (the engine's weights; memory mode makes them bf16), pretrained or fresh
    (seeded by the torch RNG) with cfg.vocab_size ids."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    config = load_hf_config(cfg.model_name)
    if not MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_attention_backend:
        attn_implementation = "sdpa"  # modeling code that does not dispatch through AttentionInterface
    if (init or cfg.init) == "scratch":
        text_config(config).vocab_size = cfg.vocab_size or text_config(config).vocab_size
        with quiet_transformers():
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                    attn_implementation=attn_implementation)

    def load(source, local_files_only):
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch.float32,
                                                        attn_implementation=attn_implementation,
                                                        local_files_only=local_files_only)

    try:
        return from_folder_or_hub(load, cfg.model_name)
    except OSError as e:
        raise ConfigError(f"{cfg.model_name} has a config but no weights that load ({str(e).splitlines()[0][:160]}):"
                          " download the weights, or use init=scratch for its architecture with fresh weights"
                          ) from None


def decoder_layers(model, name: str) -> nn.ModuleList:
    """The base model's ModuleList with one entry per hidden layer (layers in Llama/Qwen, h in GPT-2)."""
    n_layers = text_config(model.config).num_hidden_layers
    for child in model.base_model.children():
        if isinstance(child, nn.ModuleList) and len(child) == n_layers:
            return child
    raise ConfigError(f"cannot find the decoder layers of {name} ({type(model).__name__}): no ModuleList of "
                      f"{n_layers} layers in its base model")


@torch.no_grad()
def logits_are_head_of_hidden(model) -> bool:
    """Whether the model's logits are lm_head(final hidden states) with nothing after (no softcapping or logit
    scale, no bias): then the loss may apply lm_head itself, fused with the cross-entropy. Probed on 4 tokens."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    was_training = model.training
    model.eval()
    ids = torch.arange(4, device=head.weight.device)[None] % head.out_features
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    same = torch.allclose(model(input_ids=ids, use_cache=False).logits, head(hidden), rtol=1e-4, atol=1e-5)
    model.train(was_training)
    return same


class HFCausalLM(nn.Module):
    """phases.LanguageModel around a transformers causal LM (kept in self.hf, not registered: see the module doc)."""

    def __init__(self, model, cfg: HFConfig, attention: str, rms_norm: str, fused_loss: bool):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        # Plain attributes, not registered again (that would repeat their keys in the state_dict):
        self.__dict__["hf"] = model
        self.__dict__["layers"] = decoder_layers(model, cfg.model_name)
        self.__dict__["lm_head"] = model.get_output_embeddings()
        self.__dict__["embedding"] = model.get_input_embeddings()
        self.source, self.init = cfg.model_name, cfg.init
        self.attention, self.rms_norm, self.fused_loss = attention, rms_norm, fused_loss

    def train(self, mode: bool = True):
        super().train(mode)
        self.hf.training = mode  # the unregistered top module's own flag
        return self

    def hidden_states(self, idx, cache=None, start: int = 0):
        """Final-normed hidden states of the base model. Decoding goes through forward() with transformers' cache."""
        if cache is not None:
            raise NotImplementedError("phase hf decodes with transformers' own cache (phases.hf.generate)")
        return self.hf.base_model(input_ids=idx, use_cache=False).last_hidden_state

    def forward(self, idx):
        """The logits exactly as transformers computes them."""
        return self.hf(input_ids=idx, use_cache=False).logits

    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def num_params(self, exclude_embedding: bool = True) -> int:
        """With tied embeddings the input embedding is also the output head, whose matmul every token pays: then
        excluding the embedding keeps it, once."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embedding.weight.numel()
            if self.lm_head.weight is self.embedding.weight:
                n += self.lm_head.weight.numel()
        return n

    def flops_per_token(self, n_seq: int) -> float:
        config = text_config(self.hf.config)
        attention_width = config.num_attention_heads * head_dim(config)  # Qwen3-0.6B: 2048, twice its hidden size
        return dense_flops_per_token(self.num_params(), config.num_hidden_layers, attention_width, n_seq)

    def describe(self) -> str:
        return (f"{self.hf.config.model_type} from {self.source} ({self.init}) | attention {self.attention} | "
                f"rms_norm {self.rms_norm} | cross-entropy {'fused' if self.fused_loss else 'on the full logits'}")


def build(cfg: HFConfig) -> HFCausalLM:
    """The model with our kernels where they run: attention by attn_implementation, RMSNorm by module swap."""
    from phases.hf.extensions import register_attention, replace_rms_norms

    config = text_config(load_hf_config(cfg.model_name))
    attention = attention_backend(cfg, head_dim(config))
    implementation = register_attention() if attention == "triton" else attention
    model = load_transformers_model(cfg, implementation)
    if model.config._attn_implementation != implementation:
        attention = model.config._attn_implementation  # the modeling code cannot take ours
    fused_loss = cfg.fused_cross_entropy and logits_are_head_of_hidden(model)
    if cfg.fused_cross_entropy and not fused_loss:
        print(f"fused_cross_entropy: {cfg.model_name}'s logits are more than lm_head(hidden states) (a bias, a scale "
              "or softcapping), so the loss uses the model's full logits")
    rms_norm = norm_backend(cfg, config.hidden_size)
    if rms_norm == "triton" and not replace_rms_norms(model):
        rms_norm = "torch (no Llama-style RMSNorm modules)"
    return HFCausalLM(model, cfg, attention, rms_norm, fused_loss)

