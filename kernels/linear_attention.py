"""Gated linear attention in Triton: causal attention with a fixed-size state and a decay per head and position.

    linear_attention(q, k, v, g, scale=None, initial_state=None, output_final_state=False) -> o, or (o, final_state)

and, in plain PyTorch in kernels/linear_attention_torch.py (importable where Triton is not installed):
    linear_attention_reference(...)        the same, as the plain recurrent loop (float32; float64 for float64)
    linear_attention_chunked_torch(...)    the same, chunked as the kernels do it: the CPU path for training
    linear_attention_step(q, k, v, g, state=None, scale=None) -> (o, new_state)   one decoding token

q, k: (batch, seq, heads, key_dim); v: (batch, seq, heads, value_dim); g: (batch, seq, heads), the log of the decay
alpha_t in (0, 1], so g <= 0 (a model makes it with e.g. -softplus). The state is (batch, heads, key_dim,
value_dim) in float32:
    S_t = exp(g_t) * S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t,    S_{-1} = initial_state (zeros if None).
This is GLA / Mamba-2 / Gated DeltaNet without the delta rule. Gradients reach q, k, v, g and initial_state.

The kernels work on chunks of CHUNK positions. Within a chunk, b is the cumulative sum of g, and
    o_i = scale * (q_i exp(b_i)) h_c + scale * sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j,
where h_c is the state when the chunk starts. Every exponent is <= 0, so strong decay underflows to 0 and never
overflows. Forward is two kernels: one walks the chunks in order and writes every h_c, parallel over (key block,
value block, batch*head); one computes each chunk's outputs, parallel over (value block, chunk, batch*head), so the
heavy matmuls fill the GPU even at batch 1. Backward recomputes the states (keeping them would cost
chunks * key_dim * value_dim per head and layer), walks the chunks in reverse for the state gradients dh, then
computes each chunk's dq and dk in one parallel kernel and its dv in another.
For a scalar decay, dL/dg_t = sum_{s >= t} (q_s . dq_s - k_s . dk_s) + sum(final_state * d final_state): exp(G)
scales q and exp(-G) scales k for G the cumulative log decay, and the final state is exp(G_last) times a sum.
No atomics, so gradients are deterministic.

Kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), fp16/bf16/fp32 (bf16 is the training dtype;
fp32 multiplies in full fp32 for checks, and is slow), key and value dims in HEAD_DIMS, any length. Forward and
backward are torch.library custom ops, so torch.compile keeps them whole.
"""

import torch
import triton
import triton.language as tl

from kernels.linear_attention_torch import CHUNK, check_inputs
from kernels.support import (DTYPES, LINEAR_ATTENTION_HEAD_DIMS as HEAD_DIMS, check_device, dot_precision,
                             interpreter_requested, is_interpreted, strides, unit_last_stride)


def _configs(names, gpu, interpreted):
    """Autotune configs from (*block sizes named by names, num_warps, num_stages) tuples. Asked when the kernels
    below are decorated, as Triton does: the interpreter runs every autotune candidate slowly, so it gets one small
    config that still splits test-size heads into several blocks."""
    choices = [interpreted] if interpreter_requested() else gpu
    return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in choices]


