"""README matches the user interface: every target `make help` lists is documented there."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_target_of_make_help_is_in_the_readme():
    listed = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    targets = re.findall(r"^  ([a-z0-9][\w.-]*) +\S", listed, re.MULTILINE)
    readme = (ROOT / "README.md").read_text()
    assert "clean-checkpoints" in targets and len(targets) > 30
    assert [t for t in targets if t != "help" and not re.search(rf"`(make )?{re.escape(t)}[` ]", readme)] == []
