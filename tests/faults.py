"""engine.train with one fault injected at a real point, for tests/test_distributed.py:

    torchrun ... -m tests.faults [CONFIG] key=value ...

FAULT_KILL_IN_SAVE=<rank>:<checkpoint name>  that rank sends itself SIGKILL in the middle of saving that
    checkpoint: its shards are on disk, the other ranks' may not be, the folder's metadata is not.
FAULT_NAN=<rank>:<step>  that rank's loss is NaN in the first micro-step of that optimizer step.
FAULT_SIGNAL=<rank>:<step>:<SIGTERM|SIGUSR1>  that rank sends itself the signal in the first micro-step of
    that step, as a scheduler would (in one process too, without torchrun).
"""

import dataclasses
import os
import signal
import sys

import torch.distributed.checkpoint.filesystem as dcp_files

import engine.train
from engine.cli import run_cli

RANK = int(os.environ.get("RANK", 0))


def kill_in_save(rank: int, name: str) -> None:
    write_data = dcp_files.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        written = write_data(self, plan, planner)
        if RANK == rank and os.path.basename(str(self.path)) == f".{name}.partial":
            os.kill(os.getpid(), signal.SIGKILL)
        return written

    dcp_files.FileSystemWriter.write_data = write_then_die


def in_first_micro_step(rank: int, step: int, fault):
    """engine.train's get_phase with a loss that applies fault(loss) on that rank, in that step's first
    micro-step (a skipped step counts: steps are numbered by optimizer step attempts; evaluations, which may
    call the same loss, do not)."""
    get_phase = engine.train.get_phase

    def phase_with_fault(name):
        phase = get_phase(name)
        calls = 0

        def loss(model, batch, cfg):
            nonlocal calls
            calls += model.training
            value = phase.loss(model, batch, cfg)
            first = model.training and calls == (step - 1) * cfg.gradient_accumulation_steps + 1
            return fault(value) if RANK == rank and first else value

        return dataclasses.replace(phase, loss=loss)

    return phase_with_fault


def nan_loss(rank: int, step: int):
    return in_first_micro_step(rank, step, lambda value: value * float("nan"))


def signal_in_step(rank: int, step: int, signum: int):
    def send(value):
        os.kill(os.getpid(), signum)
        return value

    return in_first_micro_step(rank, step, send)


if __name__ == "__main__":
    if "FAULT_KILL_IN_SAVE" in os.environ:
        rank, name = os.environ["FAULT_KILL_IN_SAVE"].split(":")
        kill_in_save(int(rank), name)
    if "FAULT_NAN" in os.environ:
        rank, step = os.environ["FAULT_NAN"].split(":")
        engine.train.get_phase = nan_loss(int(rank), int(step))
    if "FAULT_SIGNAL" in os.environ:
        rank, step, name = os.environ["FAULT_SIGNAL"].split(":")
        engine.train.get_phase = signal_in_step(int(rank), int(step), signal.Signals[name])
    run_cli(engine.train.main, sys.argv[1:])
