"""The chunked linear cross-entropy against F.linear + F.cross_entropy: loss, both gradients, memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


def inputs(n, d=12, v=37, dtype=torch.float64, seed=0, ignored=0.0, weighted=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=dtype) / d**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = -100
    token_weights = torch.rand(n, generator=g, dtype=dtype) * 3 if weighted else None
    return hidden, weight, targets, token_weights


def loss_and_grads(fn, hidden, weight, targets, token_weights, **kw):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets, token_weights, **kw)
    (loss * 1.7).backward()  # a grad_output other than 1
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("n,chunk", [(1, 4), (17, 5), (17, 64), (130, 32)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference_float64(n, chunk, reduction, weighted):
    args = inputs(n, ignored=0.3, weighted=weighted)
    ours = loss_and_grads(linear_cross_entropy, *args, reduction=reduction, chunk_tokens=chunk)
    ref = loss_and_grads(linear_cross_entropy_reference, *args, reduction=reduction)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_matches_reference_float32_at_realistic_width():
    args = inputs(300, d=64, v=1000, dtype=torch.float32, ignored=0.1)
    ours = loss_and_grads(linear_cross_entropy, *args, chunk_tokens=128)
    ref = loss_and_grads(linear_cross_entropy_reference, *args)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mean_divides_by_non_ignored_count_and_all_ignored_gives_zero():
    hidden, weight, targets, _ = inputs(10)
    masked = targets.clone()
    masked[5:] = -100
    expected = linear_cross_entropy_reference(hidden[:5], weight, targets[:5])
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, masked, chunk_tokens=3), expected)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, torch.full_like(targets, -100)),
                               torch.zeros((), dtype=torch.float64))


def test_frozen_weight_or_frozen_hidden():
    hidden, weight, targets, _ = inputs(9)
    ref_h, ref_w = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, None)[1:]
    loss = linear_cross_entropy(hidden, weight.detach(), targets, chunk_tokens=4)
    hidden.grad = None
    (loss * 1.7).backward()
    torch.testing.assert_close(hidden.grad, ref_h)
    loss = linear_cross_entropy(hidden.detach(), weight, targets, chunk_tokens=4)
    weight.grad = None
    (loss * 1.7).backward()
    torch.testing.assert_close(weight.grad, ref_w)


def test_no_grad_gives_the_loss_only():
    hidden, weight, targets, _ = inputs(17)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=4)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, targets).detach())


def test_bf16_inputs_close_to_fp32_reference():
    hidden, weight, targets, _ = inputs(64, d=32, v=200, dtype=torch.float32)
    loss = linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets, chunk_tokens=24)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, targets), rtol=2e-2, atol=0)


def test_autocast_computes_in_the_autocast_dtype_and_returns_input_dtype_grads():
    hidden, weight, targets, _ = inputs(40, d=32, v=100, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=16)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    ref = loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, None)
    torch.testing.assert_close(loss.detach(), ref[0], rtol=2e-2, atol=0)
    assert not torch.equal(loss.detach(), ref[0])  # the matmuls really ran in bf16


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_intermediate(fn, n, v, **kw):
    hidden, weight, targets, _ = inputs(n, d=8, v=v, dtype=torch.float32)
    with LargestTensor() as mode:
        fn(hidden, weight, targets, **kw).backward()
    return mode.largest


def test_largest_intermediate_is_one_chunk_of_logits_not_tokens_times_vocab():
    n, v, chunk = 1024, 1000, 64
    assert largest_intermediate(linear_cross_entropy_reference, n, v) >= n * v
    ours = largest_intermediate(linear_cross_entropy, n, v, chunk_tokens=chunk)
    assert ours == chunk * v
    assert largest_intermediate(linear_cross_entropy, 4 * n, v, chunk_tokens=chunk) == ours  # 4x the tokens
