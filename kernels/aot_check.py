"""make aot-check: compile our Triton kernels ahead of time for the H200 (sm_90) on a machine without a GPU.

No kernel of ours has run on the device yet, and a lease is short: a config that does not compile, needs more
shared memory than a program may have, or spills registers should be found here, not there. Each case calls the
kernels' Python wrappers (kernels/attention.py, norm.py, linear_attention.py) with CPU tensors of real shapes while
the launches are captured instead of run; each captured launch is then compiled once per autotune config through
Triton's own argument specialisation (what the runtime would compile on the device) for
GPUTarget("cuda", 90, 32) (capability 9.0, warp size 32: what the driver reports on an H100/H200), and ptxas's
report gives registers and spills.

    python -m kernels.aot_check            # every config of every case (make aot-check)
    python -m kernels.aot_check --recipes  # only what the 1.44B recipe and the bench shapes can select (CI)
    python -m kernels.aot_check --warm     # on the device: fill Triton's cache for scripts/gpu_check.sh's steps

Fails (exit 1) on a compile error, on shared memory over the H200's 232,448 bytes per program in a config the
runtime can launch (one that the kernel's shared-memory estimate admits: the table marks the others "pruned"),
and on a spill in a config the recipes can select (the autotuner's pruning, run with the H200's numbers, says
which). Triton is whichever `import triton` finds: PYTHONPATH=.aot/triton-3.6 checks the device's version (make
aot-check does both).
"""

import argparse
import contextlib
import io
import multiprocessing
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from unittest import mock

import torch
from tqdm import tqdm

SHARED_MEMORY_LIMIT = 232448  # bytes per program on sm_90 (cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100/H200)
H200 = SimpleNamespace(shared_memory_per_block_optin=SHARED_MEMORY_LIMIT, multi_processor_count=132)
# a device on which no grid is too small: the prune then drops only what does not fit
ANY_GRID = SimpleNamespace(shared_memory_per_block_optin=SHARED_MEMORY_LIMIT, multi_processor_count=1)
RECIPE_HEADS, RECIPE_DIM, RECIPE_SEQ, RECIPE_HIDDEN = 16, 128, 1024, 2048  # configs/phase7_1.5b_triton.yaml
BENCH_TOKENS = 16384  # bench/bench_kernels.py: batch = tokens // seq


@dataclass
class Case:
    """Calls the kernels' wrappers once (forward and backward) for one set of shapes."""
    name: str
    run: object  # () -> None, launching kernels through the wrappers
    recipe: bool  # the 1.44B recipe or a bench shape: a spill here fails the check


@dataclass
class Job:
    case: str
    kernel: str
    variant: str  # the first tensor's dtype and the flags (boolean constexprs) that are on
    config: str
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    recipe: bool
    admissible: bool = True  # the kernel's prune keeps it at some grid size (it fits the estimate)


@dataclass
class Row:
    case: str
    kernel: str
    variant: str
    config: str
    recipe: bool
    admissible: bool = True
    shared: int = 0
    registers: int = 0
    spills: int = 0
    mma: str = ""
    seconds: float = 0.0
    error: str = ""

    def problems(self):
        found = [self.error] if self.error else []
        if self.shared > SHARED_MEMORY_LIMIT and self.admissible:  # else the runtime never launches it
            found.append(f"shared memory {self.shared:,} B > {SHARED_MEMORY_LIMIT:,}")
        if self.recipe and self.spills:
            found.append(f"spills {self.spills} B in a config the recipes can select")
        return found


def _empty(shape, dtype):
    return torch.empty(shape, dtype=dtype)


def attention_case(batch, seq, heads, dim, dtype, causal, deterministic, kv_heads=None):
    """Forward and backward of kernels/attention.py at these shapes."""
    def run():
        from kernels import attention
        q, do = _empty((batch, seq, heads, dim), dtype), _empty((batch, seq, heads, dim), dtype)
        k, v = (_empty((batch, seq, kv_heads or heads, dim), dtype) for _ in range(2))
        o, lse = attention._forward(q, k, v, causal, dim ** -0.5, deterministic)
        attention._backward(do, q, k, v, o, lse, causal, dim ** -0.5, deterministic)
    return run


