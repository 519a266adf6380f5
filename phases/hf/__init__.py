"""Phase hf: any transformers causal LM (Qwen3-0.6B by default), pretrained or from scratch, on the engine.

The model is transformers' own (AutoModelForCausalLM, no fork of its modeling code); our kernels go in through
its extension points (phases/hf/extensions.py), the loss is our chunked linear cross-entropy on its hidden
states, and the engine compiles and checkpoints its decoder layers one by one. Export: phases/hf/export.py.
"""

import inspect

import torch
import torch.nn.functional as F

from engine.sampling import SamplingSettings, sample_tokens
from kernels.cross_entropy import linear_cross_entropy
from phases import Phase
from phases.hf.config import SHAPE_KEYS, HFConfig, fill_from_model, text_config
from phases.hf.model import HFCausalLM, build


def build_model(cfg: HFConfig) -> HFCausalLM:
    fill_from_model(cfg)  # a no-op for a config that was filled already (a run's, a checkpoint's)
    return build(cfg)


def next_token_loss(model: HFCausalLM, batch: torch.Tensor, cfg: HFConfig) -> torch.Tensor:
    """Mean cross-entropy of batch[:, 1:] given batch[:, :-1]. Fused: lm_head applied chunk by chunk inside the
    loss, never the (tokens x vocab) logits (151,936 columns for Qwen3); else transformers' own logits."""
    ids, targets = batch[:, :-1], batch[:, 1:].flatten()
    if model.fused_loss:
        return linear_cross_entropy(model.hidden_states(ids).flatten(0, 1), model.output_weight(), targets)
    return F.cross_entropy(model(ids).flatten(0, 1).float(), targets)


def decode(model: HFCausalLM, ids: torch.Tensor, cache) -> torch.Tensor:
    """The last position's logits of ids, appended to transformers' KV cache (`cache`; `past_key_values` before
    transformers 5.2x)."""
    forward = model.hf.forward
    keyword = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    return model.hf(input_ids=ids, use_cache=True, **{keyword: cache}).logits[:, -1]


@torch.no_grad()
def generate(model: HFCausalLM, prompt: torch.Tensor, settings: SamplingSettings, on_token=None) -> torch.Tensor:
    """Autoregressive sampling with transformers' DynamicCache. prompt: (1, T). Returns the new ids (1, N)."""
    from transformers import DynamicCache

    max_len = getattr(text_config(model.hf.config), "max_position_embeddings", None) or 1 << 20
    budget = min(settings.max_new_tokens, max_len - 1)
    prompt = prompt[:, -(max_len - budget):]  # keep the prompt's tail when it would not fit
    cache = DynamicCache(config=model.hf.config)
    new_ids = sample_tokens(decode(model, prompt, cache), lambda token: decode(model, token[:, None], cache),
                            settings, budget, on_token)
    return torch.stack(new_ids, dim=1) if new_ids else prompt[:, :0]


PHASE = Phase(name="hf", build_model=build_model, loss=next_token_loss, generate=generate, config=HFConfig,
              shape_keys=SHAPE_KEYS, resolve_config=fill_from_model)
