"""Hyperbolic attention (phase 7's attention_geometry=hyperbolic): the math, the curvature schedule and the PyTorch
reference of the Triton kernel in kernels/attention.py. Never imports triton, so the CPU fallback runs anywhere.

Choices, after Gulcehre et al., "Hyperbolic Attention Networks" (ICLR 2019, arXiv 2018) and later Lorentz-model
Transformers (HypFormer, Yang et al., KDD 2024; Chen et al., "Fully Hyperbolic Neural Networks", ACL 2022):
- Model: the hyperboloid (Lorentz model) of curvature -c, {x = (x0, x_s) : <x, x>_L = -1/c, x0 > 0}, with
  <x, y>_L = -x0 y0 + x_s . y_s: on a tile of queries and keys that is the ordinary dot product plus a rank-1
  term, which is what lets the score live inside a FlashAttention tile.
- Where the map happens: queries and keys (after RoPE, per head) are tangent vectors at the origin o = (1/sqrt(c), 0)
  and go onto the hyperboloid by the exponential map there, x_s = sinh(sqrt(c)|v|) v / (sqrt(c)|v|),
  x0 = cosh(sqrt(c)|v|) / sqrt(c). Gulcehre et al. place activations by pseudo-polar coordinates (cosh r, sinh r u),
  u a unit direction and r from a learned function: the same point as the exp map of r u at c = 1; here r is the
  projection's own norm, so no extra parameters. Values stay Euclidean (the ordinary weighted sum, not the paper's
  Einstein midpoint): the block's output goes back into a Euclidean residual stream anyway.
- Score: -beta * d_c(q, k) - gamma, d_c = arcosh(-c <q, k>_L) / sqrt(c), as in Gulcehre et al. gamma shifts every
  score of a row by the same amount, so under softmax it cancels exactly: we have no gamma (it would be a
  parameter with zero gradient); it would only matter to an unnormalised (sigmoid) attention, which we do not have.
  beta is learned per query head, beta = exp(log_beta), log_beta starting at 0; it plays softmax_scale's part.
- Curvature: per kv head (keys live on one hyperboloid, and with grouped-query attention a group of query heads
  shares their keys), c_h = schedule(step) * exp(log_curvature_h) when curvature_learned (log_curvature starting
  at 0), else c_h = schedule(step): the schedule (curvature_schedule from curvature_start to curvature over
  curvature_warmup_steps) scales a learned per-head factor, so a schedule and learning combine and both keep c > 0.
  The schedule is a pure function of the step, like the learning rate, so resuming replays it exactly.
- Numerical guards: arcosh'(z) = 1/sqrt(z^2 - 1) is infinite at z = 1 (q = k) and z is rounded from a difference
  of products that grow as cosh^2 of the tangent norms, so (1) sqrt(c)|v| is clipped to MAX_TANGENT_NORM before the
  map (feature clipping, Guo et al., CVPR 2022): x0 stays below cosh(MAX_TANGENT_NORM) / sqrt(c) and z's rounding
  error small; (2) z is clamped to at least 1 + Z_EPS c, so d_c >= ~sqrt(2 Z_EPS) and the gradient through
  arcosh is bounded (zero on the clamped side, as for any clamp). The clamp is 1 + Z_EPS c rather than 1 + Z_EPS so
  that the distance floor, about sqrt(2 Z_EPS), does not grow as c shrinks (z - 1 is about c d^2 / 2).
"""

import math

import torch

MAX_TANGENT_NORM = 4.0  # sqrt(c)|v| is clipped to this: x0 <= cosh(4) / sqrt(c) ~ 27 / sqrt(c), z <= cosh(8) ~ 1490
# z = -c <q, k>_L >= 1 + Z_EPS c, i.e. d_c >= ~sqrt(2 Z_EPS) = 0.014 whatever c; at c = 1 and the clipped radius,
# fp32 rounds z to ~4e-5. (Below c ~ 1e-3, fp32 cannot resolve z - 1 ~ c d^2 / 2 at all: keep c above that.)
Z_EPS = 1e-4
SCHEDULES = ("constant", "linear", "cosine")


