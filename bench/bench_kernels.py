"""make bench-kernels: our Triton attention and RMSNorm against their peers, measured in the same process.

Attention: ours (and, forward + backward, ours with deterministic=True; and ours with attention_geometry=hyperbolic,
its exponential map of q and k included, as the model runs it), SDPA's FlashAttention-2 and cuDNN
backends, and flash-attn when installed; forward and forward + backward, 16k tokens per call (batch = 16384 //
seq), 16 heads, plus one grouped-query case (4 kv heads). FLOPs: forward 4 B H S^2 D (half when causal), forward +
backward 3.5x that. RMSNorm: 16384 x 2048, bf16 x with a bf16 weight and with an fp32 one (training's mix outside
memory mode: y and dy are then fp32), ours against F.rms_norm and torch.compile of the reference; bytes: forward
reads x and writes y, forward + backward also reads dy and x and writes dx.
Each row also gives the floor: FLOPs at the H100's measured 739 TFLOP/s matmul rate, or bytes at 2.83 TB/s,
and how close ours comes to it. The table is appended to bench/RESULTS.md.
"""

import argparse
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from bench.results import record
from kernels.attention import flash_attention, hyperbolic_flash_attention
from kernels.hyperbolic import expmap0
from kernels.norm import rms_norm
from kernels.norm_torch import rms_norm_reference

MATMUL_FLOPS = 739e12  # H100 SXM dense bf16, as measured by a large cuBLAS matmul
MEMORY_BYTES_PER_S = 2.83e12  # H100 SXM HBM3, as measured by a large copy
TOKENS = 16384
HEADS = 16
GQA_KV_HEADS = 4
OURS = "ours"
DETERMINISTIC = "ours (deterministic)"  # fwd+bwd only: its forward is ours
HYPERBOLIC = "ours (hyperbolic)"  # a variant of ours, not a peer: another score, not the same attention


def hyperbolic(q, k, v, causal):
    """Hyperbolic attention as phase 7 runs it at curvature 1 and beta 1: expmap0 of q and k, then our kernel."""
    kv_heads = k.shape[2]
    curvature = torch.ones(kv_heads, device=q.device)
    q_s, q0 = expmap0(q, curvature.repeat_interleave(q.shape[2] // kv_heads))
    k_s, k0 = expmap0(k, curvature)
    return hyperbolic_flash_attention(q_s, k_s, q0, k0, v, curvature, torch.ones(q.shape[2], device=q.device), causal)


def attention_peers():
    """name -> fn(q, k, v, causal) in the (batch, seq, heads, dim) layout."""
    def sdpa_with(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal,
                                                     enable_gqa=k.shape[2] != q.shape[2])
            return out.transpose(1, 2)
        return run

    peers = {OURS: lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
             DETERMINISTIC: lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, deterministic=True),
             HYPERBOLIC: hyperbolic,
             "SDPA FA2": sdpa_with(SDPBackend.FLASH_ATTENTION),
             "SDPA cuDNN": sdpa_with(SDPBackend.CUDNN_ATTENTION)}
    try:
        from flash_attn import flash_attn_func
        peers["flash-attn"] = lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal)
    except ImportError:
        pass
    return peers


