"""Shared kernels, each beside the plain PyTorch reference that the tests compare it with:

    kernels.flash_attention(q, k, v, causal=True, softmax_scale=None,   Triton, kernels/attention.py
                            deterministic=False)
    kernels.attention_reference(q, k, v, causal, softmax_scale)         PyTorch, kernels/attention_torch.py
    kernels.hyperbolic_flash_attention(q_s, k_s, q0, k0, v, curvature,  Triton, kernels/attention.py
                                       beta, causal=True)
    kernels.hyperbolic_attention_reference, expmap0, curvature_at       PyTorch, kernels/hyperbolic.py
    kernels.rms_norm(x, weight, eps), kernels.rms_norm_residual(...)     Triton, kernels/norm.py
    kernels.rms_norm_reference, rms_norm_residual_reference              PyTorch, kernels/norm_torch.py
    kernels.linear_cross_entropy(hidden, weight, targets, ...)           PyTorch, kernels/cross_entropy.py
    from kernels.linear_attention import linear_attention                Triton, kernels/linear_attention.py
    (imported from its module: a package attribute of that name would be the module once it is imported)
    kernels.linear_attention_reference, _chunked_torch, _step            PyTorch, kernels/linear_attention_torch.py
    memory mode's 8-bit AdamW (kernels/adamw_8bit.py, Triton) is tested against kernels/adamw_8bit_torch.py.
    kernels/support.py: where the kernels run (the one reader of TRITON_INTERPRET) and their launch helpers.

Names are loaded on first use: importing the package never imports triton, so the pure-PyTorch pieces work
where Triton is not installed, and tests can switch Triton's interpreter on before any kernel is defined.
"""

import importlib

_MODULE_OF = {
    "flash_attention": "attention", "attention_reference": "attention_torch", "triton_available": "support",
    "hyperbolic_flash_attention": "attention", "hyperbolic_attention_reference": "hyperbolic",
    "expmap0": "hyperbolic", "curvature_at": "hyperbolic",
    "rms_norm": "norm", "rms_norm_residual": "norm", "rms_norm_reference": "norm_torch",
    "rms_norm_residual_reference": "norm_torch",
    "linear_cross_entropy": "cross_entropy", "linear_cross_entropy_reference": "cross_entropy",
    "linear_attention_reference": "linear_attention_torch", "linear_attention_chunked_torch": "linear_attention_torch",
    "linear_attention_step": "linear_attention_torch",
}


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'kernels' has no attribute '{name}'")
    return getattr(importlib.import_module(f"kernels.{_MODULE_OF[name]}"), name)


def __dir__():
    return sorted(_MODULE_OF)
