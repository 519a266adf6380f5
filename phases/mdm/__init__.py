"""Masked diffusion LM (SMDM / MDLM absorbing-state diffusion) on phase 7's blocks, run without the causal mask.

Forward process: each token of a sequence becomes the mask token (id = vocab_size) with probability t.
The bidirectional Transformer predicts the originals; the objective is MDLM's continuous-time bound

    loss = sum over masked positions of CE / t, divided by (batch x sequence length)

an upper bound on the negative log-likelihood per token (its exp bounds the perplexity), so the engine's
loss and val loss read on the same scale as phase 7's next-token loss.
The model never predicts the mask token: its output head row is left out of every softmax (MDLM's "zero
masking probabilities"), which is the same as giving it a logit of -inf.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config import ConfigError
from kernels.cross_entropy import linear_cross_entropy
from phases import Phase
from phases.mdm.likelihood import DiffusionScorer
from phases.mdm.sampler import generate, mask_id, token_weight
from phases.phase7 import schedule_curvature
from phases.phase7.config import SHAPE_KEYS, Phase7Config, model_args
from phases.phase7.model import Transformer

IGNORE = -100  # cross-entropy target of a position that stays visible: it adds nothing to the loss
EVAL_LEVELS = 8  # noise levels in the fixed evaluation grid
EVAL_SEED = 0  # masks at evaluation come from this seed, so every evaluation scores the same corruption


@dataclass
class MDMConfig(Phase7Config):
    mdm_eps: float = 1e-3  # noise levels t are drawn from U(mdm_eps, 1)

    def check(self) -> None:
        super().check()
        if not 0 < self.mdm_eps < 1:
            raise ConfigError(f"mdm_eps must be in (0, 1); got {self.mdm_eps}")


def build_model(cfg: MDMConfig) -> Transformer:
    """Phase 7's Transformer, bidirectional, with one extra embedding row for the mask token."""
    return Transformer(model_args(cfg, causal=False, vocab_size=cfg.vocab_size + 1))


def noise_levels(batch: int, eps: float, device) -> torch.Tensor:
    """t_i = eps + (1 - eps) * ((u + i / batch) mod 1): one draw per stratum of [eps, 1], so every batch
    spans all noise levels and the loss has lower variance than with independent draws."""
    u = (torch.rand((), device=device) + torch.arange(batch, device=device) / batch) % 1
    return eps + (1 - eps) * u


def corrupt(tokens: torch.Tensor, t: torch.Tensor, mask_id: int, generator=None):
    """Absorbing-state forward process: token j of row i becomes mask_id with probability t[i].
    Returns (noisy tokens, bool mask of the positions that were masked)."""
    masked = torch.rand(tokens.shape, device=tokens.device, generator=generator) < t[:, None]
    return torch.where(masked, mask_id, tokens), masked


def diffusion_bound(model: Transformer, tokens: torch.Tensor, t: torch.Tensor, generator=None,
                    fused: bool = True) -> torch.Tensor:
    """The bound for clean tokens (B, S) at per-row noise levels t (B,).

    Visible positions get target IGNORE instead of being indexed out, so shapes stay static and the
    step needs no host sync. The fused lm_head + cross-entropy (config fused_cross_entropy) never holds the
    (tokens x vocab) logits; its softmax runs in fp32. Without it, the plain way, as phase 7's.
    """
    noisy, masked = corrupt(tokens, t, mask_id(model), generator)
    hidden = model.hidden_states(noisy).flatten(0, 1)
    targets = torch.where(masked, tokens, IGNORE).flatten()
    weights = (1 / t)[:, None].expand_as(tokens).flatten()
    if fused:
        nll = linear_cross_entropy(hidden, token_weight(model), targets, weights, ignore_index=IGNORE,
                                   reduction="sum")
    else:
        logits = F.linear(hidden, token_weight(model)).float()
        nll = (F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none") * weights).sum()
    return nll / tokens.numel()


def diffusion_loss(model: Transformer, batch: torch.Tensor, cfg: MDMConfig) -> torch.Tensor:
    """Training loss on the first n_seq tokens of each window; noise from torch's global RNG (resumable)."""
    tokens = batch[:, :-1]
    t = noise_levels(tokens.shape[0], cfg.mdm_eps, tokens.device)
    return diffusion_bound(model, tokens, t, fused=cfg.fused_cross_entropy)


def eval_diffusion_loss(model: Transformer, batch: torch.Tensor, cfg: MDMConfig) -> torch.Tensor:
    """The bound by the midpoint rule over a fixed grid of noise levels, with masks from a fixed seed:
    the same weights and data always give the same value, whatever the global RNG state."""
    tokens = batch[:, :-1]
    eps = cfg.mdm_eps
    generator = torch.Generator(device=tokens.device).manual_seed(EVAL_SEED)
    total = torch.zeros((), device=tokens.device)
    for k in range(EVAL_LEVELS):
        t = torch.full((tokens.shape[0],), eps + (1 - eps) * (k + 0.5) / EVAL_LEVELS, device=tokens.device)
        total += diffusion_bound(model, tokens, t, generator, fused=cfg.fused_cross_entropy)
    return total / EVAL_LEVELS


PHASE = Phase(name="mdm", build_model=build_model, loss=diffusion_loss, generate=generate,
              eval_loss=eval_diffusion_loss, config=MDMConfig, shape_keys=SHAPE_KEYS, scorer=DiffusionScorer,
              on_step=schedule_curvature)