def hyperbolic_case(batch, seq, heads, kv_heads, dim, dtype, causal):
    """Forward and backward of kernels/attention.py's hyperbolic kernels (always the deterministic backward)."""
    def run():
        from kernels import attention
        q_s, do = _empty((batch, seq, heads, dim), dtype), _empty((batch, seq, heads, dim), dtype)
        k_s, v = (_empty((batch, seq, kv_heads, dim), dtype) for _ in range(2))
        q0, k0 = _empty((batch, seq, heads), dtype), _empty((batch, seq, kv_heads), dtype)
        curvature, beta = torch.ones(kv_heads), torch.ones(heads)
        o, lse = attention._hyperbolic_forward(q_s, k_s, q0, k0, v, curvature, beta, causal)
        attention._hyperbolic_backward(do, q_s, k_s, q0, k0, v, curvature, beta, o, lse, causal)
    return run


def norm_case(rows, hidden, dtype, weight_dtype, residual):
    """Forward and backward of kernels/norm.py, with or without the residual add."""
    def run():
        from kernels import norm
        x, w = _empty((rows, hidden), dtype), _empty((hidden,), weight_dtype)
        if residual:
            y, total, rstd = norm._forward_residual(x, _empty((rows, hidden), torch.float32), w, 1e-6)
            norm._backward(_empty(y.shape, y.dtype), total, w, rstd, _empty(total.shape, total.dtype))
        else:
            y, rstd = norm._forward(x, w, 1e-6)
            norm._backward(_empty(y.shape, y.dtype), x, w, rstd, None)
    return run


def linear_attention_case(batch, seq, heads, key_dim, value_dim, dtype):
    """Forward and backward of kernels/linear_attention.py."""
    def run():
        from kernels import linear_attention as la
        q, k = (_empty((batch, seq, heads, key_dim), dtype) for _ in range(2))
        v = _empty((batch, seq, heads, value_dim), dtype)
        g = _empty((batch, seq, heads), torch.float32)
        o, final = la._forward(q, k, v, g, None, 1.0)
        la._backward(_empty(o.shape, o.dtype), _empty(final.shape, final.dtype), q, k, v, g, None, 1.0)
    return run


def recipe_cases():
    """What configs/phase7_1.5b_triton.yaml (micro-batch 1; bench-phase7 times 8, memory mode 4) and the headline
    bench shapes (bench-kernels --headline: causal, 16k tokens per call at seq 2k and 4k, deterministic too) run:
    bf16, causal, head_dim 128, and the RMSNorm of d_model 2048."""
    cases = []
    for batch in (1, 4, 8):
        cases.append(Case(f"attn 1.44B B={batch}", attention_case(batch, RECIPE_SEQ, RECIPE_HEADS, RECIPE_DIM,
                                                                  torch.bfloat16, True, False), True))
        for residual in (False, True):  # memory mode keeps a bf16 weight, else fp32 (autocast)
            for weight in (torch.bfloat16, torch.float32):
                cases.append(Case(f"norm 1.44B B={batch}{' +res' if residual else ''} w={str(weight)[6:]}",
                                  norm_case(batch * RECIPE_SEQ, RECIPE_HIDDEN, torch.bfloat16, weight, residual),
                                  True))
    for seq in (2048, 4096):
        for deterministic in (False, True):
            cases.append(Case(f"attn bench S={seq}{' det' if deterministic else ''}",
                              attention_case(BENCH_TOKENS // seq, seq, RECIPE_HEADS, RECIPE_DIM, torch.bfloat16,
                                             True, deterministic), True))
    cases.append(Case("norm bench 16384x2048", norm_case(16384, 2048, torch.bfloat16, torch.bfloat16, False), True))
    return cases


