"""make check-env: what this machine can run, one ✓/✗ line each; exits 1 if something required is missing."""

import importlib
import os
import platform
import sys
from pathlib import Path

REQUIRED = ["torch", "numpy", "yaml", "transformers", "tokenizers", "tqdm"]
OPTIONAL = {"datasets": "hub datasets in make data", "wandb": "logger: wandb", "flash_attn": "attention=flash_attn"}
INSTALL = "make setup   (or: pip install -r requirements.txt)"


def line(ok: bool, text: str) -> None:
    print(f"{'✓' if ok else '✗'} {text}")


def version_of(name: str) -> str | None:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except ImportError:
        return None


def check_triton_kernel(cuda: bool) -> str:
    """Compile and run a one-line Triton kernel; on CPU through Triton's interpreter."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(y_ptr + offsets, 2 * tl.load(x_ptr + offsets, mask=mask), mask=mask)

    x = torch.arange(1000, dtype=torch.float32, device="cuda" if cuda else "cpu")
    y = torch.empty_like(x)
    double[(triton.cdiv(1000, 256),)](x, y, 1000, BLOCK=256)
    if not torch.equal(y, 2 * x):
        raise RuntimeError("wrong result")
    return "compiled and ran on the GPU" if cuda else "ran in the interpreter (TRITON_INTERPRET=1, no GPU)"


def memory_mode_line(cuda: bool) -> None:
    """The 1.44B recipe's peak in memory mode (engine/memory_mode/estimate.py) against this GPU's memory: whether
    make train-phase7-1.5b can fit here, before it tries. Informational: nothing required is missing if not."""
    import torch

    from engine.memory_mode.estimate import estimate_for_model
    from phases import get_phase, load_config

    recipe = "configs/phase7_1.5b_triton.yaml"
    cfg = load_config(str(Path(__file__).resolve().parent.parent / recipe))
    with torch.device("meta"):
        need = estimate_for_model(get_phase(cfg.phase).build_model(cfg), cfg)["total"] / 2**30
    text = f"memory mode: {recipe} needs ~{need:.1f} GiB at its peak (estimated, + the CUDA context)"
    if not cuda:
        print(f"- {text}; no GPU here")
        return
    have = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"{'✓' if need + 0.5 < have else '-'} {text}; this GPU has {have:.1f} GiB")


def main() -> int:
    missing = []
    print(f"  Python {platform.python_version()} on {platform.system()} {platform.machine()}")
    for name in REQUIRED:
        version = version_of(name)
        line(version is not None, f"{name} {version or 'missing'}")
        if version is None:
            missing.append(name)
    if "torch" in missing:
        print(f"install: {INSTALL}")
        return 1
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        line(True, f"CUDA {torch.version.cuda}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                   f"capability {props.major}.{props.minor}, bf16 {torch.cuda.is_bf16_supported()}")
    else:
        line(False, "CUDA not available (optional: CPU runs the tiny configs; the 1.5B model needs a GPU)")

    if not cuda:  # must be set before triton is first imported
        os.environ["TRITON_INTERPRET"] = "1"
    triton_version = version_of("triton") if platform.system() == "Linux" else None
    line(triton_version is not None, f"Triton {triton_version or 'missing'}")
    if triton_version is None:
        missing.append("triton")
    else:
        try:
            line(True, f"Triton kernel {check_triton_kernel(cuda)}")
        except Exception as e:
            line(False, f"Triton kernel failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            missing.append("a working triton")
    try:
        memory_mode_line(cuda)
    except Exception as e:
        print(f"- memory mode estimate failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    for name, use in OPTIONAL.items():
        version = version_of(name)
        print(f"{'✓' if version else '-'} {name} {version or 'not installed'} (optional: {use})")
    if missing:
        print(f"missing: {', '.join(missing)}. install: {INSTALL}")
        return 1
    print("environment OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