def curvature_at(step: int, schedule: str, start: float, end: float, warmup_steps: int) -> float:
    """The scheduled curvature at a step (steps count from 1, as lr_at's): constant is `end` throughout; linear
    and cosine go from `start` at step 0 to `end` at warmup_steps and stay there."""
    if schedule == "constant" or step >= warmup_steps:
        return end
    progress = step / warmup_steps
    if schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def expmap0(v: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponential map at the hyperboloid's origin of tangent vectors v (..., heads, D), curvature c of shape
    (heads,): (x_s in v's dtype, x0 (..., heads) in float32 at least). sqrt(c)|v| is clipped to MAX_TANGENT_NORM
    (x_s = sinh(r) v / (sqrt(c)|v|) with r the clipped norm), and sinh(r)/r is 1 + r^2/6 near 0 (no 0/0)."""
    compute = torch.promote_types(v.dtype, torch.float32)
    v32, sqrt_c = v.to(compute), c.to(compute).sqrt()
    r_raw = sqrt_c * v32.norm(dim=-1)
    r = r_raw.clamp(max=MAX_TANGENT_NORM)
    small = r_raw < 1e-3
    ratio = torch.where(small, 1 + r_raw * r_raw / 6, torch.sinh(r) / torch.where(small, 1.0, r_raw))
    return (ratio[..., None] * v32).to(v.dtype), torch.cosh(r) / sqrt_c


def hyperbolic_scores(q_s, k_s, q0, k0, curvature, beta):
    """-beta d_c(q, k) for points on the hyperboloid, heads first: q_s (B, H, n_q, D), k_s (B, H, n_k, D), q0, k0
    (B, H, n), curvature and beta (H,) (per query head here). The Lorentz product is one matmul of (q_s, q0) with
    (k_s, -k0): the dot product plus the rank-1 term. arcosh(max(z, 1 + Z_EPS c)) as in the kernel."""
    c, beta = curvature[:, None, None], beta[:, None, None]
    lorentz = torch.cat([q_s, q0[..., None]], -1) @ torch.cat([k_s, -k0[..., None]], -1).transpose(-2, -1)
    floor = 1 + Z_EPS * c.detach()  # as in the kernel, no gradient flows through the clamp's bound
    return torch.acosh(torch.maximum(-c * lorentz, floor)) * (-beta / c.sqrt())


def hyperbolic_attention_reference(q_s, k_s, q0, k0, v, curvature, beta, causal=True, mask=None):
    """softmax(-beta d_c(q, k)) v in plain PyTorch, in the kernel's layout: q_s (B, n_q, H, D), k_s and v
    (B, n_k, H_kv, D), q0 (B, n_q, H), k0 (B, n_k, H_kv) on the hyperboloid (expmap0), curvature (H_kv,), beta
    (H,). mask (n_q, n_k), True = attend, overrides causal (cached decoding). Computed in float32 (float64 for
    float64 inputs), returned in q_s's dtype; differentiable in all of them."""
    compute = torch.promote_types(q_s.dtype, torch.float32)
    group = q_s.shape[2] // k_s.shape[2]
    k_s, v, k0 = (t.repeat_interleave(group, dim=2) for t in (k_s, v, k0))
    q_, k_, v_ = (t.transpose(1, 2).to(compute) for t in (q_s, k_s, v))
    q0_, k0_ = (t.transpose(1, 2).to(compute) for t in (q0, k0))
    scores = hyperbolic_scores(q_, k_, q0_, k0_, curvature.to(compute).repeat_interleave(group), beta.to(compute))
    if mask is None and causal:
        mask = torch.ones(q_s.shape[1], k_s.shape[1], dtype=torch.bool, device=q_s.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v_).transpose(1, 2).to(q_s.dtype)
