"""The Triton attention and RMSNorm kernels against their PyTorch references: outputs and every gradient.

Without CUDA the kernels run on CPU tensors in Triton's interpreter, which Triton switches on when it decorates a
kernel, i.e. when kernels is first imported: hence the environment variable set here, before any import of
kernels. Interpreter cases are small (head_dim 16-32, up to a few hundred tokens) because it is slow, and some
re-decorate the kernels to run the GPU configs' block shapes there; the cases marked gpu run at training sizes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton  # noqa: E402

from kernels import attention  # noqa: E402
from kernels.check_attention import ERROR_FLOOR, compare, random_inputs  # noqa: E402
from kernels.attention import INTERPRETED, flash_attention  # noqa: E402
from kernels.attention_torch import attention_reference  # noqa: E402
from kernels.norm import rms_norm, rms_norm_residual, rows_per_step  # noqa: E402
from kernels.norm_torch import rms_norm_reference, rms_norm_residual_reference  # noqa: E402
from kernels.support import runs_here  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not runs_here(INTERPRETED), reason="kernels was imported before TRITON_INTERPRET=1 "
                                  "was set (see test_kernels_run_in_the_interpreter_without_cuda)")


def test_kernels_run_in_the_interpreter_without_cuda():
    if DEVICE == "cuda":
        pytest.skip("CUDA: the kernels are compiled")
    assert INTERPRETED, ("kernels was imported before this module set TRITON_INTERPRET=1, so its kernels were made "
                         "for a GPU: set TRITON_INTERPRET=1 in the environment, or import kernels lazily elsewhere")
    assert runs_here(INTERPRETED)


def skip_bf16_attention_in_interpreter(dtype):
    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)")


def assert_attention_matches(batch, n_q, heads, head_dim, dtype, causal, n_k=None, deterministic=False,
                             kv_heads=None):
    q, k, v, do = random_inputs(batch, n_q, heads, head_dim, dtype, DEVICE, n_k=n_k, kv_heads=kv_heads)
    ours, peer, ok = compare(q, k, v, do, causal, dtype, deterministic)
    assert ok, f"max errors out, dq, dk, dv: ours {ours}, SDPA {peer} (allowed: 2x SDPA + {ERROR_FLOOR[dtype]})"


# --- attention ---------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq", [1, 17, 130])
def test_attention_float32_matches_float64_reference(seq, causal):
    assert_attention_matches(2, seq, 2, 32, torch.float32, causal)


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq", [17, 130])
def test_deterministic_backward_matches_float64_reference(seq, causal):
    assert_attention_matches(2, seq, 2, 32, torch.float32, causal, deterministic=True)


def use_gpu_block_shapes(monkeypatch, shape):
    """Run each kernel with its GPU config whose wide block is the most ("widest") or the fewest ("squarest")
    times its narrow one: the interpreter's own config is small, and the diagonal and ragged-end logic depends on
    the block shapes."""
    pick = max if shape == "widest" else min
    for name, choices, wide_over_narrow in [("_attn_fwd", attention.FWD_GPU, lambda m, n: m / n),
                                            ("_attn_bwd_dkdv", attention.DKDV_GPU, lambda m, n: n / m),
                                            ("_attn_bwd_dq", attention.DQ_GPU, lambda m, n: m / n)]:
        m, n = pick(((m, n) for m, n, _, _ in choices), key=lambda mn: wide_over_narrow(*mn))
        kernel = getattr(attention, name)
        config = triton.Config({"BLOCK_M": m, "BLOCK_N": n})
        monkeypatch.setattr(attention, name, triton.autotune([config], key=attention.TUNE_KEY)(kernel.fn))


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", ["widest", "squarest"])
def test_attention_with_the_gpu_block_shapes(monkeypatch, shape, causal, deterministic):
    """260 = 2 x 128 + 4: whole blocks, the diagonal and a ragged end for every GPU block size."""
    use_gpu_block_shapes(monkeypatch, shape)
    assert_attention_matches(1, 260, 2, 16, torch.float32, causal, deterministic=deterministic)


@needs_triton
@pytest.mark.parametrize("dtype,seq,causal", [(torch.float16, 130, True), (torch.float16, 17, False),
                                              (torch.bfloat16, 130, True), (torch.bfloat16, 17, False)])
def test_attention_half_precision_is_as_close_as_sdpa(dtype, seq, causal):
    skip_bf16_attention_in_interpreter(dtype)
    assert_attention_matches(2, seq, 2, 32, dtype, causal)


@needs_triton
@pytest.mark.parametrize("head_dim,seq,causal", [(16, 33, True), (64, 40, False)])
def test_attention_other_head_dims(head_dim, seq, causal):
    assert_attention_matches(1, seq, 2, head_dim, torch.float32, causal)


@needs_triton
@pytest.mark.parametrize("kv_heads,causal,deterministic", [(1, True, False), (2, False, False), (2, True, True)])
def test_grouped_query_attention_without_repeating_kv_heads(kv_heads, causal, deterministic):
    """4 query heads on 1 or 2 kv heads: dK and dV sum over each kv head's group."""
    assert_attention_matches(2, 67, 4, 16, torch.float32, causal, deterministic=deterministic, kv_heads=kv_heads)


