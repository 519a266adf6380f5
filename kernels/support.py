"""Where our Triton kernels can run: the one home of the facts that the kernels, the model and the tests ask.

Never imports triton (a Linux-only requirement), so asking is safe on every machine.
"""

import importlib.util
import os

import torch

ATTENTION_HEAD_DIMS = (16, 32, 64, 128)  # what kernels/attention.py compiles for
LINEAR_ATTENTION_HEAD_DIMS = (16, 32, 64, 128)  # key and value dims kernels/linear_attention.py compiles for
# kernels/norm.py keeps a row in registers; wider ones would spill (the model must use the PyTorch RMSNorm)
RMS_NORM_MAX_HIDDEN = 16384


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


def triton_available(device_type: str = "cuda") -> bool:
    """Whether our kernels can run on tensors of this device type: CUDA with triton installed, or CPU tensors
    under Triton's interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() if device_type == "cuda" else interpreter_requested()