def milliseconds(fn, leaves):
    """Median time of fn after a first call (compilation, autotuning); None if this peer cannot run the case."""
    try:
        fn()
        return do_bench(fn, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
    except RuntimeError as e:  # e.g. a backend that does not take this head_dim or dtype
        print(f"  (skipped: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return None


def bench_attention(seq, head_dim, causal, peers, kv_heads=HEADS):
    batch = TOKENS // seq
    q, do = (torch.randn(batch, seq, HEADS, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(batch, seq, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    flops = 4 * batch * HEADS * seq * seq * head_dim / (2 if causal else 1)
    gqa = f" kv={kv_heads}" if kv_heads != HEADS else ""
    case = f"attn S={seq} D={head_dim} B={batch}{gqa} {'causal' if causal else 'bidir'}"
    rows = []
    for mode, mode_flops in [("fwd", flops), ("fwd+bwd", 3.5 * flops)]:
        times = {}
        for name, fn in peers.items():
            if mode == "fwd" and name == DETERMINISTIC:
                continue
            if mode == "fwd":
                call = lambda fn=fn: fn(q, k, v, causal)  # noqa: E731
            else:
                call = lambda fn=fn: fn(q, k, v, causal).backward(do)  # noqa: E731
            times[name] = milliseconds(call, leaves)
        rows.append(row(case, mode, times, mode_flops / MATMUL_FLOPS * 1e3, lambda ms: mode_flops / ms / 1e9,
                        "TFLOP/s"))
    return rows


def rms_norm_bytes(rows, hidden, x_dtype, weight_dtype, mode):
    """Bytes an RMSNorm must move: forward reads x and writes y (in x and weight's promoted dtype); backward
    reads dy (y's dtype) and x and writes dx (x's dtype). The weight and its gradient are noise."""
    x_size = torch.empty(0, dtype=x_dtype).element_size()
    y_size = torch.empty(0, dtype=torch.promote_types(x_dtype, weight_dtype)).element_size()
    per_element = x_size + y_size if mode == "fwd" else 3 * x_size + 2 * y_size
    return rows * hidden * per_element


def bench_rms_norm(rows, hidden, weight_dtype):
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    weight = torch.ones(hidden, device="cuda", dtype=weight_dtype)
    dy = torch.randn(rows, hidden, device="cuda", dtype=torch.promote_types(x.dtype, weight_dtype))
    leaves = [x.requires_grad_(), weight.requires_grad_()]
    compiled = torch.compile(rms_norm_reference)
    peers = {OURS: lambda: rms_norm(x, weight, 1e-6),
             "F.rms_norm": lambda: F.rms_norm(x, (hidden,), weight, 1e-6),
             "compiled ref": lambda: compiled(x, weight, 1e-6)}
    dtypes = "bf16" if weight_dtype == torch.bfloat16 else "bf16, fp32 weight"
    result = []
    for mode in ("fwd", "fwd+bwd"):
        times = {}
        for name, fn in peers.items():
            call = fn if mode == "fwd" else (lambda fn=fn: fn().backward(dy))
            times[name] = milliseconds(call, leaves)
        moved = rms_norm_bytes(rows, hidden, x.dtype, weight_dtype, mode)
        result.append(row(f"rms_norm {rows}x{hidden} {dtypes}", mode, times, moved / MEMORY_BYTES_PER_S * 1e3,
                          lambda ms: moved / ms / 1e6, "GB/s"))
    return result


def row(case, mode, times, floor_ms, rate, unit):
    """One table row: each provider's rate, the floor, ours as % of the floor, ours against the fastest peer
    (our other variants are not peers)."""
    rates = {name: (f"{rate(ms):,.0f}" if ms else "n/a") for name, ms in times.items()}
    peers = [ms for name, ms in times.items() if not name.startswith(OURS) and ms]
    ours = times[OURS]
    return {"case": case, "mode": mode, "unit": unit, "rates": rates, "floor_ms": floor_ms,
            "ours_ms": ours, "of_floor": f"{100 * floor_ms / ours:.0f}%" if ours else "n/a",
            "vs_best_peer": f"{min(peers) / ours:.2f}x" if ours and peers else "n/a"}


def table(rows):
    """Markdown, one column per provider: ours and our variants first, then the peers in the order they ran."""
    providers = list(dict.fromkeys(name for r in rows for name in r["rates"]))
    providers.sort(key=lambda name: not name.startswith(OURS))
    header = ["case", "mode", "unit", *providers, "ours ms", "floor ms", "ours % of floor", "ours vs best peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["case"], r["mode"], r["unit"], *(r["rates"].get(p, "") for p in providers),
                 f"{r['ours_ms']:.3f}" if r["ours_ms"] else "n/a", f"{r['floor_ms']:.3f}", r["of_floor"],
                 r["vs_best_peer"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def record_table(markdown):
    record("bench-kernels", " ".join(["python -m bench.bench_kernels", *sys.argv[1:]]), markdown,
           f"Floors: FLOPs at {MATMUL_FLOPS / 1e12:.0f} TFLOP/s, bytes at {MEMORY_BYTES_PER_S / 1e12:.2f} TB/s; "
           "'ours vs best peer' > 1 means ours is faster", (f"triton {triton.__version__}",))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seq 1k and 4k, head_dim 128 only")
    parser.add_argument("--headline", action="store_true",
                        help="only the goals' shapes: causal attention at seq 2k and 4k, head_dim 128, and RMSNorm")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench-kernels needs a CUDA GPU; on CPU, check the kernels with make test or "
              "make triton-attn", file=sys.stderr)
        return 1
    seqs = [2048, 4096] if args.headline else [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    head_dims = [128] if args.quick or args.headline else [64, 128]
    peers = attention_peers()
    rows = []
    for seq in seqs:
        for head_dim in head_dims:
            for causal in (True,) if args.headline else (True, False):
                rows += bench_attention(seq, head_dim, causal, peers)
                print(f"  attention S={seq} D={head_dim} causal={causal} done", file=sys.stderr)
    if not args.headline:
        rows += bench_attention(4096, 128, True, peers, kv_heads=GQA_KV_HEADS)
    for weight_dtype in (torch.bfloat16, torch.float32):
        rows += bench_rms_norm(16384, 2048, weight_dtype)
    markdown = table(rows)
    print(markdown)
    record_table(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
