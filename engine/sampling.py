"""Token sampling shared by every phase's sampler: temperature, top-k, top-p."""

from dataclasses import dataclass

import torch


@dataclass
class SamplingSettings:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1 = off
    max_new_tokens: int = 200
    steps: int = 64  # denoising steps, for diffusion samplers
    eos_id: int | None = None  # stop when sampled (autoregressive samplers)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. logits: (..., V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already cover top_p; the top one always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """One token id per row of logits (..., V)."""
    if settings.temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / settings.temperature, settings.top_k, settings.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(probs.shape[:-1])


def sample_tokens(logits: torch.Tensor, next_logits, settings: SamplingSettings, budget: int,
                  on_token=None) -> list[torch.Tensor]:
    """The autoregressive loop shared by samplers with a cache: sample from `logits` (B, V), hand each token to
    on_token, stop at EOS or after `budget` tokens; next_logits(token (B,)) feeds a token and returns the
    next logits. Returns the tokens sampled."""
    tokens = []
    for _ in range(budget):
        token = sample(logits, settings)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if len(tokens) == budget or (settings.eos_id is not None and bool((token == settings.eos_id).all())):
            break
        logits = next_logits(token)
    return tokens
