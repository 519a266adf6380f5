"""Train on raw text without a prepare step: `data=<file or folder of .txt/.jsonl[.zst]/.parquet>` or
`data=hf:<name>[:<config>]`. Everything is tokenized into memory once and cached under data/cache/tokens/,
keyed by the files (path, size, mtime) or dataset name and the tokenizer. Meant for small corpora."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from data.hub import hub_reachable
from data.stream import DataError, TokenStream
from data.pack import pack_documents
from data.sources import BadInput, Issues, file_documents, hf_documents, input_files
from data.tokenizer import load_tokenizer, tokenizer_sha1

CACHE = Path(__file__).parent / "cache" / "tokens"
VAL_FRACTION = 0.05  # without a validation split, the last 5% of the tokens are held out


class TokenBuffer:
    """Collects pack_documents' output in memory instead of shards."""

    dtype = np.dtype(np.int32)

    def __init__(self):
        self.parts: list[np.ndarray] = []

    def add(self, tokens: np.ndarray) -> None:
        self.parts.append(tokens)


def tokenize(documents, tokenizer, what: str) -> np.ndarray:
    issues, buffer = Issues(), TokenBuffer()
    try:
        pack_documents(documents(issues), tokenizer, buffer)
    except BadInput as e:
        raise DataError(f"{e}: fix or remove it") from None
    if issues.counts:
        print(f"{what}: " + ", ".join(f"{n} {Issues.KINDS[k]}" for k, n in issues.counts.items()))
    return np.concatenate(buffer.parts) if buffer.parts else np.empty(0, np.int32)


def cached_tokens(key: dict, tokenizer, documents, what: str) -> np.ndarray:
    """Tokens of `documents`, computed once per (key, tokenizer)."""
    key = {**key, "tokenizer": tokenizer_sha1(tokenizer)}
    path = CACHE / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest() + ".npy")
    if path.exists():
        return np.load(path, mmap_mode="r")
    print(f"tokenizing {what} once (cached in {path.parent}) ...")
    tokens = tokenize(documents, tokenizer, what)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, path)
    return tokens


def held_out(tokens: np.ndarray, split: str) -> np.ndarray:
    cut = len(tokens) - int(len(tokens) * VAL_FRACTION)
    return tokens[:cut] if split == "train" else tokens[cut:]


def file_key(files: list[Path]) -> list:
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def text_stream(path: Path, split: str, n_seq: int, seed: int, tokenizer_ref: str) -> TokenStream:
    files = input_files(path)
    if not files:
        raise DataError(f"{path} holds no packed shards and no .txt, .jsonl, .jsonl.zst or .parquet files: "
                        "point data= at one of those")
    tokenizer = load_tokenizer(tokenizer_ref)
    key = {"files": file_key(files)}

    def documents(issues):
        for f in files:
            yield from file_documents(f, issues)

    tokens = cached_tokens(key, tokenizer, documents, str(path))
    return TokenStream([held_out(tokens, split)], n_seq, seed, split, len(tokenizer), str(path))


def hf_split_names(name: str, config: str | None) -> list[str]:
    import datasets

    if not os.path.exists(name) and not hub_reachable():
        raise DataError(f"cannot open dataset {name!r}: the Hugging Face hub is unreachable; use a local folder "
                        "(hf:<folder>) or text files (data=<path>)")
    try:
        return datasets.get_dataset_split_names(name, config)
    except Exception as e:  # not found, no network, bad config: all mean the same to the user
        raise DataError(f"cannot open dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                        "check the name (hf:<name>[:<config>]) and that it is cached or the hub is reachable") from None


def hf_stream(spec: str, split: str, n_seq: int, seed: int, tokenizer_ref: str) -> TokenStream:
    """A dataset's train / validation split; without a validation split, the tail of train is held out."""
    name, _, config = spec.partition(":")
    config = config or None
    available = hf_split_names(name, config)
    if "train" not in available:
        raise DataError(f"dataset {name!r} has no train split (it has {', '.join(available)})")
    has_val = "validation" in available
    source = "validation" if split != "train" and has_val else "train"
    tokenizer = load_tokenizer(tokenizer_ref)
    key = {"dataset": name, "config": config, "split": source}
    if os.path.exists(name):  # a local dataset folder: its files are part of the key
        key["files"] = file_key(input_files(Path(name)))
    tokens = cached_tokens(key, tokenizer, lambda issues: hf_documents(name, config, source, issues), f"hf:{spec}")
    return TokenStream([tokens if has_val else held_out(tokens, split)], n_seq, seed, split, len(tokenizer),
                       f"hf:{spec}")
