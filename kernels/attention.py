"""FlashAttention-2 forward and backward in Triton, in flash_attn_func's layout: (batch, seq, heads, head_dim).

Forward: a program owns BLOCK_M queries of one (batch, head) and streams the keys in blocks of BLOCK_N with an
online softmax (running max and sum), so the seq x seq scores never exist in memory. It saves each query row's
log-sum-exp, from which backward rebuilds the probabilities block by block.
Backward is FlashAttention-2's: delta = rowsum(dO * O), then one kernel per block of keys that walks the queries,
keeps dK and dV in registers and adds its share of dQ into an fp32 buffer with atomics: 5 matmuls and one exp per
pair of blocks. Atomics add in whatever order the blocks finish, so dQ's last bits vary from run to run;
deterministic=True runs that kernel without dQ, then a kernel that owns a block of queries and walks the keys
(dQ): 7 matmuls and two exps per pair, no atomics.
Scores are kept in base 2 (log2(e) is folded into the softmax scale), so the kernels exponentiate with exp2.

Grouped-query attention runs without copying k and v: query head h reads kv head h // (heads // kv_heads), and
the key-block kernel sums dK, dV over the query heads of its group.

Causal attention skips the key blocks above the diagonal and masks only blocks on the diagonal or at a ragged end;
all others run without masks. Causal needs as many keys as queries (flash_attn aligns unequal lengths
bottom-right; nothing here needs that).

Hyperbolic attention (hyperbolic_flash_attention; the math, its choices and the PyTorch reference are in
kernels/hyperbolic.py) is the same kernels with HYPERBOLIC set, a constexpr, so the euclidean kernels compile as
before. Queries and keys come as points of the hyperboloid (spatial parts in the usual layout, time components q0,
k0 beside them); a tile's score is z = c (q0 k0^T - q_s k_s^T), the dot product plus a rank-1 term, then
-beta arcosh(z) / sqrt(c), and the online softmax runs unchanged. Backward scales dS by beta sqrt(c) arcosh'(z),
so the same matmuls give dQ_s and dK_s; row and column sums give dQ0 and dK0, and the dQ kernel's per-row sums
of dS arcosh(z) and dS z give d/dbeta and d/dc. It always runs the deterministic backward (dQ0 would need a
second atomic buffer).

The plain PyTorch reference, attention_reference, is in kernels/attention_torch.py (importable without Triton).
"""

import torch
import triton
import triton.language as tl

from kernels.attention_torch import check_inputs
from kernels.hyperbolic import Z_EPS
from kernels.support import (ATTENTION_HEAD_DIMS as HEAD_DIMS, DTYPES, check_device, dot_precision,
                             interpreter_requested, is_interpreted, strides, unit_last_stride)

LOG2E = 1.4426950408889634


