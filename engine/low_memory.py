"""Memory mode: what lets the 1.44B model (1.44e9 parameters) train in 8 GiB (8.59e9 bytes) of GPU memory.

Bytes per parameter, against 16 for bf16-autocast AdamW with fp32 weights (weights 4, grads 4, states 8):
  bf16 weight, no fp32 master copy ................................ 2  (prepare_model_for_memory_mode)
  AdamW's two states in 8 bits, one fp32 scale per 256 ............ 2.03
  8-bit gradient accumulator, only when accumulating micro-steps .. 1.02
  gradients ....................................................... ~0: each parameter is updated inside
    backward the moment its gradient is complete, and the gradient freed (InBackwardOptimizer)
That is 5.8e9 bytes at 1.44e9 parameters (7.3e9 with accumulation); estimate_memory_mode_bytes adds the
activations and temporaries and says what is left.
"""

import math

import torch
import triton
import triton.language as tl

from kernels.cross_entropy import default_chunk_tokens

BLOCK = 256  # elements per fp32 scale: 1.6% overhead, and an outlier coarsens only its own 256 neighbours
EXPONENT_BIAS = 15  # 8-bit codes span [2**-14, 2) as normals, and subnormals below (see encode)
SIGNED_MANTISSA_BITS = 3  # sign, 4 exponent bits, 3 mantissa bits: exp_avg and the gradient accumulator
UNSIGNED_MANTISSA_BITS = 4  # 4 exponent bits, 4 mantissa bits: sqrt(exp_avg_sq)
CHUNK = 1 << 23  # elements per pass of an update: its half-dozen fp32 temporaries stay at 32 MB each


def _max_code_value(mantissa_bits: int) -> float:
    return 2 - 2.0**-mantissa_bits


def encode(x: torch.Tensor, mantissa_bits: int, signed: bool, noise: torch.Tensor | None = None):
    """Block-wise 8-bit codes of a flat fp32 tensor whose length is a multiple of BLOCK.

    Each block is divided by its absmax / max code value, then each magnitude is rounded to a tiny float
    format: 4 exponent bits (bias 15) and `mantissa_bits` mantissa bits, with subnormals. Such a map keeps the
    *relative* error below 2**-(mantissa_bits + 1) over 15 binades of the block's absmax, which is what
    Adam needs: its update divides by sqrt(v), so a linear 8-bit map, which sends every v below 1/256 of its
    block's largest to zero, makes updates explode (bitsandbytes' dynamic tree map answers the same problem
    with decimal exponents; the binary one here is exact to encode with frexp, with no table search).

    The code index grows monotonically and linearly with the value within a binade, so `position` below
    is a real number whose floor and ceiling are the two neighbouring codes: rounding to nearest adds 0.5,
    stochastic rounding adds noise uniform in [0, 1). Returns (uint8 codes, fp32 scale per block); a block
    holding a NaN or Inf gets a non-finite scale, so all of it decodes non-finite and no NaN is lost.
    """
    blocks = x.view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scales = torch.where(absmax == 0, 1.0, absmax / _max_code_value(mantissa_bits))  # NaN, Inf stay
    magnitude = blocks.abs() / scales[:, None]
    # the binade's exponent; all below the smallest normal (0 included) share it, as subnormals
    exponent = (torch.frexp(magnitude.clamp(min=2.0**-EXPONENT_BIAS)).exponent - 1).clamp(1 - EXPONENT_BIAS, 0)
    position = (exponent + EXPONENT_BIAS - 1) * 2**mantissa_bits + torch.ldexp(magnitude, mantissa_bits - exponent)
    rounded = torch.floor(position + (0.5 if noise is None else noise.view_as(position)))
    codes = rounded.clamp(0, 2 ** (mantissa_bits + 4) - 1).to(torch.uint8)
    if signed:
        codes |= (blocks < 0).to(torch.uint8) << 7
    return codes.view(-1), scales


