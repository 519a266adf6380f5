"""Memory mode's codec and AdamW update in Triton, fused: one program per BLOCK, no fp32 temporaries in memory.

The plain PyTorch reference is kernels/adamw_8bit_torch.py (the 8-bit format, which owns its constants) and
engine/memory_mode/optimizer.py (the update); checked against them under TRITON_INTERPRET=1
(tests/test_memory_mode.py). Imported by engine/memory_mode/optimizer.py only for its Triton path (CUDA by
default), so memory mode runs without triton.
"""

import triton
import triton.language as tl

from kernels.adamw_8bit_torch import EXPONENT_BIAS, SIGNED_MANTISSA_BITS, UNSIGNED_MANTISSA_BITS

_BIAS: tl.constexpr = tl.constexpr(EXPONENT_BIAS)
SIGNED_BITS: tl.constexpr = tl.constexpr(SIGNED_MANTISSA_BITS)
UNSIGNED_BITS: tl.constexpr = tl.constexpr(UNSIGNED_MANTISSA_BITS)


@triton.jit
def _pow2(k):
    """2.0**k, exactly, for an int32 k in fp32's normal range."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _decode(codes_ptr, scales_ptr, block, offsets, MANTISSA_BITS: tl.constexpr, SIGNED: tl.constexpr):
    codes = tl.load(codes_ptr + offsets).to(tl.int32)
    magnitude = codes & 0x7F if SIGNED else codes
    exponent = magnitude >> MANTISSA_BITS
    mantissa = magnitude & (2**MANTISSA_BITS - 1)
    significand = tl.where(exponent > 0, mantissa + 2**MANTISSA_BITS, mantissa).to(tl.float32)
    values = significand * _pow2(tl.maximum(exponent, 1) - _BIAS - MANTISSA_BITS) * tl.load(scales_ptr + block)
    return tl.where(codes >= 0x80, -values, values) if SIGNED else values


@triton.jit
def _encode(x, noise, codes_ptr, scales_ptr, block, offsets, store, MANTISSA_BITS: tl.constexpr,
            SIGNED: tl.constexpr):
    """encode() for one block; a block holding NaN/Inf gets a NaN scale, so it decodes non-finite."""
    absmax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(absmax > 0, absmax / (2.0 - 1.0 / 2**MANTISSA_BITS), 1.0)
    scale = tl.where(tl.max(((x - x) != 0).to(tl.int32), axis=0) > 0, float("nan"), scale)
    magnitude = tl.abs(x) / scale
    exponent = ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.minimum(tl.maximum(exponent, 1 - _BIAS), 0)
    position = (exponent + _BIAS - 1) * 2**MANTISSA_BITS + magnitude * _pow2(-exponent + MANTISSA_BITS)
    codes = tl.minimum((position + noise).to(tl.int32), 2 ** (MANTISSA_BITS + 4) - 1)
    if SIGNED:
        codes = codes | ((x < 0).to(tl.int32) << 7)
    tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=tl.where(store, offsets >= 0, False))
    tl.store(scales_ptr + block, scale, mask=store)


@triton.jit
def _full_grad(grad_ptr, acc_codes, acc_scales, block, offsets, n, HAS_ACC: tl.constexpr):
    g = tl.load(grad_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    if HAS_ACC:
        g += _decode(acc_codes, acc_scales, block, offsets, SIGNED_BITS, True)
    return g


@triton.jit
def grad_sq_kernel(grad_ptr, acc_codes, acc_scales, out_ptr, n, HAS_ACC: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Per-block sums of squares; summed by torch afterwards, in a fixed order (atomics would not be)."""
    block = tl.program_id(0)
    offsets = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    g = _full_grad(grad_ptr, acc_codes, acc_scales, block, offsets, n, HAS_ACC)
    tl.store(out_ptr + block, tl.sum(g * g, axis=0))


@triton.jit
def accumulate_kernel(grad_ptr, acc_codes, acc_scales, seed_ptr, n, HAS_ACC: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
    block = tl.program_id(0)
    offsets = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    g = _full_grad(grad_ptr, acc_codes, acc_scales, block, offsets, n, HAS_ACC)
    noise = tl.rand(tl.load(seed_ptr), offsets)
    _encode(g, noise, acc_codes, acc_scales, block, offsets, True, SIGNED_BITS, True)


@triton.jit
def adamw_kernel(param_ptr, grad_ptr, acc_codes, acc_scales, m_codes, m_scales, s_codes, s_scales, scalars_ptr,
                  seed_ptr, n, decay, beta1, beta2, eps, HAS_ACC: tl.constexpr, STOCHASTIC_BF16: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr):
    """optimizer.InBackwardOptimizer._update_torch for one block; scalars: clip scale, step size, sqrt of bias
    correction 2, finite flag (device values, so no host sync)."""
    block = tl.program_id(0)
    offsets = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_range = offsets < n
    clip, step_size = tl.load(scalars_ptr), tl.load(scalars_ptr + 1)
    bias_correction2_sqrt, store = tl.load(scalars_ptr + 2), tl.load(scalars_ptr + 3) != 0
    g = _full_grad(grad_ptr, acc_codes, acc_scales, block, offsets, n, HAS_ACC) * clip
    m = _decode(m_codes, m_scales, block, offsets, SIGNED_BITS, True)
    m = m + (1 - beta1) * (g - m)
    s = _decode(s_codes, s_scales, block, offsets, UNSIGNED_BITS, False)
    s = tl.sqrt(beta2 * s * s + (1 - beta2) * g * g)
    w = tl.load(param_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    w = w * decay - step_size * m / (s / bias_correction2_sqrt + eps)
    noise_m, noise_s, noise_w, _ = tl.rand4x(tl.load(seed_ptr), offsets)
    _encode(m, noise_m, m_codes, m_scales, block, offsets, store, SIGNED_BITS, True)
    _encode(s, noise_s, s_codes, s_scales, block, offsets, store, UNSIGNED_BITS, False)
    if STOCHASTIC_BF16:
        bits = w.to(tl.int32, bitcast=True) + (noise_w * 65536).to(tl.int32)
        w = (bits & -65536).to(tl.float32, bitcast=True)
    tl.store(param_ptr + offsets, w.to(param_ptr.dtype.element_ty), mask=tl.where(store, in_range, False))
