"""`open_data(spec, ...)`: the token stream a data spec names (data/stream.py says what a stream is). Dummy
tokens and packed-shard folders are read here; text files and hub datasets in data/onthefly.py; a recipe's
mixture of sources in data/recipe.py, each source opened here again.
"""

import json
import os
from pathlib import Path

import numpy as np

from data.meta import read_meta, real_token_counts
from data.onthefly import hf_stream, text_stream
from data.packed import ShardError, open_shard
from data.recipe import MixtureStream, check_one_tokenizer, load_recipe
from data.stream import DataError, TokenStream, Windows, mix64, split_id

DUMMY_TOKENS = 1 << 20  # the dummy corpus: big enough that tiny runs never repeat a window exactly


def dummy_stream(n_seq: int, seed: int, split: str, vocab_size: int) -> TokenStream:
    """Uniform random tokens, a function of (seed, split): lets tiny tests and smoke runs skip files."""
    positions = np.arange(DUMMY_TOKENS, dtype=np.uint64)
    tokens = (mix64(seed, split_id(split), 0xD0, positions) % np.uint64(vocab_size)).astype(np.int32)
    return TokenStream([tokens], n_seq, seed, split, vocab_size, "dummy")


def packed_stream(folder: Path, n_seq: int, seed: int, split: str, vocab_size: int) -> TokenStream:
    """Memory-map a split's shards (files starting with the split name); meta.json, when present, gives the
    tokenizer's vocabulary and each shard's real token count (the sep padding of a last shard is dropped)."""
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


def mixture_stream(path: Path, split: str, n_seq: int, seed: int, vocab_size: int, tokenizer: str) -> MixtureStream:
    """A recipe's sources, each opened as open_data opens any source, drawn by weight window by window."""
    sources = load_recipe(path)
    check_one_tokenizer([p for p, _ in sources])
    streams = [open_data(p, split, n_seq, seed, vocab_size, tokenizer) for p, _ in sources]
    return MixtureStream(streams, [w for _, w in sources], seed, split)


def open_data(spec: str, split: str, n_seq: int, seed: int, vocab_size: int, tokenizer: str = "") -> Windows:
    """The token stream named by `spec`:
    dummy | a packed-shard folder | a recipe .yaml | hf:<name>[:<config>] |
    a .txt/.jsonl[.zst]/.parquet file or a folder of them (tokenized on the fly with `tokenizer`).
    """
    split_id(split)
    if spec == "dummy":
        return dummy_stream(n_seq, seed, split, vocab_size)
    if spec.startswith("hf:"):
        return hf_stream(spec[3:], split, n_seq, seed, tokenizer)
    path = Path(spec)
    if not path.exists():
        raise missing(spec)
    if path.suffix in (".yaml", ".yml"):
        return mixture_stream(path, split, n_seq, seed, vocab_size, tokenizer)
    if path.is_dir() and any(path.glob("*.bin")):
        return packed_stream(path, n_seq, seed, split, vocab_size)
    return text_stream(path, split, n_seq, seed, tokenizer)