def gpu_check_cases():
    """What scripts/gpu_check.sh's steps launch besides the recipes: the GPU tests' and make triton-attn's shapes
    (tests/test_kernels.py, tests/test_linear_attention.py, kernels/check_attention.py), so its warm step compiles
    them all before the first step runs."""
    cases = recipe_cases()
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    for seq in (1024, 4096):
        for dim in (64, 128):
            for causal in (True, False):
                cases.append(Case(f"test attn S={seq} D={dim} causal={causal}",
                                  attention_case(2, seq, 4, dim, bf16, causal, False), False))
    for deterministic in (False, True):
        cases.append(Case(f"test attn ragged fp16 det={deterministic}",
                          attention_case(2, 1000, 4, 128, fp16, True, deterministic), False))
        cases.append(Case(f"test attn gqa det={deterministic}",
                          attention_case(2, 2048, 16, 128, bf16, True, deterministic, kv_heads=4), False))
        cases.append(Case(f"check attn ragged fp16 det={deterministic}",
                          attention_case(2, 1000, 4, 64, fp16, True, deterministic), False))
    for dim in (64, 128):
        for causal in (True, False):
            cases.append(Case(f"check attn D={dim} causal={causal}", attention_case(4, 2048, 16, dim, bf16, causal,
                                                                                    False), False))
    cases.append(Case("check attn gqa", attention_case(4, 2048, 16, 128, bf16, True, False, kv_heads=4), False))
    for rows, hidden in ((4096, 2048), (1024, 8192)):
        for residual in (False, True):
            cases.append(Case(f"test norm {rows}x{hidden}", norm_case(rows, hidden, bf16, bf16, residual), False))
    for seq in (4096, 1000):
        cases.append(Case(f"test linear S={seq}", linear_attention_case(2, seq, 4, 128, 128, bf16), False))
    cases.append(Case("test linear fp32", linear_attention_case(2, 777, 3, 64, 128, fp32), False))
    return cases


def all_cases():
    """Every dtype and head dim we support, causal and not, both backwards, grouped-query and hyperbolic attention,
    plus the recipe cases; lengths of 2048 (and a ragged 1000) so that every config has whole blocks. fp16 and fp32
    at the largest head dims only, which need the most registers and shared memory (fp16 compiles as bf16 does)."""
    from kernels.support import ATTENTION_HEAD_DIMS, LINEAR_ATTENTION_HEAD_DIMS
    cases = recipe_cases()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype)[6:]
        for dim in ATTENTION_HEAD_DIMS if dtype == torch.bfloat16 else ATTENTION_HEAD_DIMS[-1:]:
            for causal in (True, False):
                for deterministic in (False, True):
                    cases.append(Case(f"attn {name} D={dim} {'causal' if causal else 'bidir'}"
                                      f"{' det' if deterministic else ''}",
                                      attention_case(2, 2048, 8, dim, dtype, causal, deterministic), False))
        for dim in LINEAR_ATTENTION_HEAD_DIMS if dtype == torch.bfloat16 else LINEAR_ATTENTION_HEAD_DIMS[-1:]:
            cases.append(Case(f"linear {name} K=V={dim}", linear_attention_case(2, 2048, 4, dim, dim, dtype), False))
        cases.append(Case(f"attn {name} ragged 1000", attention_case(2, 1000, 4, 128, dtype, True, False), False))
        for deterministic in (False, True):  # grouped-query heads (phase hf, Qwen3)
            cases.append(Case(f"attn {name} gqa{' det' if deterministic else ''}",
                              attention_case(2, 2048, 8, 128, dtype, True, deterministic, kv_heads=2), False))
        for causal in (True, False):  # attention=hyperbolic (phase7), with grouped-query heads
            cases.append(Case(f"hyperbolic {name} {'causal' if causal else 'bidir'}",
                              hyperbolic_case(2, 2048, 8, 2, 128, dtype, causal), False))
        for hidden in (1000, 2048, 8192, 16384):
            cases.append(Case(f"norm {name} {hidden}", norm_case(1024, hidden, dtype, dtype, True), False))
    return cases


