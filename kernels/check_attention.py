"""make triton-attn: the Triton attention kernel against the float64 reference, forward and gradients.

The bar is PyTorch's own attention (SDPA) in the same dtype: each of out, dq, dk, dv may be off by at most twice
SDPA's error plus a small floor, which holds in bf16 as in fp32. On CUDA the shapes are a training step's; without
CUDA the kernel runs in Triton's interpreter on tiny shapes. Exits 1 on a mismatch.
"""

import functools
import os
import sys
import time

import torch

import torch.nn.functional as F

from kernels.attention import INTERPRETED, flash_attention
from kernels.attention_torch import attention_reference
from kernels.support import runs_here

ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
NAMES = ("out", "dq", "dk", "dv")


def sdpa(q, k, v, causal=True):
    """The peer: PyTorch's fused attention in the inputs' dtype, in the same (batch, seq, heads, dim) layout."""
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal,
                                         enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def random_inputs(batch, n_q, heads, head_dim, dtype, device, n_k=None, seed=0, kv_heads=None):
    """q, k, v and an output gradient in float64, on device; k and v with kv_heads heads (default: heads)."""
    g = torch.Generator(device).manual_seed(seed)
    kv_shape = (batch, n_k or n_q, kv_heads or heads, head_dim)
    shapes = [(batch, n_q, heads, head_dim), kv_shape, kv_shape, (batch, n_q, heads, head_dim)]
    return [torch.randn(s, generator=g, device=device, dtype=torch.float64) for s in shapes]


def output_and_grads(fn, q, k, v, do, causal, dtype):
    """fn's output and (dq, dk, dv) for do, computed from q, k, v cast to dtype, returned in float64."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, causal=causal)
    out.backward(do.to(dtype))
    return [t.double() for t in (out, *(x.grad for x in leaves))]


def max_errors(fn, q, k, v, do, causal, dtype, gold):
    return [(a - b).abs().max().item() for a, b in zip(output_and_grads(fn, q, k, v, do, causal, dtype), gold)]


def compare(q, k, v, do, causal, dtype, deterministic=False):
    """(ours, SDPA's) max errors against the float64 reference for out, dq, dk, dv, and whether ours pass."""
    gold = output_and_grads(attention_reference, q, k, v, do, causal, torch.float64)
    ours = max_errors(functools.partial(flash_attention, deterministic=deterministic), q, k, v, do, causal, dtype,
                      gold)
    peer = max_errors(sdpa, q, k, v, do, causal, dtype, gold)
    ok = all(o <= 2 * p + ERROR_FLOOR[dtype] for o, p in zip(ours, peer))
    return ours, peer, ok


def seconds_per_call(fn, repeats):
    """Wall time of fn after one warm-up call (which compiles and autotunes)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def time_attention(q, k, v, do, causal, repeats, deterministic=False):
    """(forward, forward + backward) seconds per call."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    forward = seconds_per_call(lambda: flash_attention(q, k, v, causal=causal), repeats)
    both = seconds_per_call(lambda: flash_attention(q, k, v, causal=causal, deterministic=deterministic)
                            .backward(do), repeats)
    return forward, both


def main() -> int:
    if not runs_here(INTERPRETED):
        # Without CUDA the kernels need Triton's interpreter, which Triton reads when it decorates them, and
        # `python -m` imported the kernels package before this line ran: start again with it switched on.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "kernels.check_attention", *sys.argv[1:]])
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        cases = [(4, 2048, 16, 16, d, torch.bfloat16, c, False) for d in (64, 128) for c in (True, False)]
        cases.append((2, 1000, 4, 4, 64, torch.float16, True, False))  # a ragged length
        cases.append((2, 1000, 4, 4, 64, torch.float16, True, True))  # the deterministic backward
        cases.append((4, 2048, 16, 4, 128, torch.bfloat16, True, False))  # grouped-query attention
        repeats = 20
        print(f"CUDA: {torch.cuda.get_device_name()}")
    else:
        # fp16, not bf16: the interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584)
        cases = [(2, 67, 2, 2, 32, torch.float32, c, False) for c in (True, False)]
        cases += [(1, 67, 2, 2, 32, torch.float16, True, False), (1, 67, 4, 2, 32, torch.float32, True, True)]
        repeats = 1
        print("no CUDA: the kernels run in Triton's interpreter on tiny shapes (timings are the interpreter's)")
    print(f"{'batch x seq x heads/kv x dim':>29} {'dtype':>9} {'causal':>6} {'determ.':>7}  "
          f"{'max error ours / SDPA: ' + ', '.join(NAMES):<58} {'fwd ms':>8} {'fwd+bwd ms':>10}")
    failed = 0
    for batch, seq, heads, kv_heads, dim, dtype, causal, deterministic in cases:
        q, k, v, do = random_inputs(batch, seq, heads, dim, dtype, device, kv_heads=kv_heads)
        ours, peer, ok = compare(q, k, v, do, causal, dtype, deterministic)
        forward, both = time_attention(*(t.to(dtype) for t in (q, k, v, do)), causal, repeats, deterministic)
        errors = ", ".join(f"{o:.1e}/{p:.1e}" for o, p in zip(ours, peer))
        print(f"{f'{batch} x {seq} x {heads}/{kv_heads} x {dim}':>29} {str(dtype)[6:]:>9} {str(causal):>6} "
              f"{str(deterministic):>7}  {errors:<58} {forward * 1e3:>8.2f} {both * 1e3:>10.2f}  "
              f"{'ok' if ok else 'MISMATCH'}")
        failed += not ok
    print("all match" if not failed else f"{failed} case(s) beyond 2x SDPA's error + {ERROR_FLOOR}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
