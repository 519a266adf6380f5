"""meta.json of a shard folder: what tokenizer made it, token counts, and which inputs are finished.

It is the prepare step's resume record, so it is always replaced atomically (write, then rename).
"""

import json
import os
from pathlib import Path

META = "meta.json"


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META
    return json.loads(path.read_text()) if path.exists() else {}


def write_meta(folder: Path, meta: dict) -> None:
    path = Path(folder) / META
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def real_token_counts(meta: dict) -> dict[str, int]:
    """{shard file name: tokens before the sep padding} over all splits and inputs."""
    return {name: n for split in meta.get("splits", {}).values()
            for done in split.get("inputs", {}).values() for name, n in done.get("shards", {}).items()}


def summarize_split(split: dict) -> None:
    """Recompute a split's totals from its finished inputs."""
    inputs = split.get("inputs", {}).values()
    split["tokens"] = sum(i["tokens"] for i in inputs)
    split["documents"] = sum(i["documents"] for i in inputs)
    sources: dict[str, int] = {}
    for i in inputs:
        for name, n in i["sources"].items():
            sources[name] = sources.get(name, 0) + n
    split["sources"] = dict(sorted(sources.items()))
