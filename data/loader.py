"""Training data as a pure function: `open_data(...).batch(first, count)` (windows first..first+count-1)
depends only on (seed, split, window numbers), so resuming at any window continues the same stream and no
reader state is saved.

Window j of a split starts at a position hashed from (seed, split, j): a counter-based draw, so the stream
does not depend on how it is cut into batches either.
Windows are n_seq+1 tokens and may cross document (EOS) and shard boundaries.
"""

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a batch is made, so the data commands start without it
    import torch

SPLITS = {"train": 0, "val": 1, "validation": 1}
DUMMY_TOKENS = 1 << 20  # the dummy corpus: big enough that tiny runs never repeat a window exactly
MASK64 = (1 << 64) - 1


class DataError(Exception):
    """One-line, user-facing message naming the problem and the fix."""


def mix64(*keys) -> np.ndarray:
    """splitmix64 over the keys (ints or uint64 arrays): a counter-based hash, identical on every platform."""
    x = np.uint64(0)
    with np.errstate(over="ignore"):  # wrap-around is the point
        for key in keys:
            x = x ^ (np.asarray(key, dtype=np.uint64) if np.ndim(key) else np.uint64(int(key) & MASK64))
            x = x + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
    return x


def split_id(split: str) -> int:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of train, val")
    return SPLITS[split]