@needs_triton
def test_grouped_query_attention_with_the_gpu_block_shapes(monkeypatch):
    use_gpu_block_shapes(monkeypatch, "widest")
    assert_attention_matches(1, 260, 4, 16, torch.float32, True, kv_heads=2)


@needs_triton
def test_bidirectional_attention_with_more_keys_than_queries():
    assert_attention_matches(2, 17, 2, 16, torch.float32, False, n_k=70)


@needs_triton
def test_attention_on_strided_views_with_a_custom_scale():
    """q, k, v cut from one fused projection (batch, seq, 3, heads, dim): strided, as in a fused-qkv model."""
    g = torch.Generator(DEVICE).manual_seed(1)
    qkv = torch.randn(2, 50, 3, 2, 16, generator=g, device=DEVICE, requires_grad=True)
    gold_qkv = qkv.detach().double().requires_grad_()
    do = torch.randn(2, 50, 2, 16, generator=g, device=DEVICE)
    out = flash_attention(*qkv.unbind(2), causal=True, softmax_scale=0.3)
    gold = attention_reference(*gold_qkv.unbind(2), causal=True, softmax_scale=0.3)
    out.backward(do)
    gold.backward(do.double())
    torch.testing.assert_close(out.double(), gold, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), gold_qkv.grad, atol=1e-5, rtol=1e-5)


@needs_triton
def test_autotuning_is_keyed_on_length_buckets_so_a_new_length_reuses_its_buckets_choice(monkeypatch):
    """Chat prompts come in every length: only a new power-of-two bucket may tune again."""
    assert [attention.tuning_bucket(n) for n in (1, 130, 256, 257, 10**6)] == [1, 256, 256, 512, 16384]
    blocks = attention._attn_fwd.configs[0].kwargs
    fwd = triton.autotune([triton.Config(blocks, num_warps=w) for w in (4, 8)], key=attention.TUNE_KEY,
                          do_bench=lambda fn, quantiles: [1.0] * 3)(attention._attn_fwd.fn)
    monkeypatch.setattr(attention, "_attn_fwd", fwd)
    q = torch.randn(1, 70, 1, 16, device=DEVICE)
    for seq in (33, 50, 64, 65, 70):
        flash_attention(q[:, :seq], q[:, :seq], q[:, :seq])
    assert len(fwd.cache) == 2


# H100 SXM: what torch reports as shared_memory_per_block_optin and multi_processor_count.
H100 = dict(shared_memory=232448, sm_count=132)


def gpu_configs(choices):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in choices]


def blocks(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in configs}


@pytest.mark.parametrize("kernel,measured", [("fwd", [(128, 128, 8, 3), (128, 64, 8, 4)]),
                                             ("dkdv", [(64, 128, 8, 3), (32, 128, 8, 3)]),
                                             ("dq", [(128, 64, 8, 3), (128, 32, 8, 3)])])
