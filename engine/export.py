"""python -m engine.export CHECKPOINT OUT_DIR [verify_checksums=false] [phase=MODULE]: a checkpoint (a .pt, a
checkpoint folder, or a run folder's best/final/latest) exported by its phase's own exporter,
`<phase module>/export.py`, whose main(argv) takes the same two arguments. The phase the checkpoint names
must be a folder of phases/, or a module given as phase=MODULE: a checkpoint never decides what is imported."""

import importlib
import sys

from engine import checkpoint as ckpt
from engine.cli import run_cli
from engine.config import parse_overrides
from phases import get_phase


USAGE = "usage: python -m engine.export CHECKPOINT OUT_DIR [verify_checksums=false] [phase=MODULE]"


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[2:]):
        raise SystemExit(USAGE)
    ckpt.take_loading_options(parse_overrides(argv[2:]))
    path = ckpt.resolve_checkpoint(argv[0])
    phase = ckpt.load_checkpoint(path, lazy=True)["config"].get("phase", "phase7")  # tensors left unread
    get_phase(phase)  # a folder of phases/ or a module the user named, else a one-line error
    module = f"{phase if '.' in phase else 'phases.' + phase}.export"
    try:
        exporter = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ckpt.CheckpointError(f"{path} is a '{phase}' checkpoint and that phase has no exporter "
                                   f"({module.replace('.', '/')}.py)") from None
    exporter.main([str(path), argv[1]])


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
