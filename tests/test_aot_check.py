"""kernels/aot_check.py: our Triton kernels compiled for the H200 (sm_90) on this CPU, with the installed Triton.

The whole check (every config, every dtype and head dim, and Triton 3.6 too) is `make aot-check`; here only the
configs the 1.44B recipe and the headline bench shapes can select, ~1 minute on 2 cores."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.aot_check import SHARED_MEMORY_LIMIT, Row, ptxas_report

ROOT = Path(__file__).resolve().parent.parent
needs_triton_cuda_backend = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or sys.platform != "linux", reason="triton's CUDA backend (Linux)")

PTXAS_LOG = """ptxas info    : Compiling entry function '_attn_bwd_dkdv' for 'sm_90a'
ptxas info    : Function properties for _attn_bwd_dkdv
    1272 bytes stack frame, 1272 bytes spill stores, 1400 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1272 bytes cumulative stack size
"""


def test_ptxas_report_reads_registers_and_spill_stores():
    assert ptxas_report(PTXAS_LOG) == (255, 1272)
    assert ptxas_report("ptxas info    : Used 38 registers") == (38, 0)


def test_what_fails_the_check():
    ok = Row("case", "k", "bf16", "cfg", recipe=True, shared=SHARED_MEMORY_LIMIT, registers=250)
    assert ok.problems() == []
    assert Row("c", "k", "bf16", "cfg", recipe=False, shared=SHARED_MEMORY_LIMIT + 1).problems()
    assert Row("c", "k", "bf16", "cfg", recipe=True, spills=4).problems()
    assert Row("c", "k", "bf16", "cfg", recipe=False, spills=4).problems() == []  # reported, not failed
    assert Row("c", "k", "bf16", "cfg", recipe=False, error="CompilationError: x").problems()
    # shared memory over the limit in a config the kernel's own estimate drops: never launched, not a failure
    assert Row("c", "k", "fp32", "cfg", recipe=False, admissible=False, shared=SHARED_MEMORY_LIMIT + 1).problems() == []


ADMISSIBLE = """
import torch
from kernels import aot_check
for dtype in (torch.float32, torch.bfloat16):
    case = aot_check.Case("t", aot_check.attention_case(2, 2048, 8, 128, dtype, True, False), False)
    print(dtype, sorted({(j.kernel, j.config) for j in aot_check.jobs(case, every_config=True) if not j.admissible}))
"""


@needs_triton_cuda_backend
def test_every_config_mode_marks_what_the_shared_memory_estimate_drops_whatever_the_grid():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the GPU configs, not the interpreter's
    result = subprocess.run([sys.executable, "-c", ADMISSIBLE], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    fp32, bf16 = result.stdout.splitlines()
    assert "('_attn_fwd', 'BLOCK_M=128 BLOCK_N=128 w8 s2')" in fp32  # 327,680 B by the estimate
    assert bf16.endswith(" []")  # in bf16 every config fits


@needs_triton_cuda_backend
def test_the_configs_the_recipes_can_select_compile_for_sm90_within_shared_memory_and_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    result = subprocess.run([sys.executable, "-m", "kernels.aot_check", "--recipes", "--jobs", "2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "wgmma" in result.stdout  # Hopper's matmuls, not the sm_80 path


RUNTIME_SAME_AS_AOT = """
import torch
from types import SimpleNamespace
from unittest import mock
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction
from kernels import aot_check

fake = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 0,
                       get_current_target=lambda: GPUTarget("cuda", 90, 32))
driver.set_active(fake)
case = aot_check.Case("t", aot_check.attention_case(2, 1000, 4, 64, torch.bfloat16, True, True), True)
checked = 0
for job in aot_check.jobs(case, every_config=False):
    seen = {}
    def capture(self, key, signature, device, constexprs, options, attrs, warmup):
        seen.update(signature=signature, constexprs=constexprs, attrs=attrs, options=options)
    with mock.patch.object(JITFunction, "_do_compile", capture):
        job.fn.run(*job.args, grid=(1,), warmup=False, **job.kwargs)
    target, (signature, constexprs, attrs), options = aot_check.compile_inputs(job)
    assert target == fake.get_current_target(), target
    assert (signature, constexprs, attrs) == (seen["signature"], seen["constexprs"], seen["attrs"]), job.kernel
    assert options == seen["options"], (job.kernel, options, seen["options"])
    checked += 1
print("same", checked)
"""


@needs_triton_cuda_backend
def test_aot_compiles_what_the_runtime_would_so_the_warm_step_fills_the_cache_the_steps_read():
    """JITFunction.run on a pretend H100 (its compile intercepted) against compile_inputs, launch by launch: the
    same source arguments and options give the same Triton cache key."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", RUNTIME_SAME_AS_AOT], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**env, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and result.stdout.startswith("same"), result.stderr[-3000:]
    assert int(result.stdout.split()[1]) >= 4  # forward, delta, dK/dV and dQ (deterministic)