def test_shared_memory_estimate_admits_the_configs_that_compiled_and_drops_what_cannot_fit(kernel, measured):
    """The measured ones compiled for sm_90 at head_dim 128 in bf16; in fp32 every tile doubles."""
    choices = {"fwd": attention.FWD_GPU, "dkdv": attention.DKDV_GPU, "dq": attention.DQ_GPU}[kernel]
    for config in gpu_configs(measured):
        assert attention.shared_memory_bytes(kernel, config, 128, 2) <= H100["shared_memory"]
    wide = attention.autotune_candidates(kernel, gpu_configs(choices), 128, 2, 256, 4096, **H100)
    narrow = attention.autotune_candidates(kernel, gpu_configs(choices), 128, 4, 256, 4096, **H100)
    assert blocks(narrow) < blocks(wide)
    assert all(attention.shared_memory_bytes(kernel, c, 128, 4) <= H100["shared_memory"] for c in narrow)
    smallest = attention.autotune_candidates(kernel, gpu_configs(choices), 128, 2, 256, 4096, 1, 132)
    assert len(smallest) == 1  # nothing fits: the smallest is kept, to fail or not when it compiles


def test_small_grids_prefer_smaller_blocks_so_every_sm_gets_work():
    """One 1k sequence of 16 heads: 128-query blocks make 128 programs for 132 SMs, 64-query ones 256."""
    fwd = gpu_configs(attention.FWD_GPU)
    assert {m for m, _, _ in blocks(attention.autotune_candidates("fwd", fwd, 128, 2, 16, 1024, **H100))} == {64}
    assert {m for m, _, _ in blocks(attention.autotune_candidates("fwd", fwd, 128, 2, 256, 1024, **H100))} == {64, 128}
    dkdv = gpu_configs(attention.DKDV_GPU)  # splits the keys: BLOCK_N decides, over batch x kv heads
    assert {n for _, n, _ in blocks(attention.autotune_candidates("dkdv", dkdv, 128, 2, 4, 1024, **H100))} == {64}


@needs_triton
def test_autotuning_prunes_with_each_launchs_own_arguments(monkeypatch):
    """The prune hooks read the kernels' arguments by name: run them for real, on a pretend H100. At 100 tokens
    of 2 heads every grid is small, so only the 64-wide blocks survive. Equal timings would make the first
    config win: only pruning makes it the second. (Triton 3.6 times a lone survivor too; 3.9 does not.)"""
    import types

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        shared_memory_per_block_optin=H100["shared_memory"], multi_processor_count=H100["sm_count"]))
    tuners = {}
    for name, kernel, choices in [("_attn_fwd", "fwd", [(128, 64, 8, 3), (64, 64, 4, 3)]),
                                  ("_attn_bwd_dkdv", "dkdv", [(64, 128, 8, 3), (64, 64, 4, 3)]),
                                  ("_attn_bwd_dq", "dq", [(128, 64, 8, 3), (64, 64, 4, 3)])]:
        tuners[name] = triton.autotune(gpu_configs(choices), key=attention.TUNE_KEY,
                                       prune_configs_by={"early_config_prune": attention._prune(kernel)},
                                       do_bench=lambda fn, quantiles: [1.0] * 3)(
                                           getattr(attention, name).fn)
        monkeypatch.setattr(attention, name, tuners[name])
    assert_attention_matches(1, 100, 2, 16, torch.float32, True, deterministic=True)
    for tuner in tuners.values():
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in tuner.cache.values()] == [(64, 64)]


def test_attention_rejects_what_it_does_not_support():
    q = torch.zeros(1, 8, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="as many keys"):
        flash_attention(q, torch.zeros(1, 9, 2, 16), torch.zeros(1, 9, 2, 16), causal=True)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(*(torch.zeros(1, 8, 2, 24, device=DEVICE),) * 3)
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="divides q's"):
        flash_attention(torch.zeros(1, 8, 3, 16, device=DEVICE), q, q)


