"""bench/RESULTS.md, appended to the same way by every benchmark: a heading with the name and date, the command
that ran, the device and versions, then the table."""

import datetime
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def record(name: str, command: str, markdown: str, notes: str = "", versions: tuple[str, ...] = ()) -> None:
    """Append one entry: `## <name>, <date>`, then `<command>` on <device>, torch, Python, <versions>. <notes>"""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n")
    stack = ", ".join([f"torch {torch.__version__}", f"Python {platform.python_version()}", *versions])
    with RESULTS.open("a") as f:
        f.write(f"\n## {name}, {datetime.date.today()}\n\n`{command}` on {device_name()}, {stack}"
                f"{'. ' + notes if notes else ''}\n\n{markdown}\n")
