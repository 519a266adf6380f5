"""What every kernel module asks before and while it launches: where our Triton kernels can run, which inputs they
take, and how a tensor is handed to them (fla keeps the same in ops/utils). The one place that reads
TRITON_INTERPRET.

Never imports triton (a Linux-only requirement), so asking is safe on every machine.
"""

import importlib.util
import os

import torch

ATTENTION_HEAD_DIMS = (16, 32, 64, 128)  # what kernels/attention.py compiles for
LINEAR_ATTENTION_HEAD_DIMS = (16, 32, 64, 128)  # key and value dims kernels/linear_attention.py compiles for
# kernels/norm.py keeps a row in registers; wider ones would spill (the model must use the PyTorch RMSNorm)
RMS_NORM_MAX_HIDDEN = 16384
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the attention and linear attention kernels take


def interpreter_requested() -> bool:
    """TRITON_INTERPRET=1: Triton reads it when it decorates a kernel, i.e. when a kernel module is first imported,
    and then runs that module's kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_interpreted(kernel) -> bool:
    """Whether Triton decorated this kernel (an autotuned one too) for its CPU interpreter rather than a GPU."""
    from triton.runtime.interpreter import InterpretedFunction

    while not isinstance(kernel, InterpretedFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def runs_here(interpreted: bool) -> bool:
    """Whether kernels decorated for the interpreter (interpreted) or for a GPU run on this machine: on CUDA, or
    on CPU tensors in the interpreter. A kernel module passes its INTERPRETED."""
    return torch.cuda.is_available() or interpreted


def check_device(op: str, t, interpreted: bool) -> None:
    """Our kernels take CUDA tensors, or CPU tensors when Triton decorated them for its interpreter."""
    if not (t.is_cuda or interpreted):
        raise ValueError(f"{op} needs CUDA tensors, or TRITON_INTERPRET=1 set before kernels is imported")


def triton_available(device_type: str = "cuda") -> bool:
    """Whether our kernels can run on tensors of this device type: CUDA with triton installed, or CPU tensors
    under Triton's interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() if device_type == "cuda" else interpreter_requested()


def strides(t):
    """(batch, seq, head) strides of a (batch, seq, heads[, features]) tensor; the kernels assume the feature
    stride is 1 (unit_last_stride)."""
    return t.stride(0), t.stride(1), t.stride(2)


def unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def dot_precision(dtype):
    """tl.dot's input_precision: fp32 inputs multiply in full fp32 (TF32 would lose ~3 digits); fp16/bf16 ignore
    it."""
    return "ieee" if dtype == torch.float32 else "tf32"