def _configs(gpu, interpreted):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) choices as autotune configs. Asked when the kernels below are
    decorated, as Triton does: the interpreter runs every autotune candidate slowly, so it gets one small config
    that still has several blocks per sequence at test sizes."""
    choices = [interpreted] if interpreter_requested() else gpu
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in choices]


# Hopper: 128-query blocks and 8 warps (two warpgroups) for forward and dQ, 128- or 64-key blocks with 8 warps for
# dK/dV, plus one config of small blocks per kernel that the small-grid rule picks at batch 1 (autotune_candidates
# drops what would not fit in shared memory or would leave SMs idle). Three per kernel: each candidate costs a
# compile (3-10 s) and a benchmark the first time a shape is seen, and the device is lent for minutes.
# Measured with `make aot-check` (sm_90, bf16, head_dim 128, causal) on Triton 3.6, the device's version, and 3.9:
# none of these spills. dK/dV with dQ by atomics keeps three fp32 accumulators live (dK, dV and the block's dQ
# share): on 3.6 every 4-warp dK/dV config spilled there ((64, 64, 4, 3) 1,272 B, (32, 64, 4, 3) 80 B, (16, 64, 4,
# 4) 4 B, (32, 128, 4, 3) 3,404 B), as did 8 warps with 64-query blocks at 3 stages ((64, 64, 8, 3) 108 B, (64,
# 128, 8, 3) 184 B), while 8 warps with 16- or 32-query blocks do not: (32, 128, 8, 3) 246 registers, (16, 128, 8,
# 2) 212, (32, 64, 8, 2) 226 on 3.6; 246, 232, 224 on 3.9. (32, 128, 8, 2) spilled 12 B on 3.9 without atomics.
# Grouped-query heads: a loop over a group's heads inside the dK/dV program spilled on 3.6 ((32, 128, 8, 3) 264 B,
# (32, 64, 8, 2) 68 B, (16, 128, 8, 2) 16 B with atomics; 60-64 B without), so each program now takes one query
# head, as for MHA, and the group is summed afterwards: 0 B, 188-232 registers on 3.6 and 3.9.
# Forward and dQ need BLOCK_N to divide BLOCK_M (the diagonal is whole key blocks); dK/dV the reverse. The tests
# run each kernel with these block shapes in the interpreter too.
FWD_GPU = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]
DKDV_GPU = [(32, 128, 8, 3), (16, 128, 8, 2), (32, 64, 8, 2)]
DQ_GPU = [(128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)]
FWD_CONFIGS = _configs(FWD_GPU, (32, 16, 4, 1))
DKDV_CONFIGS = _configs(DKDV_GPU, (16, 32, 4, 1))
DQ_CONFIGS = _configs(DQ_GPU, (32, 16, 4, 1))
# Tuned per power-of-two bucket of the lengths and of the grid's batch x heads, not per exact size, so a chat
# prompt of a new length reuses its bucket's choice instead of re-tuning; the kernels take the exact lengths for
# masking. The *_BUCKET arguments exist for the autotuner only. Triton adds the tensors' dtypes to the key.
# HYPERBOLIC tunes apart: its score needs more registers (make aot-check shows spills in some of its configs).
TUNE_KEY = ["N_CTX_Q_BUCKET", "N_CTX_K_BUCKET", "BATCH_HEADS_BUCKET", "HEAD_DIM", "CAUSAL", "HYPERBOLIC"]
LONGEST_BUCKET = 16384  # longer sequences tune as this one: the choice no longer changes with length
PROGRAMS_PER_SM = 2  # fewer programs than this per SM leave SMs idle while the last ones run (small-grid rule)


def shared_memory_bytes(kernel, config, head_dim, element_size):
    """Estimated shared memory of one program of kernel ("fwd", "dkdv" or "dq"): the tiles it keeps, num_stages
    copies of the tiles it streams (the load pipeline's buffers), and the probability tile a matmul takes
    transposed. An estimate: what does not fit fails to compile and the autotuner skips it anyway, slowly."""
    m, n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    if kernel == "fwd":  # q kept; k, v streamed
        elements = head_dim * (m + 2 * stages * n)
    elif kernel == "dkdv":  # k, v kept; q, dO streamed; dS^T for dQ
        elements = head_dim * (2 * n + 2 * stages * m) + m * n
    else:  # dq: q, dO kept; k, v streamed; dS
        elements = head_dim * (2 * m + 2 * stages * n) + m * n
    return elements * element_size


def programs(kernel, config, batch_heads, seq):
    """How many programs kernel launches: forward and dQ split the queries into BLOCK_M, dK/dV the keys into
    BLOCK_N, for each of batch_heads (batch x query heads, for dK/dV too)."""
    return batch_heads * triton.cdiv(seq, config.kwargs["BLOCK_N" if kernel == "dkdv" else "BLOCK_M"])


def autotune_candidates(kernel, configs, head_dim, element_size, batch_heads, seq, shared_memory, sm_count):
    """The configs worth benchmarking on a device with shared_memory bytes per program and sm_count SMs: those
    whose estimate fits (else the smallest); of those, the ones that launch at least PROGRAMS_PER_SM per SM,
    or, where none does (one sequence of a few heads), those that launch the most, i.e. the smallest blocks."""
    fits = [c for c in configs if shared_memory_bytes(kernel, c, head_dim, element_size) <= shared_memory]
    fits = fits or [min(configs, key=lambda c: shared_memory_bytes(kernel, c, head_dim, element_size))]
    counts = {c: programs(kernel, c, batch_heads, seq) for c in fits}
    busy = [c for c in fits if counts[c] >= PROGRAMS_PER_SM * sm_count]
    return busy or [c for c in fits if counts[c] == max(counts.values())]


def _prune(kernel):
    """autotune's early_config_prune for kernel: autotune_candidates for this call's device and tuning buckets
    (not its exact sizes, so that the choice is a function of the key)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        device = torch.cuda.get_device_properties(args["Q"].device)
        seq = args["N_CTX_K_BUCKET" if kernel == "dkdv" else "N_CTX_Q_BUCKET"]
        return autotune_candidates(kernel, configs, args["HEAD_DIM"], args["Q"].element_size(),
                                   args["BATCH_HEADS_BUCKET"], seq, device.shared_memory_per_block_optin,
                                   device.multi_processor_count)
    return prune


DELTA_BLOCK = 64
Z_EPS_ = tl.constexpr(Z_EPS)  # hyperbolic: -c <q, k>_L is clamped to at least 1 + Z_EPS c (kernels/hyperbolic.py)


@triton.jit
def _lorentz_z(dot, time_product, curv):
    """z = -c <q, k>_L of a tile, from its q_s . k_s (dot) and q0 k0 (time_product): the rank-1 term."""
    return curv * (time_product - dot)


@triton.jit
def _arcosh(z, curv):
    """arcosh(max(z, 1 + Z_EPS c)); (z - 1)(z + 1) rather than z^2 - 1, which cancels near 1."""
    z = tl.maximum(z, 1 + Z_EPS_ * curv)
    return tl.log(z + tl.sqrt((z - 1) * (z + 1)))


@triton.jit
def _arcosh_slope(z, curv):
    """d arcosh(max(z, 1 + Z_EPS c)) / dz: 1 / sqrt(z^2 - 1), and 0 where the clamp holds."""
    z_min = 1 + Z_EPS_ * curv
    clamped = tl.maximum(z, z_min)
    return tl.where(z > z_min, 1 / tl.sqrt((clamped - 1) * (clamped + 1)), 0.0)


@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, qk_scale, rows, offs_n, offs_d, lo, hi, N_CTX_K,
                    q0, K0, curv, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr, HYPERBOLIC: tl.constexpr):
    """Online softmax over the key blocks in [lo, hi); MASKED for those on the diagonal or past the end.
    HYPERBOLIC: the score is arcosh(z) * qk_scale (qk_scale = -beta log2(e) / sqrt(c)) instead of q.k * qk_scale."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = K + cols[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = V + cols[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols < N_CTX_K)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(cols < N_CTX_K)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        dot = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HYPERBOLIC:
            k0 = tl.load(K0 + cols, mask=cols < N_CTX_K, other=0.0) if MASKED else tl.load(K0 + cols)
            s = _arcosh(_lorentz_z(dot, q0[:, None] * k0[None, :], curv), curv) * qk_scale
        else:
            s = dot * qk_scale
        if MASKED:
            keep = (cols < N_CTX_K)[None, :]
            if CAUSAL:
                keep = keep & (rows[:, None] >= cols[None, :])
            s = tl.where(keep, s, float("-inf"))
        # Every row has met a key by now (blocks run left to right from key 0), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=FWD_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune("fwd")})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, Q0, K0, GEOM, qk_scale,
              stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
              H, GROUP, N_CTX_Q, N_CTX_K, N_CTX_Q_BUCKET, N_CTX_K_BUCKET, BATCH_HEADS_BUCKET,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HYPERBOLIC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """HYPERBOLIC: Q, K hold x_s and Q0, K0 the time components (batch, heads, seq) of points on the hyperboloid,
    GEOM (3, heads) each query head's curvature, base-2 score scale and natural score scale (_geometry)."""
    start_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: start them first so the tail of the grid is short
        start_m = tl.num_programs(0) - 1 - start_m
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h // GROUP * stride_kh
    V += b * stride_vb + h // GROUP * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += bh.to(tl.int64) * N_CTX_Q

    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < N_CTX_Q
    q = tl.load(Q + rows[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q0, curv = row_ok.to(tl.float32), qk_scale  # read by the hyperbolic score only
    if HYPERBOLIC:
        curv, qk_scale = tl.load(GEOM + h), tl.load(GEOM + H + h)
        q0 = tl.load(Q0 + bh.to(tl.int64) * N_CTX_Q + rows, mask=row_ok, other=0.0)
        K0 += (b * (H // GROUP) + h // GROUP) * N_CTX_K
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        diagonal = start_m * BLOCK_M
        acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, qk_scale, rows, offs_n, offs_d,
                                        0, diagonal, N_CTX_K, q0, K0, curv, False, CAUSAL, BLOCK_N, PRECISION,
                                        HYPERBOLIC)
        acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, qk_scale, rows, offs_n, offs_d,
                                        diagonal, tl.minimum(diagonal + BLOCK_M, N_CTX_K), N_CTX_K, q0, K0, curv,
                                        True, CAUSAL, BLOCK_N, PRECISION, HYPERBOLIC)
    else:
        whole = N_CTX_K // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, qk_scale, rows, offs_n, offs_d,
                                        0, whole, N_CTX_K, q0, K0, curv, False, CAUSAL, BLOCK_N, PRECISION,
                                        HYPERBOLIC)
        acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, K, V, stride_ks, stride_vs, qk_scale, rows, offs_n, offs_d,
                                        whole, N_CTX_K, N_CTX_K, q0, K0, curv, True, CAUSAL, BLOCK_N, PRECISION,
                                        HYPERBOLIC)
    out = acc / l_i[:, None]
    tl.store(O + rows[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + rows, m_i + tl.log2(l_i), mask=row_ok)


# Whether Triton decorated the kernels for its CPU interpreter (TRITON_INTERPRET=1 at import) or for a GPU.
INTERPRETED = is_interpreted(_attn_fwd)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
                    H, N_CTX_Q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O): the softmax backward's correction term, once per query row."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < N_CTX_Q
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N_CTX_Q + rows, delta, mask=row_ok)