def captured_launches(run):
    """[(kernel, args, kwargs)] that run() asks Triton to launch; none is compiled or launched. CPU tensors stand
    in for CUDA ones, so this runs anywhere and never touches a GPU (the warm step forks after it)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches = []

    def record(kernel, *args, grid=None, warmup=False, **kwargs):
        launches.append((kernel, args, kwargs))

    # the norm's grid reads the SM count: an H200's
    with mock.patch.object(JITFunction, "run", record), mock.patch.object(Autotuner, "run", record), \
            mock.patch("kernels.norm._processor_count", lambda device: H200.multi_processor_count):
        run()
    return launches


def jobs(case, every_config):
    """One Job per (launch, config): every config of an autotuned kernel, or those the autotuner keeps for an
    H200 at this case's shapes (its own early_config_prune, given the H200's shared memory and SM count: the
    same numbers as an H100's). A config the prune drops even when no grid is too small (its shared memory
    estimate is over the limit) is marked inadmissible: compiled, but never launched."""
    from triton.runtime.autotuner import Autotuner

    found = []
    for kernel, args, kwargs in captured_launches(case.run):
        dtype = next(str(a.dtype)[6:].replace("bfloat16", "bf16").replace("float", "fp") for a in args
                     if isinstance(a, torch.Tensor))
        variant = " ".join([dtype] + [name for name, value in kwargs.items() if value is True])
        if not isinstance(kernel, Autotuner):
            label = f"w{kwargs.get('num_warps', 4)}"
            found.append(Job(case.name, kernel.__name__, variant, label, kernel, args, kwargs, case.recipe))
            continue
        configs = selectable = admissible = kernel.configs
        if kernel.early_config_prune:
            named_args = dict(zip(kernel.arg_names, args))
            with mock.patch("torch.cuda.get_device_properties", lambda device: H200):
                selectable = kernel.early_config_prune(configs, named_args, **kwargs)
            with mock.patch("torch.cuda.get_device_properties", lambda device: ANY_GRID):
                admissible = kernel.early_config_prune(configs, named_args, **kwargs)
        for config in (configs if every_config else selectable):
            label = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
            label += f" w{config.num_warps} s{config.num_stages}"
            found.append(Job(case.name, kernel.fn.__name__, variant, label, kernel.fn, args,
                             {**kwargs, **config.all_kwargs()}, case.recipe and config in selectable,
                             config in admissible))
    return found


def ptxas_report(log):
    """(registers, spill bytes) from ptxas -v: the stores, which the loads mirror."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return int(registers.group(1)) if registers else -1, int(spills.group(1)) if spills else 0


def _specialise(job):
    """(backend, kwargs, the binder's (bound args, specialization, options)): what Triton's runtime derives from
    a launch's arguments (dtypes, 16-byte alignment, integers divisible by 16 or equal to 1) before compiling."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))  # what the driver reports for an H100/H200: warp size 32
    kwargs = dict(job.kwargs)
    # the options JITFunction.run adds before binding, so that the compile (and its cache key) is the runtime's
    kwargs["debug"] = kwargs.get("debug", job.fn.debug) or triton.knobs.runtime.debug
    for option in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # the second from Triton 3.9
        if hasattr(triton.knobs.compilation, option):
            kwargs[option] = getattr(triton.knobs.compilation, option)
    binder = create_function_from_signature(job.fn.signature, job.fn.params, backend)
    return backend, kwargs, binder(*job.args, **kwargs)


def compile_key(job):
    """Equal for two jobs that the runtime would compile to the same binary (its own cache key's ingredients)."""
    _, _, (_, specialization, options) = _specialise(job)
    return job.kernel, str(specialization), str(options)


def compile_inputs(job):
    """(target, ASTSource arguments (signature, constexprs, attrs), options): what JITFunction.run would hand
    to triton.compile for this launch on an H100/H200."""
    backend, kwargs, (bound, specialization, options) = _specialise(job)
    options, signature, constexprs, attrs = job.fn._pack_args(backend, kwargs, bound, specialization, options)
    return backend.target, (signature, constexprs, attrs), options


def compile_job(job):
    """Compile job for sm_90 through the runtime's own specialisation; Row with what ptxas and Triton report."""
    import triton
    from triton.compiler import ASTSource

    row = Row(job.case, job.kernel, job.variant, job.config, job.recipe, job.admissible)
    start = time.perf_counter()
    try:
        target, source, options = compile_inputs(job)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # the ptxas -v log, printed by Triton as it compiles
            compiled = triton.compile(ASTSource(job.fn, *source), target=target, options=options.__dict__)
        row.registers, row.spills = ptxas_report(log.getvalue())
        row.shared = compiled.metadata.shared
        ptx = compiled.asm["ptx"]
        row.mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
    except Exception as e:  # a compile error is a finding, reported in the table
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}"
    row.seconds = time.perf_counter() - start
    return row