# --- RMSNorm -----------------------------------------------------------------------------------------------

def norm_inputs(shape, dtype, seed=0):
    """x, weight, residual, dy, dsum in float64 (weight around 1, as trained ones are)."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    x, residual, dy, dsum = (torch.randn(shape, generator=g, device=DEVICE, dtype=torch.float64) for _ in range(4))
    weight = 1 + 0.5 * torch.randn(shape[-1], generator=g, device=DEVICE, dtype=torch.float64)
    return x, weight, residual, dy, dsum


def norm_outputs_and_grads(fn, x, weight, dy, dtype, weight_dtype=None):
    """fn(x, weight)'s output, dx and dweight, with x in dtype and weight in weight_dtype (default: dtype)."""
    x = x.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(weight_dtype or dtype).requires_grad_()
    y = fn(x, weight, eps=1e-6)
    y.backward(dy.to(y.dtype))
    return [t.double() for t in (y, x.grad, weight.grad)]


def residual_outputs_and_grads(fn, x, residual, weight, dy, dsum, dtype, stream_dtype=None):
    """fn's outputs and gradients with x in dtype, residual and weight in stream_dtype (default: dtype)."""
    stream_dtype = stream_dtype or dtype
    leaves = [t.detach().to(d).requires_grad_() for t, d in ((x, dtype), (residual, stream_dtype),
                                                             (weight, stream_dtype))]
    y, total = fn(*leaves, eps=1e-6)
    torch.autograd.backward([y, total], [dy.to(y.dtype), dsum.to(total.dtype)])
    return [t.double() for t in (y, total, *(leaf.grad for leaf in leaves))]


def max_errors(results, gold):
    return [(a - b).abs().max().item() for a, b in zip(results, gold)]


@needs_triton
@pytest.mark.parametrize("shape", [(1, 8), (17, 100), (2, 3, 256), (4, 8192)])
def test_rms_norm_float32_matches_float64_reference(shape):
    x, weight, _, dy, _ = norm_inputs(shape, torch.float32)
    ours = norm_outputs_and_grads(rms_norm, x, weight, dy, torch.float32)
    gold = norm_outputs_and_grads(rms_norm_reference, x, weight, dy, torch.float64)
    for name, a, b in zip(["y", "dx", "dweight"], ours, gold):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", [None, torch.float32])  # float32: a float32 parameter under autocast
def test_rms_norm_half_precision_is_as_close_as_the_reference(dtype, weight_dtype):
    x, weight, _, dy, _ = norm_inputs((17, 100), dtype)
    ours = norm_outputs_and_grads(rms_norm, x, weight, dy, dtype, weight_dtype)
    peer = norm_outputs_and_grads(rms_norm_reference, x, weight, dy, dtype, weight_dtype)
    gold = norm_outputs_and_grads(rms_norm_reference, x, weight, dy, torch.float64)
    expected_dtype = torch.promote_types(dtype, weight_dtype or dtype)
    assert rms_norm(x.to(dtype), weight.to(weight_dtype or dtype)).dtype == expected_dtype
    for name, o, p in zip(["y", "dx", "dweight"], max_errors(ours, gold), max_errors(peer, gold)):
        assert o <= 2 * p + ERROR_FLOOR[dtype], f"{name}: ours {o:.2e}, reference in {dtype} {p:.2e}"


@needs_triton
@pytest.mark.parametrize("shape,dtype,weight_dtype", [((67, 256), torch.bfloat16, torch.float32),
                                                      ((5, 8192), torch.float16, torch.float32),
                                                      ((67, 256), torch.float32, None)])
