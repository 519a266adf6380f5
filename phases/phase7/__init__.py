"""Phase 7: dense Llama-style causal LM, next-token objective, KV-cache sampler."""

import torch
import torch.nn.functional as F

from engine.sampling import SamplingSettings, sample_tokens
from kernels.cross_entropy import linear_cross_entropy
from phases import Phase
from phases.phase7.config import SHAPE_KEYS, Phase7Config, model_args, scheduled_curvature
from phases.phase7.model import Attention, Transformer


def build_model(cfg: Phase7Config) -> Transformer:
    return Transformer(model_args(cfg, causal=True))


def next_token_loss(model: Transformer, batch: torch.Tensor, cfg: Phase7Config) -> torch.Tensor:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1]; with fused_cross_entropy the
    (tokens x vocab) logits never exist at once (kernels/cross_entropy.py)."""
    hidden = model.hidden_states(batch[:, :-1]).flatten(0, 1)
    targets = batch[:, 1:].flatten()
    weight = model.output_weight()
    if cfg.fused_cross_entropy:
        return linear_cross_entropy(hidden, weight, targets)
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


@torch.no_grad()
def schedule_curvature(model: Transformer, step: int, cfg: Phase7Config) -> None:
    """Phase.on_step: hyperbolic attention layers take the curvature schedule's value at this step (a buffer
    saved with the weights, so evaluation, chat and a resumed run see the value of the checkpoint's step)."""
    if cfg.attention_geometry == "hyperbolic":
        value = scheduled_curvature(cfg, step)
        for module in model.modules():
            if isinstance(module, Attention):
                module.curvature_scale.fill_(value)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, settings: SamplingSettings, on_token=None):
    """Autoregressive sampling with a KV cache. prompt: (1, T). Returns the new ids (1, N)."""
    max_len = model.args.max_seq_len
    budget = min(settings.max_new_tokens, max_len - 1)
    prompt = prompt[:, -(max_len - budget):]  # keep the prompt's tail when it would not fit
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + budget)
    head = model.output_weight()  # once per call: a tied TT head is materialised here, not at every token
    position = prompt.shape[1]

    def next_logits(token):
        nonlocal position
        logits = F.linear(model.hidden_states(token[:, None], cache=cache, start=position)[:, -1], head)
        position += 1
        return logits

    first = F.linear(model.hidden_states(prompt, cache=cache, start=0)[:, -1], head)
    new_ids = sample_tokens(first, next_logits, settings, budget, on_token)
    return torch.stack(new_ids, dim=1) if new_ids else prompt[:, :0]


PHASE = Phase(name="phase7", build_model=build_model, loss=next_token_loss, generate=generate,
              config=Phase7Config, shape_keys=SHAPE_KEYS,
              on_step=schedule_curvature)