def decode(codes: torch.Tensor, scales: torch.Tensor, mantissa_bits: int, signed: bool) -> torch.Tensor:
    """The fp32 values of encode's codes."""
    magnitude_codes = (codes & 0x7F if signed else codes).int()
    exponent = magnitude_codes >> mantissa_bits
    mantissa = magnitude_codes & (2**mantissa_bits - 1)
    significand = torch.where(exponent > 0, mantissa + 2**mantissa_bits, mantissa).float()
    values = torch.ldexp(significand, exponent.clamp(min=1) - EXPONENT_BIAS - mantissa_bits)
    if signed:
        values = torch.where(codes >= 0x80, -values, values)
    return (values.view(-1, BLOCK) * scales[:, None]).view(-1)


class BlockQuantized:
    """A flat fp32 vector stored as 8-bit codes with one fp32 scale per BLOCK; read and written in slices
    that start on a block boundary.

    Writes round stochastically, so the value stored is right on average and an exponential moving average
    whose per-step change is below half a code step still moves. Rounding to nearest freezes it instead: in
    a simulation where gradients shrank 10x, nearest-rounded v with beta2 = 0.99 (0.999) was still 13x (3.4x)
    too large 600 steps later, where stochastic rounding stayed within 3%, at the price of element-wise noise
    (std 12% of v at beta2 = 0.95, 36% at 0.999). Nearest rounding, bitsandbytes' choice, works at 0.95.
    """

    def __init__(self, numel: int, signed: bool, device):
        self.signed = signed
        self.mantissa_bits = SIGNED_MANTISSA_BITS if signed else UNSIGNED_MANTISSA_BITS
        n_blocks = -(-numel // BLOCK)
        self.codes = torch.zeros(n_blocks * BLOCK, dtype=torch.uint8, device=device)
        self.scales = torch.ones(n_blocks, device=device)

    def read(self, start: int, end: int) -> torch.Tensor:
        blocks = slice(start // BLOCK, -(-end // BLOCK))
        codes = self.codes[blocks.start * BLOCK:blocks.stop * BLOCK]
        return decode(codes, self.scales[blocks], self.mantissa_bits, self.signed)[:end - start]

    def write(self, start: int, values: torch.Tensor, generator, keep_old: torch.Tensor | None = None) -> None:
        """Store values at start.. unless the device flag keep_old is true."""
        padded = torch.nn.functional.pad(values, (0, -values.numel() % BLOCK))
        noise = torch.rand(padded.shape, device=padded.device, generator=generator)
        codes, scales = encode(padded, self.mantissa_bits, self.signed, noise)
        blocks = slice(start // BLOCK, start // BLOCK + scales.numel())
        old_codes = self.codes[blocks.start * BLOCK:blocks.stop * BLOCK]
        if keep_old is not None:
            codes, scales = torch.where(keep_old, old_codes, codes), torch.where(keep_old, self.scales[blocks], scales)
        old_codes.copy_(codes)
        self.scales[blocks] = scales

    def tensors(self) -> dict:
        return {"codes": self.codes, "scales": self.scales}


class FullPrecision:
    """The same interface over a plain fp32 vector: state_bits=32, to check against torch's AdamW."""

    def __init__(self, numel: int, device):
        self.values = torch.zeros(numel, device=device)

    def read(self, start: int, end: int) -> torch.Tensor:
        return self.values[start:end].clone()

    def write(self, start: int, values: torch.Tensor, generator, keep_old: torch.Tensor | None = None) -> None:
        old = self.values[start:start + values.numel()]
        old.copy_(values if keep_old is None else torch.where(keep_old, old, values))

    def tensors(self) -> dict:
        return {"values": self.values}


# --- The same on CUDA, fused: one program per BLOCK, no fp32 temporaries in memory ---------------------------
# Checked against the PyTorch code above under TRITON_INTERPRET=1 (tests/test_low_memory.py).

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
def _grad_sq_kernel(grad_ptr, acc_codes, acc_scales, out_ptr, n, HAS_ACC: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Per-block sums of squares; summed by torch afterwards, in a fixed order (atomics would not be)."""
    block = tl.program_id(0)
    offsets = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    g = _full_grad(grad_ptr, acc_codes, acc_scales, block, offsets, n, HAS_ACC)
    tl.store(out_ptr + block, tl.sum(g * g, axis=0))


@triton.jit
def _accumulate_kernel(grad_ptr, acc_codes, acc_scales, seed_ptr, n, HAS_ACC: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
    block = tl.program_id(0)
    offsets = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    g = _full_grad(grad_ptr, acc_codes, acc_scales, block, offsets, n, HAS_ACC)
    noise = tl.rand(tl.load(seed_ptr), offsets)
    _encode(g, noise, acc_codes, acc_scales, block, offsets, True, SIGNED_BITS, True)


@triton.jit
def _adamw_kernel(param_ptr, grad_ptr, acc_codes, acc_scales, m_codes, m_scales, s_codes, s_scales, scalars_ptr,
                  seed_ptr, n, decay, beta1, beta2, eps, HAS_ACC: tl.constexpr, STOCHASTIC_BF16: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr):
    """InBackwardOptimizer._update_torch for one block; scalars: clip scale, step size, sqrt of bias
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


def stochastic_round_to_bf16(x: torch.Tensor, generator) -> torch.Tensor:
    """fp32 -> bf16, up or down with probability by distance: unbiased, so an update far below bf16's
    resolution (2**-8 of the weight) still moves the weight on average instead of vanishing.

    Chosen over Kahan-compensated updates, which are exact but need a second 2-byte buffer per parameter
    (2.9e9 bytes here) that the budget has no room for. Adding 16 random bits below bf16's last bit and
    truncating is the rounding; negative numbers work the same since the sign is a separate bit.
    """
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((x.contiguous().view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def prepare_model_for_memory_mode(model: torch.nn.Module) -> torch.nn.Module:
    """Parameters in bf16, with no fp32 master copy: InBackwardOptimizer computes each update in fp32 and
    rounds it stochastically into the bf16 weight. Buffers (RoPE tables) keep their dtype."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


class _ParamState:
    def __init__(self, p: torch.Tensor, quantized: bool):
        n, device = p.numel(), p.device
        self.quantized = quantized
        self.step = torch.zeros((), device=device)  # per parameter: a skipped update does not count
        self.exp_avg = BlockQuantized(n, True, device) if quantized else FullPrecision(n, device)
        # sqrt(v) rather than v: half the dynamic range to cover in 8 bits, and it is what the update uses
        self.exp_avg_sqrt = BlockQuantized(n, False, device) if quantized else FullPrecision(n, device)
        # Last finite step's squared gradient norm; before the first step, as if all gradients were equal
        self.prev_grad_sq = torch.tensor(float(n), device=device)
        self.accumulator = None  # 8-bit sum of the earlier micro-steps' gradients, made on first use
        self.accumulating = False

    def tensors(self) -> dict:
        out = {"step": self.step, "prev_grad_sq": self.prev_grad_sq}
        for name in ("exp_avg", "exp_avg_sqrt"):
            out.update({f"{name}.{k}": v for k, v in getattr(self, name).tensors().items()})
        return out


def _chunks(numel: int):
    for start in range(0, numel, CHUNK):
        yield start, min(start + CHUNK, numel)


class InBackwardOptimizer:
    """AdamW (torch.optim.AdamW's update, decoupled weight decay on matrices only) applied to each parameter
    from a post-accumulate-grad hook, the moment backward completes its gradient; the gradient is then
    freed, so the model's gradients never all exist at once.

    Gradient accumulation over k micro-steps: on micro-steps 0..k-2 the hook only adds the gradient up; on
    the last it steps. Adding up in .grad would keep every parameter's gradient alive between micro-steps
    (2 bytes per parameter in bf16: 2.9e9 bytes, more than the 8 GiB budget has left), so with 8-bit
    states the hook moves it into an 8-bit block-quantized accumulator (1 byte per parameter), rounded
    stochastically so the sum is unbiased; each micro-step adds noise of under one code step (1/16 to 1/8
    of the value), which should be small next to how much micro-batch gradients differ from one another.
    With 32-bit states .grad accumulates as usual, exactly.

    With torch.compile, compile each block rather than the whole model: a compiled backward hands out all
    the gradients of its graph at its end, which would bring back the memory this saves.

    Clipping: the global norm is only known when backward ends, after most updates. Each hook estimates it
    from the tensors seen so far in this step, assuming the others changed by the same factor since the
    last step: estimate^2 = (previous step's total) x (seen now / the same tensors last step). When all
    gradients scale together this is exactly torch's clip_grad_norm_, and the step with a spike is clipped,
    not (as with clipping by the previous step's norm) the normal step after it. A spike in one layer alone
    is clipped too, less exactly: the clipped norm was 0.46x grad_clip for a spike in the last layer (seen
    first, extrapolated to all) and 1.16x for one in the first layer (seen last) in tests/test_low_memory.py.

    Non-finite gradients: a parameter whose gradient has a NaN/Inf keeps its weight and states bit for bit
    (torch.where, no host sync) and does not count the step. end_step returns the exact global norm of the
    step's (unclipped) gradients, non-finite when any was, for the engine's skip-and-count logic;
    `skipped` counts the parameters that kept their values. Nothing here syncs with the host.
    """

    def __init__(self, model: torch.nn.Module, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 grad_clip: float = 0.0, state_bits: int = 8, stochastic_rounding: bool = True, seed: int = 0):
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {state_bits}")
        self.betas, self.eps = betas, eps
        self.weight_decay, self.grad_clip, self.state_bits = weight_decay, grad_clip, state_bits
        self.stochastic_rounding = stochastic_rounding
        self.named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.device = next(iter(self.named.values())).device
        self.generator = torch.Generator(self.device).manual_seed(seed)  # saved: resume replays the rounding
        self.state = {p: _ParamState(p, state_bits == 8) for p in self.named.values()}
        self.use_triton = self.device.type == "cuda" and state_bits == 8  # else the PyTorch code, chunked
        for p in self.named.values():
            p.register_post_accumulate_grad_hook(self._on_grad)
        self.in_step = False

    def begin_step(self, lr: float, accumulation_steps: int = 1) -> None:
        """Before the first micro-step's forward of an optimizer step; lr is this step's learning rate."""
        self.lr, self.accumulation_steps, self.micro = lr, accumulation_steps, 0
        zero = torch.zeros((), device=self.device)
        self.grad_sq, self.seen_grad_sq, self.seen_prev_grad_sq = zero.clone(), zero.clone(), zero.clone()
        self.total_prev_grad_sq = torch.stack([st.prev_grad_sq for st in self.state.values()]).sum()
        self.skipped = torch.zeros((), dtype=torch.int32, device=self.device)
        self.in_step = True

    def begin_micro_step(self, micro: int) -> None:
        """Before micro-step `micro` (0-based)'s backward; the hooks step on the last one."""
        if not 0 <= micro < self.accumulation_steps:
            raise ValueError(f"micro-step {micro} is outside 0..{self.accumulation_steps - 1}")
        self.micro = micro

    def end_step(self) -> torch.Tensor:
        """After the last micro-step's backward. Returns the step's global gradient norm (device tensor)."""
        missed = [name for name, p in self.named.items() if p.grad is not None or self.state[p].accumulating]
        if missed:
            raise RuntimeError(f"no gradient reached {missed[:3]}... on the last micro-step: their earlier "
                               "micro-steps' gradients were never applied")
        self.in_step = False
        return self.grad_sq.sqrt()

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.in_step:
            raise RuntimeError("backward ran outside InBackwardOptimizer.begin_step() ... end_step()")
        st = self.state[p]
        if self.micro < self.accumulation_steps - 1:
            if st.quantized:
                self._accumulate(p.grad.reshape(-1), st)
                p.grad = None
            return
        self._update(p, p.grad.reshape(-1), st)
        p.grad = None

    def _seed(self) -> torch.Tensor:
        return torch.randint(0, 2**31 - 1, (1,), device=self.device, generator=self.generator)

    def _full_grad(self, grad, st, start, end) -> torch.Tensor:
        g = grad[start:end].float()
        return g + st.accumulator.read(start, end) if st.accumulating else g

    def _accumulate(self, grad, st) -> None:
        if st.accumulator is None:
            st.accumulator = BlockQuantized(grad.numel(), True, grad.device)
        acc = st.accumulator
        if self.use_triton:
            _accumulate_kernel[(acc.scales.numel(),)](grad, acc.codes, acc.scales, self._seed(), grad.numel(),
                                                      HAS_ACC=st.accumulating, BLOCK_SIZE=BLOCK)
        else:
            for start, end in _chunks(grad.numel()):
                acc.write(start, self._full_grad(grad, st, start, end), self.generator)
        st.accumulating = True

    def _grad_sq(self, grad, st) -> torch.Tensor:
        if self.use_triton:
            acc = st.accumulator if st.accumulating else st.exp_avg  # a stand-in when there is none
            sums = torch.empty(acc.scales.numel(), device=grad.device)
            _grad_sq_kernel[(sums.numel(),)](grad, acc.codes, acc.scales, sums, grad.numel(),
                                             HAS_ACC=st.accumulating, BLOCK_SIZE=BLOCK)
            return sums.sum()
        return sum(self._full_grad(grad, st, start, end).square().sum() for start, end in _chunks(grad.numel()))

    def _clip_scale(self, st, grad_sq, finite) -> torch.Tensor:
        """min(1, grad_clip / estimated global norm): see the class docstring."""
        if self.grad_clip <= 0:
            return torch.ones((), device=self.device)
        self.seen_grad_sq += torch.where(finite, grad_sq, 0.0)
        self.seen_prev_grad_sq += torch.where(finite, st.prev_grad_sq, 0.0)
        change = torch.where(self.seen_prev_grad_sq > 0, self.seen_grad_sq / self.seen_prev_grad_sq, 1.0)
        estimate = torch.maximum(self.total_prev_grad_sq * change, self.seen_grad_sq).sqrt()
        return (self.grad_clip / (estimate + 1e-6)).clamp(max=1.0)

    def _update(self, p, grad, st) -> None:
        grad_sq = self._grad_sq(grad, st)
        finite = torch.isfinite(grad_sq)
        self.grad_sq += grad_sq
        self.skipped += (~finite).int()
        clip = self._clip_scale(st, grad_sq, finite)
        st.prev_grad_sq = torch.where(finite, grad_sq, st.prev_grad_sq)
        st.step += finite.float()
        step_size = self.lr / (1 - self.betas[0] ** st.step)
        bias_correction2_sqrt = (1 - self.betas[1] ** st.step).sqrt()
        decay = 1 - self.lr * (self.weight_decay if p.ndim >= 2 else 0.0)
        update = self._update_triton if self.use_triton else self._update_torch
        update(p.view(-1), grad, st, clip, step_size, bias_correction2_sqrt, decay, finite)
        st.accumulating = False

    def _update_torch(self, weights, grad, st, clip, step_size, bias_correction2_sqrt, decay, finite) -> None:
        beta1, beta2 = self.betas
        for start, end in _chunks(weights.numel()):
            g = self._full_grad(grad, st, start, end) * clip
            m = st.exp_avg.read(start, end).lerp_(g, 1 - beta1)
            s = st.exp_avg_sqrt.read(start, end).square_().mul_(beta2).addcmul_(g, g, value=1 - beta2).sqrt_()
            w = weights[start:end].float() * decay - step_size * m / (s / bias_correction2_sqrt + self.eps)
            st.exp_avg.write(start, m, self.generator, keep_old=~finite)
            st.exp_avg_sqrt.write(start, s, self.generator, keep_old=~finite)
            weights[start:end] = torch.where(finite, self._round(w, weights.dtype), weights[start:end])

    def _update_triton(self, weights, grad, st, clip, step_size, bias_correction2_sqrt, decay, finite) -> None:
        acc = st.accumulator if st.accumulating else st.exp_avg  # a stand-in when there is none
        scalars = torch.stack([clip, step_size, bias_correction2_sqrt, finite.float()])
        m, s = st.exp_avg, st.exp_avg_sqrt
        _adamw_kernel[(m.scales.numel(),)](
            weights, grad, acc.codes, acc.scales, m.codes, m.scales, s.codes, s.scales, scalars, self._seed(),
            weights.numel(), decay, self.betas[0], self.betas[1], self.eps, HAS_ACC=st.accumulating,
            STOCHASTIC_BF16=weights.dtype == torch.bfloat16 and self.stochastic_rounding, BLOCK_SIZE=BLOCK)

    def _round(self, w: torch.Tensor, dtype) -> torch.Tensor:
        if dtype == torch.bfloat16 and self.stochastic_rounding:
            return stochastic_round_to_bf16(w, self.generator)
        return w.to(dtype)

    def state_dict(self) -> dict:
        """Tensors and plain values only (torch.load(weights_only=True) reads it); keyed by parameter name."""
        return {"state_bits": self.state_bits, "generator": self.generator.get_state(),
                "params": {name: self.state[p].tensors() for name, p in self.named.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["state_bits"] != self.state_bits or state["params"].keys() != self.named.keys():
            raise ValueError("optimizer state is for other parameters or another state_bits")
        for name, p in self.named.items():
            st = self.state[p]
            for key, tensor in st.tensors().items():
                tensor.copy_(state["params"][name][key])
        self.generator.set_state(state["generator"])


def estimate_memory_mode_bytes(n_params: int, largest_param: int, d_model: int, n_layers: int, ffn_dim: int,
                               vocab_size: int, n_seq: int, batch_size: int = 1, accumulation_steps: int = 1,
                               budget: int = 8 * 2**30) -> dict:
    """Bytes on the GPU at the peak of a memory-mode step on CUDA (the Triton update, which keeps no fp32
    temporaries), by item, with `total` and `left` (of `budget`).

    Activations assume gradient checkpointing per block (one bf16 (B, S, d) input kept per block, one block's
    internals alive while it is recomputed and backpropagated, taken as twice its saved tensors) and the
    fused cross-entropy (one chunk of logits). Not counted: the CUDA context (~0.5 GB, outside PyTorch's
    allocator), cuBLAS workspaces and allocator fragmentation, which `left` must cover.

    The 1.44B model (1.4398e9 parameters; largest the 32000 x 2048 embedding; d 2048, 24 layers, SwiGLU 6144,
    S = 1024): weights 2.88e9 + 8-bit states 2.93e9 = 5.81e9 bytes. At micro-batch 1 without accumulation
    the peak is ~6.5e9, leaving 2.07e9 (1.9 GiB); that is room for micro-batch 4 to 6 without accumulation
    (1.3e9 to 0.8e9 left). Accumulating 16 micro-steps of 1 adds the 1.46e9 accumulator: ~8.0e9, leaving 0.6e9
    for the allocator's slack (fine when PyTorch's allocator is what counts; not on an 8 GB card, where the
    CUDA context takes most of it).
    """
    tokens = batch_size * n_seq
    blocks = math.ceil(n_params / BLOCK)
    items = {
        "weights_bf16": 2 * n_params,
        "adamw_states_8bit": 2 * (n_params + 4 * blocks),
        "grad_accumulator_8bit": (n_params + 4 * blocks) if accumulation_steps > 1 else 0,
        # the lm_head gradient (made in the loss's forward, applied in backward) and the one being applied
        "live_gradients": 2 * vocab_size * d_model + 2 * largest_param,
        "checkpointed_block_inputs": 2 * n_layers * tokens * d_model,
        "one_block_recomputed": 2 * 2 * tokens * (6 * d_model + 4 * ffn_dim),
        # a chunk's fp32 logits next to their bf16 copy (before the upcast, and after the gradient's downcast)
        "cross_entropy_chunk": min(tokens, default_chunk_tokens(vocab_size)) * vocab_size * (4 + 2),
    }
    items["total"] = sum(items.values())
    items["left"] = budget - items["total"]
    return items