def test_rms_norm_backward_steps_through_rows_in_groups_with_a_ragged_last(shape, dtype, weight_dtype):
    """Several rows per step and row counts no step size divides, so the last program stops mid-step; bf16/fp16 x
    with an fp32 weight is training's mix outside memory mode."""
    assert rows_per_step(shape[-1]) > 1 and shape[0] % rows_per_step(shape[-1])
    x, weight, _, dy, _ = norm_inputs(shape, dtype)
    ours = norm_outputs_and_grads(rms_norm, x, weight, dy, dtype, weight_dtype)
    peer = norm_outputs_and_grads(rms_norm_reference, x, weight, dy, dtype, weight_dtype)
    gold = norm_outputs_and_grads(rms_norm_reference, x, weight, dy, torch.float64)
    floor = 1e-5 if dtype == torch.float32 else ERROR_FLOOR[dtype]
    for name, o, p in zip(["y", "dx", "dweight"], max_errors(ours, gold), max_errors(peer, gold)):
        assert o <= 2 * p + floor, f"{name}: ours {o:.2e}, reference in {dtype} {p:.2e}"


@needs_triton
def test_rms_norm_rejects_rows_too_wide_for_registers_naming_the_limit():
    rms_norm(torch.ones(2, 16384, device=DEVICE), torch.ones(16384, device=DEVICE))
    with pytest.raises(ValueError, match="up to 16384; got 16385"):
        rms_norm(torch.ones(2, 16385, device=DEVICE), torch.ones(16385, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("dtype,stream_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.bfloat16, torch.float32)])  # a bf16 output, fp32 stream
def test_rms_norm_residual_matches_reference(dtype, stream_dtype):
    x, weight, residual, dy, dsum = norm_inputs((3, 7, 96), dtype)
    ours = residual_outputs_and_grads(rms_norm_residual, x, residual, weight, dy, dsum, dtype, stream_dtype)
    peer = residual_outputs_and_grads(rms_norm_residual_reference, x, residual, weight, dy, dsum, dtype,
                                      stream_dtype)
    gold = residual_outputs_and_grads(rms_norm_residual_reference, x, residual, weight, dy, dsum, torch.float64)
    assert [t.dtype for t in rms_norm_residual(x.to(dtype), residual.to(stream_dtype or dtype),
                                               weight.to(stream_dtype or dtype))] == [stream_dtype or dtype] * 2
    floor = 1e-5 if dtype == torch.float32 else ERROR_FLOOR[dtype]
    names = ["normed", "x + residual", "dx", "dresidual", "dweight"]
    for name, o, p in zip(names, max_errors(ours, gold), max_errors(peer, gold)):
        assert o <= 2 * p + floor, f"{name}: ours {o:.2e}, reference in {dtype} {p:.2e}"


@needs_triton
def test_rms_norm_residual_when_only_the_normed_output_is_used():
    x, weight, residual, dy, _ = norm_inputs((5, 64), torch.float32)
    leaves = [t.float().requires_grad_() for t in (x, residual, weight)]
    rms_norm_residual(*leaves)[0].backward(dy.float())
    gold_leaves = [t.clone().requires_grad_() for t in (x, residual, weight)]
    rms_norm_residual_reference(*gold_leaves)[0].backward(dy)
    for ours, gold in zip(leaves, gold_leaves):
        torch.testing.assert_close(ours.grad.double(), gold.grad, atol=1e-5, rtol=1e-5)


# --- torch.compile ------------------------------------------------------------------------------------------

def attention_block(x, residual, weight):
    """The kernels as a pre-norm block uses them: residual add + norm, attention, norm."""
    normed, total = rms_norm_residual(x, residual, weight)
    q = normed.unflatten(-1, (2, 16))
    out = flash_attention(q, q * 0.5, q.flip(-1), causal=True).flatten(-2)
    return rms_norm(out + total, weight)


@needs_triton
def test_torch_compile_keeps_the_kernels_in_one_graph_with_the_same_results():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward through the ops' fake
    versions (no C++ compiler needed, so this runs in CI) and then runs the real kernels."""
    x, weight, residual, _, _ = norm_inputs((2, 19, 32), torch.float32)
    results = []
    for fn in (attention_block, torch.compile(attention_block, fullgraph=True, backend="aot_eager")):
        leaves = [t.float().requires_grad_() for t in (x, residual, weight)]
        out = fn(*leaves)
        out.square().sum().backward()
        results.append([out, *(leaf.grad for leaf in leaves)])
    for name, eager, compiled in zip(["out", "dx", "dresidual", "dweight"], *results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


@needs_triton
def test_custom_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) versions and autograd registration agree with the real kernels."""
    q, k, v, _ = (t.float() for t in random_inputs(1, 9, 2, 16, torch.float32, DEVICE))
    x, weight, residual, dy, _ = (t.float() for t in norm_inputs((3, 24), torch.float32))
    o, lse = torch.ops.kernels.flash_attention_forward(q, k, v, True, 0.25, False)
    rstd = torch.ops.kernels.rms_norm_forward(x, weight, 1e-6)[1]
    cases = [
        (torch.ops.kernels.flash_attention_forward, (q.requires_grad_(), k, v, True, 0.25, False)),
        *((torch.ops.kernels.flash_attention_backward, (torch.randn_like(o), q.detach(), k, v, o, lse, True, 0.25,
                                                        deterministic)) for deterministic in (False, True)),
        (torch.ops.kernels.rms_norm_forward, (x.requires_grad_(), weight, 1e-6)),
        (torch.ops.kernels.rms_norm_residual_forward, (x, residual, weight.requires_grad_(), 1e-6)),
        (torch.ops.kernels.rms_norm_backward, (dy, x.detach(), weight.detach(), rstd, None)),
        (torch.ops.kernels.rms_norm_backward, (dy, x.detach(), weight.detach(), rstd, residual)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# --- GPU, training sizes -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq", [1024, 4096])
def test_gpu_attention_bf16_at_training_sizes(seq, head_dim, causal):
    assert_attention_matches(2, seq, 4, head_dim, torch.bfloat16, causal)


@pytest.mark.gpu
def test_gpu_attention_ragged_fp16_and_deterministic_backward():
    assert_attention_matches(2, 1000, 4, 128, torch.float16, True)
    assert_attention_matches(2, 1000, 4, 128, torch.float16, True, deterministic=True)
    q, k, v, do = (t.half() for t in random_inputs(2, 1000, 4, 128, torch.float16, DEVICE))
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        flash_attention(*leaves, causal=True, deterministic=True).backward(do)
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_grouped_query_attention_at_training_sizes(deterministic):
    assert_attention_matches(2, 2048, 16, 128, torch.bfloat16, True, deterministic=deterministic, kv_heads=4)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 2048), (1024, 8192)])
def test_gpu_rms_norm_bf16_at_training_sizes(shape):
    x, weight, residual, dy, dsum = norm_inputs(shape, torch.bfloat16)
    gold = norm_outputs_and_grads(rms_norm_reference, x, weight, dy, torch.float64)
    peer = norm_outputs_and_grads(rms_norm_reference, x, weight, dy, torch.bfloat16)
    ours = norm_outputs_and_grads(rms_norm, x, weight, dy, torch.bfloat16)
    for name, o, p in zip(["y", "dx", "dweight"], max_errors(ours, gold), max_errors(peer, gold)):
        assert o <= 2 * p + ERROR_FLOOR[torch.bfloat16], f"{name}: ours {o:.2e}, reference in bf16 {p:.2e}"
    gold = residual_outputs_and_grads(rms_norm_residual_reference, x, residual, weight, dy, dsum, torch.float64)
    peer = residual_outputs_and_grads(rms_norm_residual_reference, x, residual, weight, dy, dsum, torch.bfloat16)
    ours = residual_outputs_and_grads(rms_norm_residual, x, residual, weight, dy, dsum, torch.bfloat16)
    for o, p in zip(max_errors(ours, gold), max_errors(peer, gold)):
        assert o <= 2 * p + ERROR_FLOOR[torch.bfloat16]


def test_package_exposes_the_kernels_by_name():
    import kernels

    assert kernels.flash_attention is flash_attention and kernels.rms_norm is rms_norm
    assert kernels.linear_cross_entropy.__module__ == "kernels.cross_entropy"
    with pytest.raises(AttributeError, match="no attribute 'flash_attn'"):
        kernels.flash_attn
