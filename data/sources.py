"""Documents from the inputs `make data` accepts: a SlimPajama-style tree (<split>/chunkK/*.jsonl.zst), a
folder or file of .jsonl / .jsonl.zst / .txt / .parquet, or a Hugging Face dataset.

Nothing is dropped silently: damaged files raise BadInput (the caller lists and skips them), and repaired or
skipped records are counted in an Issues object with the first place each kind was seen.
"""

import json
from collections import Counter
from pathlib import Path
from typing import Iterator

SUFFIXES = (".jsonl", ".jsonl.zst", ".txt", ".parquet")
UNNAMED = "unnamed"  # the source name of documents without meta.redpajama_set_name
READ_SIZE = 1 << 20

Document = tuple[str, str]  # (text, source name)


class BadInput(Exception):
    """A file (or, with strict, a record) that cannot be read; the message names it and what is wrong."""


class Issues:
    """Counts of repaired or skipped records, by kind, with the first place each kind occurred."""

    KINDS = {"empty": "empty documents skipped", "invalid_utf8": "documents with invalid UTF-8 repaired",
             "missing_text": "records without a 'text' field skipped", "bad_json": "lines that are not JSON skipped"}
    FATAL_WHEN_STRICT = ("missing_text", "bad_json")

    def __init__(self, strict: bool = False):
        self.counts, self.first, self.strict = Counter(), {}, strict

    def add(self, kind: str, where: str) -> None:
        if self.strict and kind in self.FATAL_WHEN_STRICT:
            raise BadInput(f"{where}: {self.KINDS[kind].rsplit(' ', 1)[0]} (--strict)")
        self.counts[kind] += 1
        self.first.setdefault(kind, where)


def kind_of(path: Path) -> str:
    return next((s for s in SUFFIXES if path.name.endswith(s)), "")


def split_root(source: Path, split: str = "") -> Path:
    """<source>/<split> in a SlimPajama-style tree, else source itself."""
    return source / split if split and (source / split).is_dir() else source


def input_files(source: Path, split: str = "") -> list[Path]:
    """The split's readable files, sorted (every file under split_root)."""
    root = split_root(source, split)
    if root.is_file():
        return [root] if kind_of(root) else []
    return sorted(p for p in root.rglob("*") if p.is_file() and kind_of(p))


def clean(text, where: str, issues: Issues) -> str | None:
    """The text to tokenize, or None when the record is skipped."""
    if not isinstance(text, str):
        issues.add("missing_text", where)
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes: the tokenizer would reject them
        issues.add("invalid_utf8", where)
        text = text.encode("utf-8", "replace").decode("utf-8")
    if not text.strip():
        issues.add("empty", where)
        return None
    return text


def decode(raw: bytes, where: str, issues: Issues) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        issues.add("invalid_utf8", where)
        return raw.decode("utf-8", "replace")


def zstd_chunks(f) -> Iterator[bytes]:
    """Decompressed bytes of every frame; a truncated last frame raises (the zstd stream reader ends quietly)."""
    import zstandard

    dobj, in_frame = None, False
    while data := f.read(READ_SIZE):
        while data:
            if not in_frame:
                dobj, in_frame = zstandard.ZstdDecompressor().decompressobj(), True
            yield dobj.decompress(data)
            data = b""
            if dobj.eof:
                in_frame, data = False, dobj.unused_data
    if in_frame:
        raise BadInput("the zstd stream is truncated")


def lines_of(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        if path.name.endswith(".zst"):
            pending = b""
            for chunk in zstd_chunks(f):
                *lines, pending = (pending + chunk).split(b"\n")
                yield from lines
            yield pending
        else:
            yield from f


def jsonl_documents(path: Path, issues: Issues) -> Iterator[Document]:
    for number, raw in enumerate(lines_of(path), 1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(decode(raw, where, issues))
        except json.JSONDecodeError:
            issues.add("bad_json", where)
            continue
        if not isinstance(record, dict):
            issues.add("missing_text", where)
            continue
        text = clean(record.get("text"), where, issues)
        if text is not None:
            meta = record.get("meta")
            yield text, (meta.get("redpajama_set_name") if isinstance(meta, dict) else None) or UNNAMED


def parquet_documents(path: Path, issues: Issues) -> Iterator[Document]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    names = table.schema_arrow.names
    if "text" not in names:
        raise BadInput(f"no 'text' column (columns: {', '.join(names)})")
    columns = ["text"] + (["meta"] if "meta" in names else [])
    row = 0
    for batch in table.iter_batches(columns=columns):
        metas = batch.column("meta").to_pylist() if "meta" in columns else [None] * batch.num_rows
        for text, meta in zip(batch.column("text").to_pylist(), metas):
            row += 1
            text = clean(text, f"{path}:row {row}", issues)
            if text is not None:
                yield text, (meta.get("redpajama_set_name") if isinstance(meta, dict) else None) or UNNAMED


def file_documents(path: Path, issues: Issues) -> Iterator[Document]:
    """A file's documents; BadInput when the file is unreadable or damaged."""
    import pyarrow
    import zstandard

    try:
        kind = kind_of(path)
        if kind == ".txt":  # one file, one document
            text = clean(decode(path.read_bytes(), str(path), issues), str(path), issues)
            if text is not None:
                yield text, UNNAMED
        elif kind == ".parquet":
            yield from parquet_documents(path, issues)
        else:
            yield from jsonl_documents(path, issues)
    except BadInput as e:
        raise BadInput(e if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except (OSError, EOFError, zstandard.ZstdError, pyarrow.ArrowException) as e:
        raise BadInput(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def hf_documents(name: str, config: str | None, split: str, issues: Issues, **kwargs) -> Iterator[Document]:
    """Stream a Hugging Face dataset split (a hub name, or a local folder of data files) without downloading it all."""
    import datasets

    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True, **kwargs)
        for number, row in enumerate(rows, 1):
            text = clean(row.get("text"), f"{name}[{split}] row {number}", issues)
            if text is not None:
                meta = row.get("meta")
                yield text, (meta.get("redpajama_set_name") if isinstance(meta, dict) else None) or UNNAMED
    except BadInput:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError, ...)
        raise BadInput(f"cannot stream dataset {name!r} split {split!r}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
