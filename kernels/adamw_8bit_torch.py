"""The 8-bit block-quantized format of memory mode's optimizer states, in PyTorch: the reference that the Triton
kernels (kernels/adamw_8bit.py) are tested against, and what runs where Triton does not (CPU, 32-bit states)."""

import torch

BLOCK = 256  # elements per fp32 scale: 1.6% overhead, and an outlier coarsens only its own 256 neighbours
EXPONENT_BIAS = 15  # 8-bit codes span [2**-14, 2) as normals, and subnormals below (see encode)
SIGNED_MANTISSA_BITS = 3  # sign, 4 exponent bits, 3 mantissa bits: exp_avg and the gradient accumulator
UNSIGNED_MANTISSA_BITS = 4  # 4 exponent bits, 4 mantissa bits: sqrt(exp_avg_sq)


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


def stochastic_round_to_bf16(x: torch.Tensor, generator) -> torch.Tensor:
    """fp32 -> bf16, up or down with probability by distance: unbiased, so an update far below bf16's
    resolution (2**-8 of the weight) still moves the weight on average instead of vanishing.

    Chosen over Kahan-compensated updates, which are exact but need a second 2-byte buffer per parameter
    (2.9e9 bytes here) that the budget has no room for. Adding 16 random bits below bf16's last bit and
    truncating is the rounding; negative numbers work the same since the sign is a separate bit.
    """
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((x.contiguous().view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)