_JOBS = []  # the parent's jobs, inherited by the forked workers, which get indices


def _compile_index(i):
    return compile_job(_JOBS[i])


def table(rows):
    """One line per compile: kernel, variant, config, shared memory, registers, spills, the matmul instruction,
    whether the recipes can select it (or the runtime never launches it: pruned), seconds to compile, and the
    first case that compiles it."""
    lines = [f"{'kernel':<19} {'variant':<27} {'config':<30} {'smem B':>8} {'regs':>4} {'spill B':>7} {'mma':<8} "
             f"{'recipe':<6} {'s':>3} first case"]
    for r in sorted(rows, key=lambda r: (r.kernel, r.variant, r.config, r.case)):
        selected = "yes" if r.recipe else "" if r.admissible else "pruned"
        lines.append(f"{r.kernel:<19} {r.variant:<27} {r.config:<30} {r.shared:>8,} {r.registers:>4} {r.spills:>7} "
                     f"{r.mma:<8} {selected:<6} {r.seconds:>3.0f} {r.case}"
                     f"{'  ERROR ' + r.error if r.error else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--recipes", action="store_true",
                       help="only the configs the 1.44B recipe and the bench shapes can select (CI)")
    scope.add_argument("--warm", action="store_true",
                       help="compile what scripts/gpu_check.sh's steps can select into Triton's cache, and say what "
                            "it cost (on the device, before the steps)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles (default: all cores)")
    parser.add_argument("--cases", default="", help="only the cases whose name contains this, e.g. 'linear'")
    args = parser.parse_args(argv)
    if not args.warm:  # a fresh cache: every config is compiled, so ptxas reports on each
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot-check-")
    import triton

    triton.knobs.nvidia.dump_ptxas_log = True
    cases = gpu_check_cases() if args.warm else recipe_cases() if args.recipes else all_cases()
    cases = [c for c in cases if args.cases in c.name]
    # one compile per distinct binary: cases often share one (the autotuner's buckets differ, the code does not)
    distinct = {}
    for case in cases:
        for job in jobs(case, every_config=not (args.recipes or args.warm)):
            first = distinct.setdefault(compile_key(job), job)
            first.recipe |= job.recipe
            first.admissible |= job.admissible
    _JOBS[:] = distinct.values()
    print(f"triton {triton.__version__}: {len(_JOBS)} compiles for sm_90 from {len(cases)} cases on "
          f"{args.jobs} processes{' into ' + triton.knobs.cache.dir if args.warm else ''}", flush=True)
    start = time.perf_counter()
    # fork: the workers inherit _JOBS (kernels and CPU tensors); nothing here has initialised CUDA
    rows = []
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for row in tqdm(pool.map(_compile_index, range(len(_JOBS))), total=len(_JOBS), desc="compiling",
                        unit="kernel", file=sys.stderr, disable=not sys.stderr.isatty()):
            rows.append(row)
            if not sys.stderr.isatty():  # a log: one line per compile as it lands, the whole table at the end
                print(f"  {len(rows)}/{len(_JOBS)} {row.seconds:.0f}s {row.kernel} {row.variant} {row.config} "
                      f"regs={row.registers} spills={row.spills}{' ERROR' if row.error else ''}", flush=True)
    wall = time.perf_counter() - start
    print(table(rows))
    problems = [f"{r.case}: {r.kernel} {r.config}: {p}" for r in rows for p in r.problems()]
    if args.warm:  # the steps run what they run; only a compile error is worth a non-zero exit here
        problems = [f"{r.case}: {r.kernel} {r.config}: {r.error}" for r in rows if r.error]
    print(f"triton {triton.__version__}: {len(rows)} compiles in {wall:.0f} s wall, "
          f"{sum(r.seconds for r in rows):.0f} s of compile time summed over {args.jobs} processes; "
          f"{len(problems)} problems")
    for p in problems:
        print("FAIL", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