def _fit_blocks(configs, named_args, **kwargs):
    """Clip block sizes to the head dims (a 64-wide block of a 32-wide head would read past it), dropping repeats."""
    dims = {"BLOCK_K": kwargs["KEY_DIM"], "BLOCK_V": kwargs["VALUE_DIM"]}
    fitted = {}
    for c in configs:
        blocks = {name: min(size, dims[name]) for name, size in c.kwargs.items()}
        fitted.setdefault((*blocks.values(), c.num_warps, c.num_stages),
                          triton.Config(blocks, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(fitted.values())


# The state kernels are a sequential walk over the chunks: their programs, (key_dim/BLOCK_K) * (value_dim/BLOCK_V)
# * batch * heads, must cover the SMs (64 with 64x64 blocks at 16 heads of 128, 128 with 64x32, 256 with 32x32),
# and each step is latency-bound, hence small blocks and few warps. The chunk kernels hold a whole chunk's q and k
# (64 x key_dim). Few candidates: each costs a compile and a benchmark on a device lent for minutes.
# `make aot-check` (sm_90, bf16, key and value dims 128): nothing here spills on Triton 3.6 or 3.9; dq/dk's 4-warp
# (32, 4, 2), dropped, spilled 300 B on 3.6 and 432 B on 3.9 (its three fp32 accumulators).
STATE_CONFIGS = _configs(("BLOCK_K", "BLOCK_V"), [(64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 2, 3)], (16, 16, 4, 1))
OUTPUT_CONFIGS = _configs(("BLOCK_V",), [(64, 4, 2), (128, 8, 2), (32, 4, 3)], (16, 4, 1))
GRAD_CONFIGS = _configs(("BLOCK_V",), [(64, 8, 2), (32, 8, 3)], (16, 4, 1))
# Lengths in powers of two, so a new length does not re-tune; Triton adds the tensors' dtypes.
TUNE_KEY = ["BH", "LENGTH_BUCKET", "KEY_DIM", "VALUE_DIM"]
PRUNE = {"early_config_prune": _fit_blocks}


@triton.jit
def _chunk_decay(G, stride_gs, rows, T, CHUNK: tl.constexpr):
    """(b, b_last): the cumulative log decay at each row of the chunk, in fp32 (rows past T add 0), and at its end."""
    g = tl.load(G + rows * stride_gs, mask=rows < T, other=0.0).to(tl.float32)
    b = tl.cumsum(g, 0)
    b_last = tl.sum(tl.where(tl.arange(0, CHUNK) == CHUNK - 1, b, 0.0), 0)
    return b, b_last


@triton.jit
def _causal_decay(b, CHUNK: tl.constexpr):
    """exp(b_i - b_j) where key j may reach query i (j <= i), else 0; masked before exp, so it is never above 1."""
    offs = tl.arange(0, CHUNK)
    return tl.exp(tl.where(offs[:, None] >= offs[None, :], b[:, None] - b[None, :], float("-inf")))


@triton.autotune(configs=STATE_CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _chunk_states(K, V, G, H0, HS, HT, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  stride_gb, stride_gs, stride_gh, T, NH, BH, LENGTH_BUCKET,
                  KEY_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, CHUNK: tl.constexpr, HAS_INITIAL: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """HS[bh, c] = the state when chunk c starts, HT = the state after the last; one (key, value) block each."""
    bh = tl.program_id(2)
    b, h = (bh // NH).to(tl.int64), (bh % NH).to(tl.int64)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    G += b * stride_gb + h * stride_gh
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, CHUNK)
    block = offs_k[:, None] * VALUE_DIM + offs_v[None, :]
    n_chunks = tl.cdiv(T, CHUNK)
    HS += bh.to(tl.int64) * n_chunks * KEY_DIM * VALUE_DIM
    if HAS_INITIAL:
        state = tl.load(H0 + bh.to(tl.int64) * KEY_DIM * VALUE_DIM + block).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_V], tl.float32)
    for c in range(n_chunks):
        tl.store(HS + c * KEY_DIM * VALUE_DIM + block, state.to(HS.dtype.element_ty))
        rows = c * CHUNK + offs_c
        in_seq = (rows < T)[:, None]
        k = tl.load(K + rows[:, None] * stride_ks + offs_k[None, :], mask=in_seq, other=0.0)
        v = tl.load(V + rows[:, None] * stride_vs + offs_v[None, :], mask=in_seq, other=0.0)
        b_c, b_last = _chunk_decay(G, stride_gs, rows, T, CHUNK)
        k_to_end = (k * tl.exp(b_last - b_c)[:, None]).to(v.dtype)
        state = tl.dot(tl.trans(k_to_end), v, state * tl.exp(b_last), input_precision=PRECISION)
    tl.store(HT + bh.to(tl.int64) * KEY_DIM * VALUE_DIM + block, state)


# Whether Triton decorated the kernels for its CPU interpreter (TRITON_INTERPRET=1 at import) or for a GPU.
INTERPRETED = is_interpreted(_chunk_states)


@triton.autotune(configs=OUTPUT_CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _chunk_output(Q, K, V, G, HS, O, scale, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                  stride_vb, stride_vs, stride_vh, stride_gb, stride_gs, stride_gh, stride_ob, stride_os, stride_oh,
                  T, NH, BH, LENGTH_BUCKET, KEY_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, CHUNK: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_V: tl.constexpr):
    """One chunk's outputs for one value block: the state's part plus the masked, decayed attention inside it."""
    c, bh = tl.program_id(1), tl.program_id(2)
    b, h = (bh // NH).to(tl.int64), (bh % NH).to(tl.int64)
    rows = c * CHUNK + tl.arange(0, CHUNK)
    offs_k = tl.arange(0, KEY_DIM)
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_seq = (rows < T)[:, None]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_k[None, :], mask=in_seq, other=0.0)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_ks + offs_k[None, :], mask=in_seq, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vs + offs_v[None, :], mask=in_seq, other=0.0)
    b_c, _ = _chunk_decay(G + b * stride_gb + h * stride_gh, stride_gs, rows, T, CHUNK)
    state = tl.load(HS + (bh.to(tl.int64) * tl.num_programs(1) + c) * KEY_DIM * VALUE_DIM
                    + offs_k[:, None] * VALUE_DIM + offs_v[None, :])
    o = tl.dot((q * tl.exp(b_c)[:, None]).to(state.dtype), state, input_precision=PRECISION)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * _causal_decay(b_c, CHUNK)
    o = tl.dot(scores.to(v.dtype), v, o, input_precision=PRECISION)
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_v[None, :],
             (o * scale).to(O.dtype.element_ty), mask=in_seq)


@triton.autotune(configs=STATE_CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _chunk_state_grads(Q, G, DO, DHT, DHS, DH0, scale, stride_qb, stride_qs, stride_qh, stride_gb, stride_gs,
                       stride_gh, stride_dob, stride_dos, stride_doh, T, NH, BH, LENGTH_BUCKET,
                       KEY_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """DHS[bh, c] = the gradient of the state when chunk c ends, from the last chunk back; DH0 = the initial one's.

    Going back over chunk c: dh <- exp(b_last) dh + scale * (q exp(b))^T dO, the transpose of the forward step."""
    bh = tl.program_id(2)
    b, h = (bh // NH).to(tl.int64), (bh % NH).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    G += b * stride_gb + h * stride_gh
    DO += b * stride_dob + h * stride_doh
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, CHUNK)
    block = offs_k[:, None] * VALUE_DIM + offs_v[None, :]
    n_chunks = tl.cdiv(T, CHUNK)
    DHS += bh.to(tl.int64) * n_chunks * KEY_DIM * VALUE_DIM
    dstate = tl.load(DHT + bh.to(tl.int64) * KEY_DIM * VALUE_DIM + block).to(tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        tl.store(DHS + c * KEY_DIM * VALUE_DIM + block, dstate.to(DHS.dtype.element_ty))
        rows = c * CHUNK + offs_c
        in_seq = (rows < T)[:, None]
        q = tl.load(Q + rows[:, None] * stride_qs + offs_k[None, :], mask=in_seq, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dos + offs_v[None, :], mask=in_seq, other=0.0)
        b_c, b_last = _chunk_decay(G, stride_gs, rows, T, CHUNK)
        q_from_start = (q * (scale * tl.exp(b_c))[:, None]).to(do.dtype)
        dstate = tl.dot(tl.trans(q_from_start), do, dstate * tl.exp(b_last), input_precision=PRECISION)
    tl.store(DH0 + bh.to(tl.int64) * KEY_DIM * VALUE_DIM + block, dstate)


@triton.autotune(configs=OUTPUT_CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _chunk_dv(Q, K, G, DO, DHS, DV, scale, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
              stride_gb, stride_gs, stride_gh, stride_dob, stride_dos, stride_doh, stride_dvb, stride_dvs, stride_dvh,
              T, NH, BH, LENGTH_BUCKET, KEY_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, CHUNK: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_V: tl.constexpr):
    """One chunk's dv for one value block, the output kernel transposed: scores^T dO plus, since each k^T v
    reaches the chunk's end state decayed, exp(b_last - b) k dh."""
    c, bh = tl.program_id(1), tl.program_id(2)
    b, h = (bh // NH).to(tl.int64), (bh % NH).to(tl.int64)
    rows = c * CHUNK + tl.arange(0, CHUNK)
    offs_k = tl.arange(0, KEY_DIM)
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_seq = (rows < T)[:, None]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_k[None, :], mask=in_seq, other=0.0)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_ks + offs_k[None, :], mask=in_seq, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_v[None, :], mask=in_seq,
                 other=0.0)
    b_c, b_last = _chunk_decay(G + b * stride_gb + h * stride_gh, stride_gs, rows, T, CHUNK)
    dstate = tl.load(DHS + (bh.to(tl.int64) * tl.num_programs(1) + c) * KEY_DIM * VALUE_DIM
                     + offs_k[:, None] * VALUE_DIM + offs_v[None, :])
    dv = tl.dot(k.to(dstate.dtype), dstate, input_precision=PRECISION) * tl.exp(b_last - b_c)[:, None]
    scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * tl.trans(_causal_decay(b_c, CHUNK)) * scale
    dv = tl.dot(scores_t.to(do.dtype), do, dv, input_precision=PRECISION)
    tl.store(DV + b * stride_dvb + h * stride_dvh + rows[:, None] * stride_dvs + offs_v[None, :],
             dv.to(DV.dtype.element_ty), mask=in_seq)


@triton.autotune(configs=GRAD_CONFIGS, key=TUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _chunk_dq_dk(Q, K, V, G, DO, HS, DHS, DQ, DK, DG_LOCAL, scale,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 stride_gb, stride_gs, stride_gh, stride_dob, stride_dos, stride_doh,
                 stride_dqb, stride_dqs, stride_dqh, stride_dkb, stride_dks, stride_dkh, T, NH, BH, LENGTH_BUCKET,
                 KEY_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """One chunk's dq, dk, and q.dq - k.dk per row (summed backwards into dg afterwards).

    Walks the value dim in blocks for dO h^T, v dh^T and dO v^T; q and k are loaded only after that loop, so the
    three accumulators are all that must stay in registers through it."""
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // NH).to(tl.int64), (bh % NH).to(tl.int64)
    rows = c * CHUNK + tl.arange(0, CHUNK)
    offs_k = tl.arange(0, KEY_DIM)
    in_seq = (rows < T)[:, None]
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    state_dtype = HS.dtype.element_ty
    dq = tl.zeros([CHUNK, KEY_DIM], tl.float32)  # dO h^T, still without the decay and scale
    dk = tl.zeros([CHUNK, KEY_DIM], tl.float32)  # v dh^T, still without the decay
    dscores = tl.zeros([CHUNK, CHUNK], tl.float32)
    state_at = (bh.to(tl.int64) * tl.num_programs(0) + c) * KEY_DIM * VALUE_DIM
    for v_start in range(0, VALUE_DIM, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V)
        v = tl.load(V + rows[:, None] * stride_vs + offs_v[None, :], mask=in_seq, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dos + offs_v[None, :], mask=in_seq, other=0.0)
        block = state_at + offs_k[:, None] * VALUE_DIM + offs_v[None, :]
        dscores = tl.dot(do, tl.trans(v), dscores, input_precision=PRECISION)
        dq = tl.dot(do.to(state_dtype), tl.trans(tl.load(HS + block)), dq, input_precision=PRECISION)
        dk = tl.dot(v.to(state_dtype), tl.trans(tl.load(DHS + block)), dk, input_precision=PRECISION)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_k[None, :], mask=in_seq, other=0.0)
    k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_ks + offs_k[None, :], mask=in_seq, other=0.0)
    b_c, b_last = _chunk_decay(G + b * stride_gb + h * stride_gh, stride_gs, rows, T, CHUNK)
    dscores = dscores * _causal_decay(b_c, CHUNK) * scale
    # dq is finished, stored and reduced into dg before dk is, so the two never occupy registers together
    dq = tl.dot(dscores.to(k.dtype), k, dq * (scale * tl.exp(b_c))[:, None], input_precision=PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqs + offs_k[None, :],
             dq.to(DQ.dtype.element_ty), mask=in_seq)
    dg_local = tl.sum(q.to(tl.float32) * dq, 1)
    dk = tl.dot(tl.trans(dscores).to(q.dtype), q, dk * tl.exp(b_last - b_c)[:, None], input_precision=PRECISION)
    tl.store(DK + b * stride_dkb + h * stride_dkh + rows[:, None] * stride_dks + offs_k[None, :],
             dk.to(DK.dtype.element_ty), mask=in_seq)
    dg_local -= tl.sum(k.to(tl.float32) * dk, 1)
    tl.store(DG_LOCAL + bh.to(tl.int64) * T + rows, dg_local, mask=rows < T)


def _state_dtype(dtype):
    """How the per-chunk states are stored between kernels: bf16 for bf16 (the matmuls take it), else fp32, since
    fp16's range (65504) is too small for a state that sums thousands of k^T v without decay."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _launch_args(q, v):
    """Sizes every kernel takes: T, heads, batch*heads, the tuning bucket of T; and the dims as constexprs."""
    B, T, H, K = q.shape
    sizes = (T, H, B * H, triton.next_power_of_2(T))
    return sizes, dict(KEY_DIM=K, VALUE_DIM=v.shape[-1], CHUNK=CHUNK, PRECISION=dot_precision(q.dtype))


def _states(k, v, g, initial_state):
    """(states, final): the state when each chunk starts, (batch*heads, chunks, K, V), and the state at the end."""
    B, T, H, K = k.shape
    Vd = v.shape[-1]
    states = torch.empty((B * H, triton.cdiv(T, CHUNK), K, Vd), dtype=_state_dtype(k.dtype), device=k.device)
    final = torch.empty((B, H, K, Vd), dtype=torch.float32, device=k.device)
    sizes, flags = _launch_args(k, v)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(Vd, meta["BLOCK_V"]), B * H)  # noqa: E731
    _chunk_states[grid](k, v, g, initial_state, states, final, *strides(k), *strides(v), *strides(g), *sizes,
                        HAS_INITIAL=initial_state is not None, **flags)
    return states, final


@torch.library.custom_op("kernels::linear_attention_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, initial_state: torch.Tensor | None,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, final_state); the final state is a by-product of the state kernel, so it is always returned."""
    q, k, v = (unit_last_stride(t) for t in (q, k, v))  # a compiled caller may hand over other layouts
    initial_state = initial_state.contiguous() if initial_state is not None else None
    B, T, H, _ = q.shape
    Vd = v.shape[-1]
    states, final = _states(k, v, g, initial_state)
    o = torch.empty((B, T, H, Vd), dtype=q.dtype, device=q.device)
    sizes, flags = _launch_args(q, v)
    grid = lambda meta: (triton.cdiv(Vd, meta["BLOCK_V"]), states.shape[1], B * H)  # noqa: E731
    _chunk_output[grid](q, k, v, g, states, o, scale, *strides(q), *strides(k), *strides(v), *strides(g),
                        *strides(o), *sizes, **flags)
    return o, final


@_forward.register_fake
def _(q, k, v, g, initial_state, scale):
    B, T, H, K = q.shape
    Vd = v.shape[-1]
    return q.new_empty((B, T, H, Vd)), q.new_empty((B, H, K, Vd), dtype=torch.float32)


@torch.library.custom_op("kernels::linear_attention_backward", mutates_args=())
def _backward(do: torch.Tensor, dfinal: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              g: torch.Tensor, initial_state: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dg, d initial_state) from the gradients of the output and of the final state."""
    do, q, k, v = (unit_last_stride(t) for t in (do, q, k, v))
    dfinal = dfinal.contiguous()
    initial_state = initial_state.contiguous() if initial_state is not None else None
    B, T, H, K = q.shape
    Vd = v.shape[-1]
    states, final = _states(k, v, g, initial_state)
    dstates = torch.empty_like(states)
    dinitial = torch.empty((B, H, K, Vd), dtype=torch.float32, device=q.device)
    sizes, flags = _launch_args(q, v)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(Vd, meta["BLOCK_V"]), B * H)  # noqa: E731
    _chunk_state_grads[grid](q, g, do, dfinal, dstates, dinitial, scale, *strides(q), *strides(g), *strides(do),
                             *sizes, **flags)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dg_local = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    n_chunks = states.shape[1]
    _chunk_dq_dk[(n_chunks, B * H)](q, k, v, g, do, states, dstates, dq, dk, dg_local, scale, *strides(q),
                                    *strides(k), *strides(v), *strides(g), *strides(do), *strides(dq),
                                    *strides(dk), *sizes, **flags)
    grid = lambda meta: (triton.cdiv(Vd, meta["BLOCK_V"]), n_chunks, B * H)  # noqa: E731
    _chunk_dv[grid](q, k, g, do, dstates, dv, scale, *strides(q), *strides(k), *strides(g), *strides(do),
                    *strides(dv), *sizes, **flags)
    # dg_t sums the local terms from t to the end; the final state is exp(decay to the end) times a sum.
    dg = dg_local.flip(-1).cumsum(-1).flip(-1) + (final * dfinal).sum((-2, -1))[..., None]
    return dq, dk, dv, dg.transpose(1, 2).to(g.dtype).contiguous(), dinitial


@_backward.register_fake
def _(do, dfinal, q, k, v, g, initial_state, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), g.new_empty(g.shape),
            dfinal.new_empty(dfinal.shape))


def _save_for_backward(ctx, inputs, output):
    q, k, v, g, initial_state, ctx.scale = inputs
    ctx.has_initial = initial_state is not None
    ctx.save_for_backward(q, k, v, g, initial_state)


def _gradients(ctx, do, dfinal):
    q, k, v, g, initial_state = ctx.saved_tensors
    dq, dk, dv, dg, dinitial = _backward(do, dfinal, q, k, v, g, initial_state, ctx.scale)
    return dq, dk, dv, dg, dinitial if ctx.has_initial else None, None


_forward.register_autograd(_gradients, setup_context=_save_for_backward)


def linear_attention(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """Gated linear attention by the chunked Triton kernels (see the module docstring for the recurrence).

    Returns o (batch, seq, heads, value_dim) in q's dtype, and with output_final_state the float32 state after the
    last position (batch, heads, key_dim, value_dim), to carry on from (e.g. linear_attention_step).
    """
    check_inputs(q, k, v, g, initial_state)
    check_device("linear_attention", q, INTERPRETED)
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype or g.dtype not in DTYPES:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}, and g be one of them; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}, {g.dtype}")
    if q.shape[-1] not in HEAD_DIMS or v.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"key and value dims must be in {HEAD_DIMS}; got {q.shape[-1]}, {v.shape[-1]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    if initial_state is not None:
        initial_state = initial_state.float()
    o, final = _forward(q, k, v, g, initial_state, scale)
    return (o, final) if output_final_state else o
