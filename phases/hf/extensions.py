"""Our kernels inside a transformers model through its own extension points, with no fork of modeling code:

- attention: a function registered with transformers' AttentionInterface (and SDPA's mask builder with its
  AttentionMaskInterface), chosen with attn_implementation=ATTENTION. It runs kernels/attention.py when the mask
  builder found nothing to mask beyond causality, and transformers' SDPA function otherwise (padding masks,
  decoding against a cache, dropout, CPU).
- RMSNorm: each module whose class name ends in RMSNorm (Qwen3's q_norm and k_norm included) is replaced by
  KernelRMSNorm, holding the same weight Parameter (state_dict keys do not change), once a probe has shown that
  the class computes Llama's RMSNorm: Gemma's (1 + weight) and other variants keep their own module.
"""

import copy

import torch
from torch import nn

from kernels.support import ATTENTION_HEAD_DIMS, RMS_NORM_MAX_HIDDEN, interpreter_requested

# The attn_implementation name of our attention; without "flash" in it, which transformers reads as a hub kernel
ATTENTION = "llm_triton"
# Keyword arguments that change the attention itself (Gemma 2's softcap, T5's position bias, attention sinks): SDPA's
# path, which knows them or refuses them, handles these.
UNSUPPORTED = ("softcap", "position_bias", "s_aux", "sinks")


def kernel_runs_on(t: torch.Tensor) -> bool:
    """CUDA tensors; CPU tensors only under Triton's interpreter (the tests)."""
    return t.is_cuda or interpreter_requested()


def flash_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function signature: query (B, H, S, D), key and value (B, H_kv, S_k, D), the
    mask from the registered mask builder; returns ((B, S, H, D), no attention weights), as SDPA's does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    usable = (attention_mask is None and query.shape[2] == key.shape[2] and not (dropout and module.training)
              and query.shape[-1] in ATTENTION_HEAD_DIMS and value.shape[-1] == query.shape[-1]
              and not any(kwargs.get(name) is not None for name in UNSUPPORTED)
              and not kwargs.get("output_attentions") and kernel_runs_on(query))
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    from kernels.attention import flash_attention

    # The mask builder returns None when causality (or nothing) is all there is to mask; SDPA's rule for is_causal.
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True)) and query.shape[2] > 1
    device = query.device.type
    # Under autocast SDPA would run in the autocast dtype; a model may hand over fp32 q, k (after an fp32 norm) with
    # a bf16 v, so all three are cast as SDPA's autocast rule would.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    # (B, H, S, D) views of (B, S, H, D) projections: the transpose back is free. Grouped kv heads go in as they are.
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (query, key, value))
    return flash_attention(q, k, v, causal=causal, softmax_scale=scaling), None


def register_attention() -> str:
    """Make attn_implementation=ATTENTION known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, flash_attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # None where causality is all: our kernel's case
    return ATTENTION


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back to x's dtype, scale: kernels/norm.py's rounding (and its CPU fallback here,
    where importing kernels.norm would need triton)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class KernelRMSNorm(nn.Module):
    """A model's RMSNorm module with the same weight and eps, run by kernels/norm.py where Triton runs."""

    def __init__(self, weight: nn.Parameter, eps: float, replaces: str):
        super().__init__()
        self.weight, self.eps, self.replaces = weight, eps, replaces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_runs_on(x):
            from kernels.norm import rms_norm
            return rms_norm(x, self.weight, self.eps)
        return llama_rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, in place of {self.replaces}"


def rms_norm_eps(module: nn.Module) -> float | None:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))  # Llama/Qwen/Mistral; Olmo, Gemma
    return float(eps) if isinstance(eps, (int, float)) else None


@torch.no_grad()
def computes_llama_rms_norm(module: nn.Module) -> bool:
    """Whether this module's class computes llama_rms_norm, output dtype included: probed on a copy with a random
    weight, in fp32 and bf16, from a private generator (the run's RNG stream is left as it was)."""
    weight, eps = getattr(module, "weight", None), rms_norm_eps(module)
    if not isinstance(weight, nn.Parameter) or weight.ndim != 1 or eps is None:
        return False
    with torch.device("cpu"):  # also for a module on the meta device (a model built to be sharded)
        return probe_is_llama_rms_norm(copy.deepcopy(module).to_empty(device="cpu").float(), eps)


def probe_is_llama_rms_norm(probe: nn.Module, eps: float) -> bool:
    generator = torch.Generator().manual_seed(0)
    probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, probe.weight.shape[0], generator=generator).to(dtype)
        try:
            out, expected = probe(x), llama_rms_norm(x, probe.weight, eps)
        except Exception:  # a norm with another call signature (e.g. a residual argument) is not this one
            return False
        if out.dtype != expected.dtype or not torch.allclose(out.float(), expected.float(), rtol=1e-3, atol=1e-3):
            return False
    return True


def replace_rms_norms(model: nn.Module) -> int:
    """Swap each RMSNorm module that computes Llama's RMSNorm for KernelRMSNorm; returns how many were swapped."""
    verdict: dict[type, bool] = {}
    swapped = 0
    for name, module in list(model.named_modules()):
        cls = type(module)
        if not cls.__name__.endswith("RMSNorm") or isinstance(module, KernelRMSNorm):
            continue
        if cls not in verdict:
            verdict[cls] = computes_llama_rms_norm(module)
        if not verdict[cls] or module.weight.shape[0] > RMS_NORM_MAX_HIDDEN:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, KernelRMSNorm(module.weight, rms_norm_eps(module), cls.__name__))
        swapped += 1
    return swapped