class Windows:
    """A stream that can produce window number j; batches are the same for every kind of stream."""

    def windows(self, j: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def batch(self, first: int, count: int) -> "torch.LongTensor":
        """Windows first..first+count-1 as a (count, n_seq + 1) tensor."""
        import torch

        return torch.from_numpy(self.windows(first + np.arange(count, dtype=np.int64)))


class TokenStream(Windows):
    """Random windows over a token sequence stored as one or more arrays (memory maps or in memory)."""

    def __init__(self, arrays: list[np.ndarray], n_seq: int, seed: int, split: str, vocab_size: int, name: str):
        self.arrays = [a for a in arrays if len(a)]
        self.ends = np.cumsum([len(a) for a in self.arrays], dtype=np.int64)
        self.num_tokens = int(self.ends[-1]) if self.arrays else 0
        self.n_seq, self.seed, self.split_id, self.vocab_size = n_seq, seed, split_id(split), vocab_size
        if self.num_tokens < n_seq + 1:
            raise DataError(f"{name} has {self.num_tokens} {split} tokens, fewer than one window of n_seq+1="
                            f"{n_seq + 1}: lower n_seq or add {split} data")

    def windows(self, j: np.ndarray) -> np.ndarray:
        """Windows number j (int64 array), shape (len(j), n_seq+1)."""
        starts = mix64(self.seed, self.split_id, j.astype(np.uint64)) % np.uint64(self.num_tokens - self.n_seq)
        return np.stack([self._read(int(s)) for s in starts]) if len(j) else np.empty((0, self.n_seq + 1), np.int64)

    def _read(self, start: int) -> np.ndarray:
        """n_seq+1 tokens from `start`, stitched across arrays when a window crosses a boundary."""
        out = np.empty(self.n_seq + 1, dtype=np.int64)
        filled, i = 0, int(np.searchsorted(self.ends, start, side="right"))
        while filled < len(out):
            begin = start + filled - (self.ends[i - 1] if i else 0)
            piece = self.arrays[i][begin:begin + len(out) - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            i += 1
        return out


def dummy_stream(n_seq: int, seed: int, split: str, vocab_size: int) -> TokenStream:
    """Uniform random tokens, a function of (seed, split): lets tiny tests and smoke runs skip files."""
    positions = np.arange(DUMMY_TOKENS, dtype=np.uint64)
    tokens = (mix64(seed, split_id(split), 0xD0, positions) % np.uint64(vocab_size)).astype(np.int32)
    return TokenStream([tokens], n_seq, seed, split, vocab_size, "dummy")


def packed_stream(folder: Path, n_seq: int, seed: int, split: str, vocab_size: int) -> TokenStream:
    """Memory-map a split's shards (files starting with the split name); meta.json, when present, gives the
    tokenizer's vocabulary and each shard's real token count (the sep padding of a last shard is dropped)."""
    from data.meta import read_meta, real_token_counts
    from data.packed import ShardError, open_shard

    prefix = "train" if split_id(split) == 0 else "val"
    paths = sorted(p for p in Path(folder).glob("*.bin") if p.name.startswith(prefix))
    if not paths:
        raise DataError(f"{folder} has no {prefix}*.bin shards: prepare that split (make data ... SPLIT=...)")
    meta = read_meta(folder)
    real = real_token_counts(meta)
    try:
        arrays = [open_shard(p)[:real.get(p.name)] for p in paths]
    except ShardError as e:
        raise DataError(f"{e}: rebuild the folder (make data / make data-lite --force)") from None
    check_token_ids(paths, arrays, vocab_size)
    return TokenStream(arrays, n_seq, seed, split, meta.get("vocab_size", vocab_size), str(folder))


def id_range_cache() -> Path:
    """Our own record of scanned shards: a file in the data folder could come with the data, and lie."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-pretrain" / "token_id_ranges.json"


def check_token_ids(paths: list[Path], arrays: list[np.ndarray], vocab_size: int) -> None:
    """Every token id in [0, vocab_size), found when the data is opened, before the model is built, instead of
    as an IndexError (on a GPU a device-side assert) mid-run. meta.json's vocab_size is not enough: it is
    written apart from the shards, and shards also come from elsewhere. So each shard is scanned once; its
    (min, max) is cached by path, size and modification time (id_range_cache)."""
    cache_file = id_range_cache()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    ranges, scanned = {}, False
    for path, tokens in zip(paths, arrays):
        if tokens.dtype.kind in "iu" and len(tokens):
            stat = path.stat()
            key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
            if key not in cache:
                cache[key], scanned = [int(tokens.min()), int(tokens.max())], True
            ranges[path] = cache[key]
    if scanned:
        cache = {k: v for k, v in cache.items() if Path(k.rsplit(":", 2)[0]).exists()}  # forget deleted shards
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home: the next run scans again
    for path, (low, high) in ranges.items():
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise DataError(f"{path} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}): "
                            f"set vocab_size={high + 1} or more, or rebuild the data with the tokenizer the "
                            "model uses")


def missing(spec: str) -> DataError:
    if Path(spec).name == "lite" and Path(spec).parent.name == "data":
        return DataError(f"{spec} not found: run `make data-lite` to build the small real corpus (or use data=dummy)")
    return DataError(f"{spec} not found: check the path, or build it with `make data SOURCE=... DEST={spec}`")


def open_data(spec: str, split: str, n_seq: int, seed: int, vocab_size: int, tokenizer: str = "") -> Windows:
    """The token stream named by `spec`:
    dummy | a packed-shard folder | a recipe .yaml | hf:<name>[:<config>] |
    a .txt/.jsonl[.zst]/.parquet file or a folder of them (tokenized on the fly with `tokenizer`).
    """
    split_id(split)
    if spec == "dummy":
        return dummy_stream(n_seq, seed, split, vocab_size)
    if spec.startswith("hf:"):
        from data.onthefly import hf_stream
        return hf_stream(spec[3:], split, n_seq, seed, tokenizer)
    path = Path(spec)
    if not path.exists():
        raise missing(spec)
    if path.suffix in (".yaml", ".yml"):
        from data.recipe import mixture_stream
        return mixture_stream(path, split, n_seq, seed, vocab_size, tokenizer)
    if path.is_dir() and any(path.glob("*.bin")):
        return packed_stream(path, n_seq, seed, split, vocab_size)
    from data.onthefly import text_stream
    return text_stream(path, split, n_seq, seed, tokenizer)
