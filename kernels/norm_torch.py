"""Llama's RMSNorm in plain PyTorch: the definition the Triton kernels (kernels/norm.py) are tested against. Never
imports triton.
"""

import torch


def rms_norm_reference(x, weight, eps=1e-6):
    """Llama's RMSNorm: normalise in fp32 (fp64 for fp64 input), cast to x's dtype, multiply by the weight."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    return (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rms_norm_residual_reference(x, residual, weight, eps=1e-6):
    """rms_norm_residual's reference: (the norm of x + residual, x + residual)."""
    total = x + residual
    return rms_norm_reference(total, weight, eps), total
