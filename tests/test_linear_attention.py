"""The chunked gated linear attention kernels, and the chunked PyTorch form, against the recurrent reference.

Every case checks the output, the final state and the gradients of q, k, v, g and the initial state against the
reference run in float64. Without CUDA the kernels run in Triton's interpreter, switched on here before kernels is
imported (see tests/test_kernels.py); interpreter cases are small, the cases marked gpu run at training sizes.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.linear_attention import INTERPRETED, linear_attention  # noqa: E402
from kernels.linear_attention_torch import (CHUNK, linear_attention_chunked_torch,  # noqa: E402
                                            linear_attention_reference, linear_attention_step)
from kernels.support import runs_here  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not runs_here(INTERPRETED),
                                  reason="kernels was imported before TRITON_INTERPRET=1 was set")
# Relative to the largest gold value: fp32 kernels measure ~5e-7, a wrong term is off by 1e-3 or far more.
FP32_TOLERANCE = 1e-5
HALF_FLOOR = {torch.float16: 2e-4, torch.bfloat16: 2e-3}
NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "d initial_state")


def make_inputs(batch, seq, heads, key_dim, value_dim, decay=0.1, seed=0):
    """q, k, v, g, initial_state and the gradients of o and of the final state, in float64. g = -decay *
    softplus(x - 2) averages about -0.02 at decay 0.1: a chunk keeps ~30% of the state, so chunks talk."""
    gen = torch.Generator(DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float64)

    q, k = randn(batch, seq, heads, key_dim), randn(batch, seq, heads, key_dim)
    v, g = randn(batch, seq, heads, value_dim), -decay * F.softplus(randn(batch, seq, heads) - 2)
    return dict(q=q, k=k, v=v, g=g, initial_state=randn(batch, heads, key_dim, value_dim),
                do=randn(batch, seq, heads, value_dim), dfinal=randn(batch, heads, key_dim, value_dim))


def outputs_and_grads(fn, x, dtype, g_dtype=None, initial=True, final=True):
    """fn's o, final state and gradients (None where not asked for) with q, k, v in dtype, g in g_dtype
    (default: dtype) and the initial state in float32 (float64 for float64), all returned in float64."""
    leaves = [x[name].detach().to(dtype).requires_grad_() for name in "qkv"]
    leaves.append(x["g"].detach().to(g_dtype or dtype).requires_grad_())
    state = x["initial_state"].detach().to(torch.promote_types(dtype, torch.float32)).requires_grad_()
    state = state if initial else None
    out = fn(*leaves, initial_state=state, output_final_state=final)
    o, final_state = out if final else (out, None)
    if final:
        torch.autograd.backward([o, final_state], [x["do"].to(o.dtype), x["dfinal"]])
    else:
        o.backward(x["do"].to(o.dtype))
    results = [o, final_state, *(leaf.grad for leaf in leaves), state.grad if initial else None]
    return [None if t is None else t.detach().double() for t in results]


def relative_errors(ours, gold):
    """max |ours - gold| / max |gold| per result (max |gold| counted as at least 1, for gradients that are ~0)."""
    return {name: ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()
            for name, a, b in zip(NAMES, ours, gold) if b is not None}


def assert_matches_reference(fn, x, dtype=torch.float32, tolerance=FP32_TOLERANCE, **flags):
    gold = outputs_and_grads(linear_attention_reference, x, torch.float64, **flags)
    errors = relative_errors(outputs_and_grads(fn, x, dtype, **flags), gold)
    assert max(errors.values()) <= tolerance, f"relative errors {errors}, allowed {tolerance}"


def skip_bf16_in_interpreter(dtype):
    if dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)")


def test_kernels_run_in_the_interpreter_without_cuda():
    if DEVICE == "cuda":
        pytest.skip("CUDA: the kernels are compiled")
    assert INTERPRETED and runs_here(INTERPRETED)


@needs_triton
@pytest.mark.parametrize("batch,seq,heads,key_dim,value_dim,initial,final", [
    (1, 1, 2, 16, 16, False, False),
    (2, 17, 1, 32, 16, True, True),
    (1, 63, 2, 16, 32, False, True),
    (1, CHUNK, 2, 32, 32, True, False),
    (2, CHUNK + 1, 2, 16, 16, True, True),
    (1, 2 * CHUNK + 2, 2, 32, 32, True, True),
    (1, 40, 1, 64, 16, False, True),
])
def test_kernel_float32_matches_float64_reference(batch, seq, heads, key_dim, value_dim, initial, final):
    x = make_inputs(batch, seq, heads, key_dim, value_dim)
    assert_matches_reference(linear_attention, x, initial=initial, final=final)


@needs_triton
@pytest.mark.parametrize("decay", ["none", "strong", "mixed"])
def test_kernel_without_and_with_strong_decay_stays_finite_and_correct(decay):
    """none: g = 0, the state only grows. strong: alpha = exp(-1e4) = 0, each position sees only itself. mixed: 30%
    of positions forget almost all (g = -50); there the in-chunk cumulative sums reach ~-1000 and their fp32
    rounding (~1e-4) limits the accuracy of exp(b_i - b_j), as it does for any chunked form."""
    x = make_inputs(1, 2 * CHUNK + 2, 2, 16, 16)
    forget = torch.rand(x["g"].shape, generator=torch.Generator(DEVICE).manual_seed(1), device=DEVICE) < 0.3
    x["g"] = {"none": torch.zeros_like(x["g"]), "strong": torch.full_like(x["g"], -1e4),
              "mixed": x["g"].masked_fill(forget, -50.0)}[decay]
    ours = outputs_and_grads(linear_attention, x, torch.float32)
    assert all(torch.isfinite(t).all() for t in ours)
    errors = relative_errors(ours, outputs_and_grads(linear_attention_reference, x, torch.float64))
    assert max(errors.values()) <= (1e-4 if decay == "mixed" else FP32_TOLERANCE), errors


@needs_triton
@pytest.mark.parametrize("decay", [0.1, 0.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision_is_as_close_as_the_reference_in_that_dtype(dtype, decay):
    """The bar is the reference given the same rounded inputs (it computes in fp32 and rounds the results); g is
    float32, as a model keeps it."""
    skip_bf16_in_interpreter(dtype)
    x = make_inputs(1, CHUNK + 36, 2, 32, 32, decay=decay)
    gold = outputs_and_grads(linear_attention_reference, x, torch.float64)
    ours = relative_errors(outputs_and_grads(linear_attention, x, dtype, torch.float32), gold)
    peer = relative_errors(outputs_and_grads(linear_attention_reference, x, dtype, torch.float32), gold)
    for name in ours:
        assert ours[name] <= 2 * peer[name] + HALF_FLOOR[dtype], f"{name}: ours {ours}, reference {peer}"


@needs_triton
def test_kernel_on_strided_views_with_a_custom_scale():
    """q, k, v and the gate logit cut from one projection, as a model makes them: none is contiguous."""
    gen = torch.Generator(DEVICE).manual_seed(2)
    proj = torch.randn(2, 33, 2, 3 * 16 + 1, generator=gen, device=DEVICE, dtype=torch.float64)
    do = torch.randn(2, 33, 2, 16, generator=gen, device=DEVICE, dtype=torch.float64)
    results = []
    for fn, dtype in ((linear_attention, torch.float32), (linear_attention_reference, torch.float64)):
        leaf = proj.to(dtype).requires_grad_()
        q, k, v, logit = leaf[..., :16], leaf[..., 16:32], leaf[..., 32:48], leaf[..., 48]
        o = fn(q, k, v, -F.softplus(logit - 3), scale=0.3)
        o.backward(do.to(dtype))
        results.append((o.double(), leaf.grad.double()))
    for ours, gold in zip(*results):
        torch.testing.assert_close(ours, gold, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [CHUNK, 16])
def test_chunked_torch_form_matches_the_reference(chunk):
    """In float64 the chunked form and the recurrence agree to rounding: the chunked algebra is exact."""
    x = make_inputs(2, 2 * CHUNK + 2, 2, 16, 8)
    assert_matches_reference(lambda *a, **kw: linear_attention_chunked_torch(*a, **kw, chunk=chunk), x,
                             torch.float64, tolerance=1e-12)


@needs_triton
def test_decoding_steps_continue_a_prefill_with_a_state_of_constant_size():
    x = make_inputs(2, 27, 2, 16, 32)
    q, k, v, g = (x[name].float() for name in "qkvg")
    gold = linear_attention_reference(q, k, v, g)
    prefill, state = linear_attention(q[:, :20], k[:, :20], v[:, :20], g[:, :20], output_final_state=True)
    outputs, sizes = [prefill], set()
    for t in range(20, 27):
        o, state = linear_attention_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], state)
        outputs.append(o)
        sizes.add((state.shape, state.dtype))
    torch.testing.assert_close(torch.cat(outputs, 1), gold, atol=1e-5, rtol=1e-5)
    assert sizes == {((2, 2, 16, 32), torch.float32)}


def test_step_from_no_state_is_the_reference_token_by_token():
    x = make_inputs(1, 5, 2, 16, 16)
    state, outputs = None, []
    for t in range(5):
        o, state = linear_attention_step(*(x[name][:, t:t + 1] for name in "qkvg"), state)
        outputs.append(o)
    gold, final = linear_attention_reference(*(x[name] for name in "qkvg"), output_final_state=True)
    torch.testing.assert_close(torch.cat(outputs, 1), gold)
    torch.testing.assert_close(state, final)
    # by hand at t = 1: S = exp(g_1) k_0^T v_0 + k_1^T v_1, o_1 = q_1 S / sqrt(16)
    q, k, v, g = (x[name][0, :, 0] for name in "qkvg")
    by_hand = q[1] @ (torch.exp(g[1]) * torch.outer(k[0], v[0]) + torch.outer(k[1], v[1])) / 4
    torch.testing.assert_close(gold[0, 1, 0], by_hand)


def test_pytorch_forms_work_where_triton_is_not_installed():
    """The model's CPU path and chat import them on machines without Triton (it is Linux-only)."""
    code = ("import sys; sys.modules['triton'] = None; import torch, kernels\n"
            "x = torch.randn(1, 70, 2, 16)\n"
            "o, state = kernels.linear_attention_chunked_torch(x, x, x, -x[..., 0].abs(), output_final_state=True)\n"
            "kernels.linear_attention_step(x[:, :1], x[:, :1], x[:, :1], -x[:, :1, :, 0].abs(), state)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_linear_attention_rejects_what_it_does_not_support():
    q, v, g = torch.zeros(1, 8, 2, 16, device=DEVICE), torch.zeros(1, 8, 2, 32, device=DEVICE), torch.zeros(1, 8, 2)
    with pytest.raises(ValueError, match="key and value dims"):
        linear_attention(*(torch.zeros(1, 8, 2, 24, device=DEVICE),) * 3, g)
    with pytest.raises(ValueError, match="key and value dims"):
        linear_attention(q, q, torch.zeros(1, 8, 2, 256, device=DEVICE), g)
    with pytest.raises(ValueError, match="dtype"):
        linear_attention(q.double(), q.double(), v.double(), g)
    with pytest.raises(ValueError, match="do not match"):
        linear_attention(q, q, v, g[:, :7])
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention(q, q, v, g, initial_state=torch.zeros(1, 2, 32, 16))


@needs_triton
def test_custom_ops_pass_opcheck_and_compile_into_one_graph():
    """opcheck: schema, fake versions and autograd registration agree with the kernels. fullgraph=True fails on any
    graph break; aot_eager traces forward and backward through the fake versions, then runs the kernels."""
    x = make_inputs(1, 9, 1, 16, 16)
    q, k, v, g, state, do, dfinal = (x[name].float() for name in ("q", "k", "v", "g", "initial_state", "do", "dfinal"))
    forward, backward = torch.ops.kernels.linear_attention_forward, torch.ops.kernels.linear_attention_backward
    torch.library.opcheck(forward, (q.requires_grad_(), k, v, g.requires_grad_(), state.requires_grad_(), 0.25))
    torch.library.opcheck(backward, (do, dfinal, q.detach(), k, v, g.detach(), state.detach(), 0.25))

    def block(q, k, v, g):
        o, final = linear_attention(q, k, v, -F.softplus(g), output_final_state=True)
        return o.square().sum() + final.sum()

    results = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, g)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss, *(leaf.grad for leaf in leaves)])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


