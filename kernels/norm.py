"""RMSNorm in Triton with Llama's rounding: normalise in fp32, cast to the input dtype, then scale by the weight.

Forward: one program per row (the whole row in registers, BLOCK = next_power_of_2(hidden)); it saves 1/rms per
row so backward does not reduce again. Backward: each program owns a run of rows and steps through it a few rows
at a time (one cross-warp reduction and one round of loads for all of them), writes their dx and one fp32
partial sum of dweight; the partials are summed afterwards (deterministic, no atomics). Folding that sum into the
kernel (the last program to finish adds up the others) would put megabytes on one SM, slower than the sum.
rms_norm_residual also adds the residual first and returns the sum, saving a pass over the tensor.
The output dtype follows PyTorch's promotion of input and weight, as the reference's `normed * weight` does (the
plain PyTorch reference is in kernels/norm_torch.py).
"""

import torch
import triton
import triton.language as tl

from kernels.support import RMS_NORM_MAX_HIDDEN as MAX_BLOCK, check_device, is_interpreted

STEP_ELEMENTS = 16384  # a backward step's rows x BLOCK: 32 fp32 values per thread per tile at the warps chosen


@triton.jit
def _rms_norm_fwd(X, RES, W, Y, SUM, RSTD, stride_x, stride_res, stride_y, stride_sum, N, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < N
    x = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0)
    if HAS_RESIDUAL:  # round the sum to the input dtype first: it is what the caller gets back and normalises
        x = (x.to(tl.float32) + tl.load(RES + row * stride_res + cols, mask=in_row, other=0.0).to(tl.float32))
        x = x.to(SUM.dtype.element_ty)
        tl.store(SUM + row * stride_sum + cols, x, mask=in_row)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    normed = (x * rstd).to(SUM.dtype.element_ty).to(tl.float32)  # SUM is X itself without a residual
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=in_row)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DSUM, DX, DW_PARTIAL, stride_dy, stride_x, stride_dsum, stride_dx,
                  n_rows, rows_per_program, N, HAS_DSUM: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """dx = rstd * (dy*w - x_hat * mean(dy*w * x_hat)) (+ the residual sum's gradient); dweight = sum dy * normed.
    ROWS rows per step, the weight loaded once per program."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    in_row = cols < N
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, ROWS):
        rows = (start + tl.arange(0, ROWS)).to(tl.int64)
        row_ok = rows < last
        mask = row_ok[:, None] & in_row[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x.to(tl.float32) * rstd[:, None]
        dw += tl.sum(dy * x_hat.to(X.dtype.element_ty).to(tl.float32), 0)  # the weight multiplied the rounded value
        dn = dy * w[None, :]
        dx = rstd[:, None] * (dn - x_hat * (tl.sum(dn * x_hat, 1) / N)[:, None])
        if HAS_DSUM:
            dx += tl.load(DSUM + rows[:, None] * stride_dsum + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=in_row)


# Whether Triton decorated the kernels for its CPU interpreter (TRITON_INTERPRET=1 at import) or for a GPU.
INTERPRETED = is_interpreted(_rms_norm_fwd)


def _launch_settings(n):
    """(BLOCK, num_warps) for rows of n: ~8 to 16 elements per thread at 2k to 8k."""
    block = triton.next_power_of_2(n)
    if block > MAX_BLOCK:
        raise ValueError(f"rms_norm keeps a row in registers, which fits hidden sizes up to {MAX_BLOCK}; got {n} "
                         "(use the PyTorch RMSNorm)")
    return block, min(16, max(4, block // 256))


def rows_per_step(n):
    """Rows of n that backward handles at once: 4 up to 4k, 2 at 8k, 1 at 16k."""
    return max(1, min(4, STEP_ELEMENTS // triton.next_power_of_2(n)))


def _rows(t, n):
    """(rows, n) view with unit stride along the hidden dim, copying only if needed."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_forward(x, residual, weight, eps):
    """(y, total, rstd): total is what got normalised (x, or x + residual) as (rows, n), rstd its 1/rms per row."""
    n = x.shape[-1]
    x2, weight = _rows(x, n), weight.contiguous()
    res2 = _rows(residual, n) if residual is not None else x2
    total = x2 if residual is None else torch.empty(x2.shape, dtype=_sum_dtype(x, residual), device=x.device)
    y = torch.empty(x2.shape, dtype=torch.promote_types(total.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    block, warps = _launch_settings(n)
    _rms_norm_fwd[(x2.shape[0],)](x2, res2, weight, y, total, rstd, x2.stride(0), res2.stride(0), y.stride(0),
                                  total.stride(0), n, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                  num_warps=warps)
    return y.view(*x.shape[:-1], n), total, rstd


def _processor_count(device):
    """SMs on CUDA (enough programs to fill them, few dweight partials); a handful in the interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


# Forward and backward are torch.library custom ops: torch.compile keeps a block that calls them in one graph and
# runs the kernels as they are. An op's outputs may not alias its inputs, hence x2 is not returned by _forward.

@torch.library.custom_op("kernels::rms_norm_forward", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _launch_forward(x, None, weight, eps)
    return y, rstd


@_forward.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), _fake_rstd(x)


@torch.library.custom_op("kernels::rms_norm_residual_forward", mutates_args=())
def _forward_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, total, rstd = _launch_forward(x, residual, weight, eps)
    return y, total.view(x.shape), rstd


@_forward_residual.register_fake
def _(x, residual, weight, eps):
    total_dtype = _sum_dtype(x, residual)
    return (x.new_empty(x.shape, dtype=torch.promote_types(total_dtype, weight.dtype)),
            x.new_empty(x.shape, dtype=total_dtype), _fake_rstd(x))


def _sum_dtype(x, residual):
    """x + residual's dtype: a bf16 block output added to an fp32 residual stream stays fp32."""
    return torch.promote_types(x.dtype, residual.dtype)


def _fake_rstd(x):
    return x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("kernels::rms_norm_backward", mutates_args=())
def _backward(dy: torch.Tensor, total: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
              dsum: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight); dsum, the gradient reaching x + residual directly, is added to dx."""
    n = total.shape[-1]
    total2, dy2 = _rows(total, n), _rows(dy, n)
    weight, rstd = weight.contiguous(), rstd.contiguous()  # indexed as flat vectors
    dsum2 = _rows(dsum, n) if dsum is not None else dy2
    dx = torch.empty_like(total2)
    n_rows = total2.shape[0]
    step = rows_per_step(n)
    programs = max(1, min(n_rows, 4 * _processor_count(total.device)))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), step) * step  # whole steps but the very last
    programs = triton.cdiv(n_rows, rows_per_program)
    partial = torch.empty((programs, n), dtype=torch.float32, device=total.device)
    block, warps = _launch_settings(n)
    _rms_norm_bwd[(programs,)](dy2, total2, weight, rstd, dsum2, dx, partial, dy2.stride(0), total2.stride(0),
                               dsum2.stride(0), dx.stride(0), n_rows, rows_per_program, n,
                               HAS_DSUM=dsum is not None, BLOCK=block, ROWS=step, num_warps=warps)
    return dx.view(total.shape), partial.sum(0).to(weight.dtype)


@_backward.register_fake
def _(dy, total, weight, rstd, dsum):
    return total.new_empty(total.shape), weight.new_empty(weight.shape)


def _save_norm(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _norm_gradients(ctx, dy, _rstd_grad):
    x, weight, rstd = ctx.saved_tensors
    return *_backward(dy, x, weight, rstd, None), None


def _save_norm_residual(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[2], output[2])
    ctx.x_dtype = inputs[0].dtype


def _norm_residual_gradients(ctx, dy, dsum, _rstd_grad):
    total, weight, rstd = ctx.saved_tensors
    dx, dweight = _backward(dy, total, weight, rstd, dsum)
    return dx.to(ctx.x_dtype), dx, dweight, None


_forward.register_autograd(_norm_gradients, setup_context=_save_norm)
_forward_residual.register_autograd(_norm_residual_gradients, setup_context=_save_norm_residual)


def _check(x, weight):
    check_device("rms_norm", x, INTERPRETED)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},); got {tuple(weight.shape)}")
    _launch_settings(x.shape[-1])  # rejects hidden sizes too wide for a row in registers


def rms_norm(x, weight, eps=1e-6):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; x fp16/bf16/fp32 of any leading shape."""
    _check(x, weight)
    return _forward(x, weight, eps)[0]


def rms_norm_residual(x, residual, weight, eps=1e-6):
    """(rms_norm(x + residual), x + residual) in one pass: a pre-norm block's residual add and next norm.

    The sum takes the wider of the two dtypes (a bf16 block output joins an fp32 residual stream in fp32) and is
    normalised as the reference normalises x."""
    _check(x, weight)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape: {tuple(residual.shape)} vs {tuple(x.shape)}")
    y, total, _ = _forward_residual(x, residual, weight, eps)
    return y, total