@triton.jit
def _dkdv_query_blocks(dk, dv, dk0, k, v, Q, DO, DQ, LSE, DELTA, stride_qs, stride_dos, stride_dqs, qk_scale,
                       sm_scale, cols, offs_m, offs_d, lo, hi, N_CTX_Q, k0, Q0, curv, slope_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
                       PRECISION: tl.constexpr, HYPERBOLIC: tl.constexpr):
    """Accumulate one key block's dK, dV over the query blocks in [lo, hi), working on transposed scores; with
    DQ_ATOMIC also add this key block's share of each query block's dQ to DQ (fp32). HYPERBOLIC: dS becomes
    dL/d(-q_s.k_s) = dS beta sqrt(c) arcosh'(z), which gives dK (and dQ) by the same matmuls, and dK0."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        row_ok = rows < N_CTX_Q
        q_ptrs = Q + rows[:, None] * stride_qs + offs_d[None, :]
        do_ptrs = DO + rows[:, None] * stride_dos + offs_d[None, :]
        if MASKED:
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + rows)
            delta = tl.load(DELTA + rows)
        dot_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        if HYPERBOLIC:
            q0 = tl.load(Q0 + rows, mask=row_ok, other=0.0) if MASKED else tl.load(Q0 + rows)
            z_t = _lorentz_z(dot_t, k0[:, None] * q0[None, :], curv)
            p_t = tl.exp2(_arcosh(z_t, curv) * qk_scale - lse[None, :])
        else:
            p_t = tl.exp2(dot_t * qk_scale - lse[None, :])
        if MASKED:
            keep = row_ok[None, :]
            if CAUSAL:
                keep = keep & (rows[None, :] >= cols[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HYPERBOLIC:
            ds_t = ds_t * slope_scale * _arcosh_slope(z_t, curv)
            dk0 -= tl.sum(ds_t * q0[None, :], 1)
        ds_t = ds_t.to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        if DQ_ATOMIC:  # the fifth matmul: other key blocks add their shares to the same rows
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION) * sm_scale
            dq_ptrs = DQ + rows[:, None] * stride_dqs + offs_d[None, :]
            if MASKED:
                tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv, dk0


@triton.jit
def _dkdv_head(dk, dv, dk0, k, v, Q, DO, DQ, LSE, DELTA, stride_qs, stride_dos, stride_dqs, qk_scale, sm_scale,
               cols, offs_m, offs_d, start_n, N_CTX_Q, k0, Q0, curv, slope_scale, CAUSAL: tl.constexpr,
               DQ_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
               HYPERBOLIC: tl.constexpr):
    """One query head's share of a key block's dK, dV (and that head's dQ), Q..DELTA already at the head."""
    whole = N_CTX_Q // BLOCK_M * BLOCK_M
    if CAUSAL:  # queries before this key block do not see it; the diagonal block is masked, later ones are not
        below = start_n + BLOCK_N
        dk, dv, dk0 = _dkdv_query_blocks(dk, dv, dk0, k, v, Q, DO, DQ, LSE, DELTA, stride_qs, stride_dos,
                                         stride_dqs, qk_scale, sm_scale, cols, offs_m, offs_d,
                                         start_n, tl.minimum(below, N_CTX_Q), N_CTX_Q, k0, Q0, curv, slope_scale,
                                         True, CAUSAL, DQ_ATOMIC, BLOCK_M, PRECISION, HYPERBOLIC)
        dk, dv, dk0 = _dkdv_query_blocks(dk, dv, dk0, k, v, Q, DO, DQ, LSE, DELTA, stride_qs, stride_dos,
                                         stride_dqs, qk_scale, sm_scale, cols, offs_m, offs_d,
                                         below, whole, N_CTX_Q, k0, Q0, curv, slope_scale,
                                         False, CAUSAL, DQ_ATOMIC, BLOCK_M, PRECISION, HYPERBOLIC)
        dk, dv, dk0 = _dkdv_query_blocks(dk, dv, dk0, k, v, Q, DO, DQ, LSE, DELTA, stride_qs, stride_dos,
                                         stride_dqs, qk_scale, sm_scale, cols, offs_m, offs_d,
                                         tl.maximum(whole, below), N_CTX_Q, N_CTX_Q, k0, Q0, curv, slope_scale,
                                         True, CAUSAL, DQ_ATOMIC, BLOCK_M, PRECISION, HYPERBOLIC)
    else:
        dk, dv, dk0 = _dkdv_query_blocks(dk, dv, dk0, k, v, Q, DO, DQ, LSE, DELTA, stride_qs, stride_dos,
                                         stride_dqs, qk_scale, sm_scale, cols, offs_m, offs_d,
                                         0, whole, N_CTX_Q, k0, Q0, curv, slope_scale,
                                         False, CAUSAL, DQ_ATOMIC, BLOCK_M, PRECISION, HYPERBOLIC)
        dk, dv, dk0 = _dkdv_query_blocks(dk, dv, dk0, k, v, Q, DO, DQ, LSE, DELTA, stride_qs, stride_dos,
                                         stride_dqs, qk_scale, sm_scale, cols, offs_m, offs_d,
                                         whole, N_CTX_Q, N_CTX_Q, k0, Q0, curv, slope_scale,
                                         True, CAUSAL, DQ_ATOMIC, BLOCK_M, PRECISION, HYPERBOLIC)
    return dk, dv, dk0


# DQ_ATOMIC changes the work per block, so each mode tunes its own config; DQ accumulates across the benchmark
# runs, hence zeroed before each.
@triton.autotune(configs=DKDV_CONFIGS, key=TUNE_KEY + ["DQ_ATOMIC"], reset_to_zero=["DQ"],
                 prune_configs_by={"early_config_prune": _prune("dkdv")})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DQ, DK, DV, LSE, DELTA, Q0, K0, DK0, GEOM, qk_scale, sm_scale,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                   stride_dqb, stride_dqs, stride_dqh,
                   stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                   H, GROUP, N_CTX_Q, N_CTX_K, N_CTX_Q_BUCKET, N_CTX_K_BUCKET, BATCH_HEADS_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
                   HYPERBOLIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query head's dK, dV of one key block; with DQ_ATOMIC the whole backward (FlashAttention-2's: 5 matmuls,
    one exp). With grouped-query heads (GROUP > 1) DK and DV have a head per query head, which the caller sums
    over each group: a loop over the group inside the program spilled registers. HYPERBOLIC (never with
    DQ_ATOMIC): dK_s, dV and the time components' dK0 (batch, heads, seq, fp32)."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    h_kv = h // GROUP
    start_n = tl.program_id(0) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = (cols < N_CTX_K)[:, None]
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
                mask=col_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + cols[:, None] * stride_vs + offs_d[None, :],
                mask=col_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk0 = tl.zeros([BLOCK_N], tl.float32)
    k0 = dk0  # read by the hyperbolic score only
    if HYPERBOLIC:
        k0 = tl.load(K0 + (b * (H // GROUP) + h_kv) * N_CTX_K + cols, mask=cols < N_CTX_K, other=0.0)
    rows_at = bh.to(tl.int64) * N_CTX_Q  # this head's log-sum-exp and delta (and time components)
    curv, head_scale, slope_scale = qk_scale, qk_scale, qk_scale  # the hyperbolic ones: this head's
    if HYPERBOLIC:
        curv, head_scale = tl.load(GEOM + h), tl.load(GEOM + H + h)
        slope_scale = curv * tl.load(GEOM + 2 * H + h)  # d(natural score)/d(-q_s.k_s) = beta sqrt(c) arcosh'
    dk, dv, dk0 = _dkdv_head(dk, dv, dk0, k, v, Q + b * stride_qb + h * stride_qh,
                             DO + b * stride_dob + h * stride_doh, DQ + b * stride_dqb + h * stride_dqh,
                             LSE + rows_at, DELTA + rows_at, stride_qs, stride_dos, stride_dqs, head_scale,
                             sm_scale, cols, offs_m, offs_d, start_n, N_CTX_Q, k0, Q0 + rows_at, curv,
                             slope_scale, CAUSAL, DQ_ATOMIC, BLOCK_M, BLOCK_N, PRECISION, HYPERBOLIC)
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok)
    if HYPERBOLIC:
        tl.store(DK0 + bh.to(tl.int64) * N_CTX_K + cols, dk0, mask=cols < N_CTX_K)


@triton.jit
def _dq_key_blocks(dq, dq0, dist_sum, z_sum, q, do, lse, delta, K, V, stride_ks, stride_vs, qk_scale, rows, offs_n,
                   offs_d, lo, hi, N_CTX_K, q0, K0, curv, slope_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, HYPERBOLIC: tl.constexpr):
    """Accumulate one query block's dQ over the key blocks in [lo, hi). HYPERBOLIC: also dQ0, and per query row
    the sums over keys of dS arcosh(z) and dS' z (dS' = dS beta sqrt(c) arcosh'(z)), from which the wrapper
    finishes d/dbeta and d/dc (_finish_geometry_grads)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = K + cols[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = V + cols[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols < N_CTX_K)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(cols < N_CTX_K)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        dot = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if HYPERBOLIC:
            k0 = tl.load(K0 + cols, mask=cols < N_CTX_K, other=0.0) if MASKED else tl.load(K0 + cols)
            z = _lorentz_z(dot, q0[:, None] * k0[None, :], curv)
            dist = _arcosh(z, curv)
            p = tl.exp2(dist * qk_scale - lse[:, None])
        else:
            p = tl.exp2(dot * qk_scale - lse[:, None])
        if MASKED:
            keep = (cols < N_CTX_K)[None, :]
            if CAUSAL:
                keep = keep & (rows[:, None] >= cols[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HYPERBOLIC:
            dist_sum += tl.sum(ds * dist, 1)
            ds = ds * slope_scale * _arcosh_slope(z, curv)
            z_sum += tl.sum(ds * z, 1)
            dq0 -= tl.sum(ds * k0[None, :], 1)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq, dq0, dist_sum, z_sum


@triton.autotune(configs=DQ_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune("dq")})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, Q0, K0, DQ0, SUMS, GEOM, qk_scale, sm_scale,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                 stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                 stride_dqb, stride_dqs, stride_dqh,
                 H, GROUP, N_CTX_Q, N_CTX_K, N_CTX_Q_BUCKET, N_CTX_K_BUCKET, BATCH_HEADS_BUCKET,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HYPERBOLIC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """HYPERBOLIC: also dQ0 (batch, heads, seq, fp32) and SUMS (2, batch, heads, seq): _dq_key_blocks' row sums."""
    start_m = tl.program_id(0)
    if CAUSAL:  # heaviest query blocks first, as in forward
        start_m = tl.num_programs(0) - 1 - start_m
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    K += b * stride_kb + h // GROUP * stride_kh
    V += b * stride_vb + h // GROUP * stride_vh

    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < N_CTX_Q
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * N_CTX_Q + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N_CTX_Q + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq0 = tl.zeros([BLOCK_M], tl.float32)
    dist_sum = tl.zeros([BLOCK_M], tl.float32)
    z_sum = tl.zeros([BLOCK_M], tl.float32)
    q0, curv, slope_scale = dq0, qk_scale, qk_scale  # read by the hyperbolic score only
    if HYPERBOLIC:
        curv, qk_scale = tl.load(GEOM + h), tl.load(GEOM + H + h)
        slope_scale = curv * tl.load(GEOM + 2 * H + h)
        q0 = tl.load(Q0 + bh.to(tl.int64) * N_CTX_Q + rows, mask=row_ok, other=0.0)
        K0 += (b * (H // GROUP) + h // GROUP) * N_CTX_K
    if CAUSAL:
        diagonal = start_m * BLOCK_M
        dq, dq0, dist_sum, z_sum = _dq_key_blocks(
            dq, dq0, dist_sum, z_sum, q, do, lse, delta, K, V, stride_ks, stride_vs, qk_scale, rows, offs_n, offs_d,
            0, diagonal, N_CTX_K, q0, K0, curv, slope_scale, False, CAUSAL, BLOCK_N, PRECISION, HYPERBOLIC)
        dq, dq0, dist_sum, z_sum = _dq_key_blocks(
            dq, dq0, dist_sum, z_sum, q, do, lse, delta, K, V, stride_ks, stride_vs, qk_scale, rows, offs_n, offs_d,
            diagonal, tl.minimum(diagonal + BLOCK_M, N_CTX_K), N_CTX_K, q0, K0, curv, slope_scale,
            True, CAUSAL, BLOCK_N, PRECISION, HYPERBOLIC)
    else:
        whole = N_CTX_K // BLOCK_N * BLOCK_N
        dq, dq0, dist_sum, z_sum = _dq_key_blocks(
            dq, dq0, dist_sum, z_sum, q, do, lse, delta, K, V, stride_ks, stride_vs, qk_scale, rows, offs_n, offs_d,
            0, whole, N_CTX_K, q0, K0, curv, slope_scale, False, CAUSAL, BLOCK_N, PRECISION, HYPERBOLIC)
        dq, dq0, dist_sum, z_sum = _dq_key_blocks(
            dq, dq0, dist_sum, z_sum, q, do, lse, delta, K, V, stride_ks, stride_vs, qk_scale, rows, offs_n, offs_d,
            whole, N_CTX_K, N_CTX_K, q0, K0, curv, slope_scale, True, CAUSAL, BLOCK_N, PRECISION, HYPERBOLIC)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqs + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
    if HYPERBOLIC:
        at = bh.to(tl.int64) * N_CTX_Q + rows
        tl.store(DQ0 + at, dq0, mask=row_ok)
        tl.store(SUMS + at, dist_sum, mask=row_ok)
        tl.store(SUMS + tl.num_programs(1).to(tl.int64) * N_CTX_Q + at, z_sum, mask=row_ok)


def tuning_bucket(n):
    """The autotune key for a size n: the next power of two, capped at LONGEST_BUCKET."""
    return min(triton.next_power_of_2(n), LONGEST_BUCKET)


def _sizes(n_q, n_k, batch_heads):
    """The kernels' size arguments: the exact lengths for masking, then the tuning buckets of those and of the
    grid's batch x heads."""
    return n_q, n_k, tuning_bucket(n_q), tuning_bucket(n_k), tuning_bucket(batch_heads)


@torch.library.custom_op("kernels::flash_attention_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
             deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): lse is each query row's log-sum-exp in base 2 with the scale folded in, kept for backward.
    deterministic is for backward only; it rides along here so that autograd has it."""
    q, k, v = (unit_last_stride(t) for t in (q, k, v))  # a compiled caller may hand over other layouts
    return _launch_forward(q, k, v, causal, softmax_scale * LOG2E)


def _launch_forward(q, k, v, causal, qk_scale, hyperbolic=None):
    """(out, lse) from the forward kernel; hyperbolic: None, or (q0, k0, geometry) as _hyperbolic_forward
    prepares them."""
    B, n_q, H, D = q.shape
    n_k = k.shape[1]
    o = torch.empty((B, n_q, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, n_q), dtype=torch.float32, device=q.device)
    q0, k0, geometry = hyperbolic or (lse, lse, lse)  # the euclidean kernel never reads these
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](q, k, v, o, lse, q0, k0, geometry, qk_scale, *strides(q), *strides(k), *strides(v),
                    *strides(o), H, H // k.shape[2], *_sizes(n_q, n_k, B * H),
                    HEAD_DIM=D, CAUSAL=causal, PRECISION=dot_precision(q.dtype), HYPERBOLIC=hyperbolic is not None)
    return o, lse


@_forward.register_fake
def _(q, k, v, causal, softmax_scale, deterministic):
    B, n_q, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, n_q), dtype=torch.float32)


@torch.library.custom_op("kernels::flash_attention_backward", mutates_args=())
def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, causal: bool, softmax_scale: float,
              deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv). By default one kernel per key block does it all, adding dQ into an fp32 buffer with atomics
    (summed in whatever order blocks finish); deterministic gives dQ its own kernel instead: two more matmuls
    and a second exp per block, the same bits every run."""
    do, q, k, v, o = (unit_last_stride(t) for t in (do, q, k, v, o))
    return _launch_backward(do, q, k, v, o, lse, causal, softmax_scale, deterministic)


def _launch_backward(do, q, k, v, o, lse, causal, softmax_scale, deterministic, hyperbolic=None):
    """(dq, dk, dv) from the backward kernels; hyperbolic: None, or (q0, k0, geometry, dq0, dk0, sums), whose
    last three the kernels fill (hyperbolic runs the deterministic way: its dQ0 would need a second atomic
    buffer)."""
    lse = lse.contiguous()  # indexed as (batch * heads, n_q)
    B, n_q, H, D = q.shape
    n_k = k.shape[1]
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(n_q, DELTA_BLOCK), B * H)](o, do, delta, *strides(o), *strides(do), H, n_q,
                                                            HEAD_DIM=D, BLOCK_M=DELTA_BLOCK)
    H_kv = k.shape[2]
    # one dK, dV per query head, in fp32 where a group's heads are summed afterwards (see _attn_bwd_dkdv)
    dk, dv = (torch.empty(t.shape[:2] + (H,) + t.shape[3:], dtype=t.dtype if H == H_kv else torch.float32,
                          device=t.device) for t in (k, v))
    if deterministic:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    scales = (softmax_scale * LOG2E, softmax_scale)
    flags = dict(HEAD_DIM=D, CAUSAL=causal, PRECISION=dot_precision(q.dtype), HYPERBOLIC=hyperbolic is not None)
    q0, k0, geometry, dq0, dk0, sums = hyperbolic or (delta,) * 6  # the euclidean kernels never read these
    heads = (H, H // H_kv)  # query heads, and how many share each kv head
    grid_k = lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), B * H)  # noqa: E731
    _attn_bwd_dkdv[grid_k](q, k, v, do, dq, dk, dv, lse, delta, q0, k0, dk0, geometry, *scales, *strides(q),
                           *strides(k), *strides(v), *strides(do), *strides(dq), *strides(dk), *strides(dv),
                           *heads, *_sizes(n_q, n_k, B * H), DQ_ATOMIC=not deterministic, **flags)
    if H != H_kv:  # each group's heads in order: deterministic
        dk, dv = (t.view(B, n_k, H_kv, H // H_kv, D).sum(3).to(like.dtype) for t, like in ((dk, k), (dv, v)))
    if not deterministic:
        return dq.to(q.dtype), dk, dv
    grid_q = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq[grid_q](q, k, v, do, dq, lse, delta, q0, k0, dq0, sums, geometry, *scales, *strides(q),
                         *strides(k), *strides(v), *strides(do), *strides(dq), *heads,
                         *_sizes(n_q, n_k, B * H), **flags)
    return dq, dk, dv


@_backward.register_fake
def _(do, q, k, v, o, lse, causal, softmax_scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_for_backward(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.softmax_scale, ctx.deterministic = inputs
    ctx.save_for_backward(q, k, v, *output)


def _gradients(ctx, do, _lse_grad):
    q, k, v, o, lse = ctx.saved_tensors
    return *_backward(do, q, k, v, o, lse, ctx.causal, ctx.softmax_scale, ctx.deterministic), None, None, None


_forward.register_autograd(_gradients, setup_context=_save_for_backward)


def check_kernel_inputs(op: str, q, k, v, causal: bool) -> None:
    """What both kernels' entry points need beyond the reference's shape rules: a device Triton runs on, one
    dtype of DTYPES for q, k, v, and a head_dim in HEAD_DIMS."""
    check_inputs(q, k, v, causal)
    check_device(op, q, INTERPRETED)
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}; got {q.shape[-1]}")


def flash_attention(q, k, v, causal=True, softmax_scale=None, deterministic=False):
    """softmax(q k^T * scale) v, like flash_attn.flash_attn_func: q (batch, seq, heads, head_dim), k and v
    (batch, seq_k, kv_heads, head_dim). Grouped-query attention without copies: kv_heads divides heads, and query
    head h attends with kv head h // (heads // kv_heads).

    fp16/bf16/fp32, head_dim in HEAD_DIMS, any sequence length; q, k, v on CUDA (or CPU under TRITON_INTERPRET=1).
    deterministic=True makes the gradients bitwise reproducible, at the cost of a slower backward (no atomics).
    Forward and backward are torch.library custom ops, so torch.compile keeps a block that calls this in one
    graph and runs the kernels as they are, never tracing into them.
    """
    check_kernel_inputs("flash_attention", q, k, v, causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    return _forward(q, k, v, causal, scale, deterministic)[0]


def _geometry(curvature, beta, heads):
    """(3, heads) float32 for the kernels: each query head's curvature (its kv head's), base-2 score scale
    -beta log2(e) / sqrt(c) and natural score scale beta / sqrt(c)."""
    c = curvature.float().repeat_interleave(heads // curvature.shape[0])
    scale = beta.float() / c.sqrt()
    return torch.stack([c, -scale * LOG2E, scale]).contiguous()


def _heads_first(t):
    """(batch, seq, heads) -> contiguous float32 (batch, heads, seq): the kernels' layout of time components."""
    return t.float().transpose(1, 2).contiguous()


@torch.library.custom_op("kernels::hyperbolic_attention_forward", mutates_args=())
def _hyperbolic_forward(q_s: torch.Tensor, k_s: torch.Tensor, q0: torch.Tensor, k0: torch.Tensor, v: torch.Tensor,
                        curvature: torch.Tensor, beta: torch.Tensor,
                        causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of softmax(-beta d_c(q, k)) v, lse in base 2 like _forward's."""
    q_s, k_s, v = (unit_last_stride(t) for t in (q_s, k_s, v))
    geometry = _geometry(curvature, beta, q_s.shape[2])
    return _launch_forward(q_s, k_s, v, causal, 0.0, (_heads_first(q0), _heads_first(k0), geometry))


@_hyperbolic_forward.register_fake
def _(q_s, k_s, q0, k0, v, curvature, beta, causal):
    B, n_q, H, _ = q_s.shape
    return q_s.new_empty(q_s.shape), q_s.new_empty((B, H, n_q), dtype=torch.float32)


@torch.library.custom_op("kernels::hyperbolic_attention_backward", mutates_args=())
def _hyperbolic_backward(do: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor, q0: torch.Tensor, k0: torch.Tensor,
                         v: torch.Tensor, curvature: torch.Tensor, beta: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """(dq_s, dk_s, dq0, dk0, dv, dcurvature, dbeta). The kernels give dq_s, dk_s, dv, dq0, dk0 and, per query
    row, the sums over keys of dS arcosh(z) and dS' z; with s = -beta arcosh(z) / sqrt(c), z = -c <q, k>_L and
    dS' = -c dL/dz, the per-head gradients are dbeta = -sum(dS arcosh) / sqrt(c) and
    dc = sum(dS arcosh) beta / (2 c^1.5) - sum(dS' z) / c^2 (summed over a kv head's query heads)."""
    do, q_s, k_s, v, o = (unit_last_stride(t) for t in (do, q_s, k_s, v, o))
    B, n_q, H, _ = q_s.shape
    H_kv, n_k = k_s.shape[2], k_s.shape[1]
    geometry = _geometry(curvature, beta, H)
    dq0 = torch.empty((B, H, n_q), dtype=torch.float32, device=q_s.device)
    dk0 = torch.empty((B, H, n_k), dtype=torch.float32, device=q_s.device)  # per query head, as dK (summed below)
    sums = torch.empty((2, B, H, n_q), dtype=torch.float32, device=q_s.device)
    dq_s, dk_s, dv = _launch_backward(do, q_s, k_s, v, o, lse, causal, 1.0, True,
                                      (_heads_first(q0), _heads_first(k0), geometry, dq0, dk0, sums))
    dist_sum, z_sum = sums.sum((1, 3)).double()
    c, b = geometry[0].double(), beta.double()
    dbeta = -dist_sum / c.sqrt()
    dc = (dist_sum * b / (2 * c ** 1.5) - z_sum / c ** 2).view(H_kv, H // H_kv).sum(1)
    dk0 = dk0.view(B, H_kv, H // H_kv, n_k).sum(2)
    dq0, dk0 = (t.transpose(1, 2).to(like.dtype).contiguous() for t, like in ((dq0, q0), (dk0, k0)))
    return dq_s, dk_s, dq0, dk0, dv, dc.to(curvature.dtype), dbeta.to(beta.dtype)


@_hyperbolic_backward.register_fake
def _(do, q_s, k_s, q0, k0, v, curvature, beta, o, lse, causal):
    return tuple(t.new_empty(t.shape) for t in (q_s, k_s, q0, k0, v, curvature, beta))


def _save_for_hyperbolic_backward(ctx, inputs, output):
    *tensors, ctx.causal = inputs
    ctx.save_for_backward(*tensors, *output)


def _hyperbolic_gradients(ctx, do, _lse_grad):
    q_s, k_s, q0, k0, v, curvature, beta, o, lse = ctx.saved_tensors
    return *_hyperbolic_backward(do, q_s, k_s, q0, k0, v, curvature, beta, o, lse, ctx.causal), None


_hyperbolic_forward.register_autograd(_hyperbolic_gradients, setup_context=_save_for_hyperbolic_backward)


def hyperbolic_flash_attention(q_s, k_s, q0, k0, v, curvature, beta, causal=True):
    """softmax(-beta d_c(q, k)) v on the hyperboloid (kernels/hyperbolic.py), FlashAttention-style: q_s
    (batch, seq, heads, head_dim) and q0 (batch, seq, heads) from expmap0, likewise k_s, k0 and v with kv_heads;
    curvature (kv_heads,) > 0, beta (heads,). Differentiable in all of them; the same devices, dtypes (for q_s,
    k_s, v) and head dims as flash_attention. The backward is always the deterministic one."""
    check_kernel_inputs("hyperbolic_flash_attention", q_s, k_s, v, causal)
    if q0.shape != q_s.shape[:3] or k0.shape != k_s.shape[:3]:
        raise ValueError(f"q0 {tuple(q0.shape)}, k0 {tuple(k0.shape)} must be q_s's and k_s's shapes without head_dim")
    if curvature.shape != (k_s.shape[2],) or beta.shape != (q_s.shape[2],):
        raise ValueError(f"curvature must have one value per kv head and beta one per head; got "
                         f"{tuple(curvature.shape)} and {tuple(beta.shape)}")
    return _hyperbolic_forward(q_s, k_s, q0, k0, v, curvature, beta, causal)[0]