# --- GPU, training sizes: the gold is the chunked form in float64, which matches the recurrence above --------

def gpu_errors(x, dtype):
    """(ours, the chunked form's in dtype) relative errors against float64."""
    gold = outputs_and_grads(linear_attention_chunked_torch, x, torch.float64)
    ours = relative_errors(outputs_and_grads(linear_attention, x, dtype, torch.float32), gold)
    peer = relative_errors(outputs_and_grads(linear_attention_chunked_torch, x, dtype, torch.float32), gold)
    return ours, peer


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,seq,decay", [(torch.bfloat16, 4096, 0.1), (torch.bfloat16, 1000, 1.0),
                                             (torch.float16, 1000, 0.0), (torch.bfloat16, 4096, 0.0)])
def test_gpu_linear_attention_at_training_sizes(dtype, seq, decay):
    ours, peer = gpu_errors(make_inputs(2, seq, 4, 128, 128, decay=decay), dtype)
    for name in ours:
        assert ours[name] <= 2 * peer[name] + HALF_FLOOR[dtype], f"{name}: ours {ours}, chunked torch {peer}"


@pytest.mark.gpu
def test_gpu_linear_attention_float32_other_head_dims_and_deterministic_backward():
    x = make_inputs(2, 777, 3, 64, 128)
    ours, _ = gpu_errors(x, torch.float32)
    assert max(ours.values()) <= 1e-4, ours  # fp32 cumulative sums over long sequences, TF32-free matmuls
    runs = [outputs_and_grads(linear_attention, x, torch.bfloat16, torch.float32) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
