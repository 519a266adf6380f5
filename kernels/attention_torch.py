"""Attention in plain PyTorch: the definition the Triton kernels (kernels/attention.py) are tested against, in
flash_attn_func's layout (batch, seq, heads, head_dim). Never imports triton, so it works where Triton is not
installed.
"""

import torch


def check_inputs(q, k, v, causal):
    """Shapes every form needs, as ValueErrors that say what is wrong (the kernels add dtype and head_dim checks)."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"q, k, v must be (batch, seq, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k, v {tuple(k.shape)}, {tuple(v.shape)} do not match "
                         "(k and v must have q's batch and head_dim, and a number of heads that divides q's)")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many keys as queries; got {q.shape[1]} and {k.shape[1]}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError("empty sequence")


def attention_reference(q, k, v, causal=True, softmax_scale=None):
    """flash_attention's attention in plain PyTorch, computed in float32 (float64 for float64 inputs), in q's
    dtype."""
    check_inputs(q, k, v, causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    compute = torch.promote_types(q.dtype, torch.float32)
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q_, k_, v_ = (t.transpose(1, 2).to(compute) for t in (q, k, v))
    scores = (q_ @ k_.transpose(-2, -1)) * scale
    if causal:
        n = q.shape[1]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return (scores.softmax(-1) @ v_).transpose(1, 2).to(q.dtype)
