"""Entry-point wrapper: user mistakes print one line and exit non-zero; DEBUG=1 shows the traceback."""

import os
import sys

import torch

from engine.checkpoint import CheckpointError
from engine.config import ConfigError

OOM_HINT = ("CUDA out of memory: set micro_batch_size=auto (or lower batch_size and raise "
            "gradient_accumulation_steps to keep tokens/step), set use_gradient_checkpointing=true, lower n_seq, "
            "or use `make train-phase7-small`")


def user_errors() -> tuple[type[Exception], ...]:
    from data.loader import DataError
    from engine.plot import PlotError
    from engine.train import TrainingError
    return (ConfigError, CheckpointError, DataError, PlotError, TrainingError)


def run_cli(main, argv: list[str]) -> None:
    try:
        main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("DEBUG") == "1":
            raise
        if isinstance(e, torch.cuda.OutOfMemoryError):
            print(f"error: {OOM_HINT}", file=sys.stderr)
        elif isinstance(e, user_errors()):
            print(f"error: {e}", file=sys.stderr)
        else:
            print(f"error: {type(e).__name__}: {e} (run with DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
