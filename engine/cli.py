"""Entry-point wrapper: user mistakes print one line and exit non-zero; DEBUG=1 shows the traceback."""

import os
import sys

import torch

from data.stream import DataError
from engine.errors import UserError

OOM_HINT = ("CUDA out of memory: set micro_batch_size=auto (or lower batch_size and raise "
            "gradient_accumulation_steps to keep tokens/step), set use_gradient_checkpointing=true, lower n_seq, "
            "or use `make train-phase7-small`")


def run_cli(main, argv: list[str]) -> None:
    # Under torchrun every rank reports its own failure: say which one
    error = f"error (rank {os.environ['RANK']})" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else "error"
    try:
        main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if os.environ.get("DEBUG") == "1":
            raise
        if isinstance(e, torch.cuda.OutOfMemoryError):
            print(f"{error}: {OOM_HINT}", file=sys.stderr)
        elif isinstance(e, (UserError, DataError)):  # data/ stands below engine/: its error is its own
            print(f"{error}: {e}", file=sys.stderr)
        else:
            print(f"{error}: {type(e).__name__}: {e} (run with DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
