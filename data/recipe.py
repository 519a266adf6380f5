"""`make recipe`: a data mixture as a YAML file (source paths and normalized weights); train with data=<file>.

    python -m data.recipe --sources "data/a:0.7 data/b:0.3" [--out configs/recipes/mixture.yaml]
    python -m data.recipe            # asks for the sources when run in a terminal

Each window's source is drawn by weight from a hash of (seed, split, window number), like the window itself,
so a resumed run continues the same mixture. Relative paths are relative to where training runs (the repo root).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from data.cli import run
from data.meta import read_meta
from data.stream import DataError, Windows, mix64, split_id

DEFAULT_OUT = "configs/recipes/mixture.yaml"
MIX_KEY = 0x3A17  # separates the source draw from the window-start draw of the same window number
HEADER = ("# Data mixture written by `python -m data.recipe`; train with data=<this file>.\n"
          "# Weights are normalized; each window's source is drawn by weight, deterministically per step.\n")


def parse_sources(text: str) -> list[tuple[str, float]]:
    """"data/a:0.7 data/b:0.3" -> [("data/a", 0.7), ("data/b", 0.3)]; a missing weight means 1."""
    sources = []
    for item in text.split():
        path, _, weight = item.rpartition(":")
        try:
            sources.append((path, float(weight)) if path else (item, 1.0))
        except ValueError:  # hf:name has a colon but no weight
            sources.append((item, 1.0))
    return sources


def normalize(sources: list[tuple[str, float]]) -> list[tuple[str, float]]:
    if not sources:
        raise DataError("a recipe needs at least one source: give --sources \"path:weight ...\"")
    for path, weight in sources:
        if weight <= 0:
            raise DataError(f"weight {weight} of {path} is not positive: drop the source or give it a weight > 0")
        if not path.startswith("hf:") and path != "dummy" and not Path(path).exists():
            raise DataError(f"recipe source {path} not found: prepare it first (make data / make data-lite)")
    total = sum(w for _, w in sources)
    return [(path, w / total) for path, w in sources]


def write_recipe(out: Path, sources: list[tuple[str, float]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump({"sources": [{"path": p, "weight": round(w, 6)} for p, w in sources]}, sort_keys=False)
    out.write_text(HEADER + body)


def load_recipe(path: Path) -> list[tuple[str, float]]:
    try:
        recipe = yaml.safe_load(Path(path).read_text())
        sources = [(str(s["path"]), float(s.get("weight", 1.0))) for s in recipe["sources"]]
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is not a recipe ({type(e).__name__}): expected 'sources: [{{path, weight}}, ...]'; "
                        "write one with `make recipe`") from None
    return normalize(sources)


class MixtureStream(Windows):
    """Window j comes from the source picked by weight for j, and is that source's own window j."""

    def __init__(self, streams: list[Windows], weights: list[float], seed: int, split: str):
        self.streams, self.seed, self.split_id = streams, seed, split_id(split)
        self.n_seq = streams[0].n_seq
        self.cdf = np.cumsum(weights) / sum(weights)
        self.vocab_size = max(s.vocab_size for s in streams)
        self.num_tokens = sum(s.num_tokens for s in streams)

    def sources(self, j: np.ndarray) -> np.ndarray:
        u = (mix64(self.seed, self.split_id, MIX_KEY, j.astype(np.uint64)) >> np.uint64(11)) / float(1 << 53)
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.streams) - 1)

    def windows(self, j: np.ndarray) -> np.ndarray:
        which = self.sources(j)
        out = np.empty((len(j), self.n_seq + 1), dtype=np.int64)
        for i, stream in enumerate(self.streams):
            if (mask := which == i).any():
                out[mask] = stream.windows(j[mask])
        return out


def check_one_tokenizer(paths: list[str]) -> None:
    """Packed sources record their tokenizer; mixing two tokenizers' ids would train on noise."""
    seen = {p: read_meta(Path(p)).get("tokenizer_sha1") for p in paths if Path(p).is_dir()}
    if len({sha for sha in seen.values() if sha}) > 1:
        raise DataError("recipe sources were tokenized with different tokenizers: "
                        + ", ".join(f"{p} ({read_meta(Path(p)).get('tokenizer')})" for p in seen))


def ask_sources() -> list[tuple[str, float]]:
    print("Mix data sources: a packed-shard folder, text files, or hf:<name>. Empty path to finish.")
    sources = []
    while path := input(f"source {len(sources) + 1} path: ").strip():
        if not path.startswith("hf:") and not Path(path).exists():
            print(f"  {path} not found; prepare it first (make data / make data-lite) or type another")
            continue
        weight = input("  weight [1]: ").strip() or "1"
        try:
            sources.append((path, float(weight)))
        except ValueError:
            print(f"  {weight!r} is not a number; source skipped")
    return sources


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", nargs="+", default=[], help="path:weight ... (weights are normalized)")
    p.add_argument("--out", default="", help=f"recipe file to write (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    interactive = not args.sources and sys.stdin.isatty()
    if not args.sources and not interactive:
        raise DataError('no sources: give --sources "path:weight ..." (make recipe SOURCES="data/a:0.7 data/b:0.3")')
    sources = normalize(ask_sources() if interactive else parse_sources(" ".join(args.sources)))
    out = args.out or (input(f"write to [{DEFAULT_OUT}]: ").strip() if interactive else "") or DEFAULT_OUT
    write_recipe(Path(out), sources)
    print(f"wrote {out}: " + ", ".join(f"{p} {w:.1%}" for p, w in sources) + f"; train with data={out}")


if __name__ == "__main__":
    run(main)
