"""One .pt from a Distributed Checkpoint folder: python -m engine.consolidate CHECKPOINT_DIR [OUT.pt]
[verify_checksums=false]

A run on several ranks saves folders of shards (`phase7_step_2000/`). chat, export and a single-process
resume read such a folder directly; this writes it as one file in the format a single process saves (model
and optimizer whole, rank 0's RNG state), which torch.load(weights_only=True) reads without running code, to
copy elsewhere or share. OUT defaults to the folder's name with .pt beside it.
"""

import sys
from pathlib import Path

from engine import checkpoint as ckpt
from engine.cli import run_cli
from engine.config import parse_overrides


def main(argv: list[str]) -> None:
    ckpt.take_loading_options(parse_overrides([a for a in argv if "=" in a]))
    argv = [a for a in argv if "=" not in a]
    if len(argv) not in (1, 2):
        raise SystemExit("usage: python -m engine.consolidate CHECKPOINT_DIR [OUT.pt] [verify_checksums=false]")
    folder = Path(argv[0].rstrip("/"))
    if not ckpt.is_distributed_checkpoint(folder):
        raise ckpt.CheckpointError(f"{folder} is not a complete checkpoint folder (no .metadata and "
                                   f"{ckpt.TRAIN_STATE}): give one written by a run on several ranks")
    out = Path(argv[1]) if len(argv) == 2 else folder.with_name(f"{folder.name}.pt")
    ckpt.save_checkpoint(out, ckpt.load_checkpoint(folder))
    ckpt.write_checksums(ckpt.checksum_file(out), [out])
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
