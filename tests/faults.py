"""engine.train with one fault injected at a real point, for tests/test_distributed.py:

    torchrun ... -m tests.faults [CONFIG] key=value ...

FAULT_KILL_IN_SAVE=<rank>:<checkpoint name>  that rank sends itself SIGKILL in the middle of saving that
    checkpoint: its shards are on disk, the other ranks' may not be, the folder's metadata is not.
FAULT_NAN=<rank>:<step>  that rank's loss is NaN in the first micro-step of that optimizer step.
"""

import dataclasses
import os
import signal
import sys

import torch.distributed.checkpoint.filesystem as dcp_files

import engine.train
from engine.cli import run_cli

RANK = int(os.environ["RANK"])


def kill_in_save(rank: int, name: str) -> None:
    write_data = dcp_files.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        written = write_data(self, plan, planner)
        if RANK == rank and os.path.basename(str(self.path)) == f".{name}.partial":
            os.kill(os.getpid(), signal.SIGKILL)
        return written

    dcp_files.FileSystemWriter.write_data = write_then_die


def nan_loss(rank: int, step: int) -> None:
    get_phase = engine.train.get_phase

    def phase_with_nan(name):
        phase = get_phase(name)
        calls = 0

        def loss(model, batch, cfg):
            nonlocal calls
            calls += 1
            value = phase.loss(model, batch, cfg)
            return value * float("nan") if RANK == rank and calls == (step - 1) * cfg.gradient_accumulation_steps + 1 \
                else value

        return dataclasses.replace(phase, loss=loss)

    engine.train.get_phase = phase_with_nan


if __name__ == "__main__":
    if "FAULT_KILL_IN_SAVE" in os.environ:
        rank, name = os.environ["FAULT_KILL_IN_SAVE"].split(":")
        kill_in_save(int(rank), name)
    if "FAULT_NAN" in os.environ:
        rank, step = os.environ["FAULT_NAN"].split(":")
        nan_loss(int(rank), int(step))
    run_cli(engine.train.main, sys.argv[1:])
