"""`make data`: tokenize a corpus into TinyLlama-format packed shards (the seed's prepare_slim_pajama).

    python -m data.prepare --source datasets/SlimPajama-627B --tokenizer meta-llama/Llama-2-7b-hf \
        --dest datasets/slim_star_combined --split validation --percentage 1.0 --workers 8

Each input file becomes its own shards (`<split>_<file>_<counter>.bin`) in one worker process, and is
recorded in DEST/meta.json only when complete, so a rerun skips finished files and redoes the rest.
"""

import argparse
import multiprocessing as mp
import os
import queue
import re
import time
from pathlib import Path

from tqdm import tqdm

from data.cli import run
from data.hub import hub_reachable
from data.stream import DataError
from data.meta import read_meta, summarize_split, write_meta
from data.pack import pack_documents
from data.packed import ShardWriter, token_dtype
from data.sources import BadInput, Issues, file_documents, hf_documents, input_files, split_root
from data.tokenizer import load_tokenizer, tokenizer_sha1

CHUNK_SIZE = 2049 * 256  # a multiple of TinyLlama's block (2048+1); small enough that per-file padding is ~1%


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="SlimPajama-style tree, folder/file of .jsonl[.zst]/.txt/.parquet, "
                                                  "or hf:<dataset>[:<config>]")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, tokenizer folder or transformers name")
    p.add_argument("--dest", required=True, help="shard folder (created; meta.json records progress)")
    p.add_argument("--split", default="train", help="train | validation (the SlimPajama folder name)")
    p.add_argument("--percentage", type=float, default=1.0, help="fraction of the input files to use (0, 1]")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--chunk-size", type=int, default=0,
                   help=f"tokens per shard (default: DEST's, else {CHUNK_SIZE}; TinyLlama needs one size per folder)")
    p.add_argument("--name", default="", help="corpus name in shard file names (default: the source's name)")
    p.add_argument("--strict", action="store_true", help="fail on a damaged file or record instead of skipping it")
    args = p.parse_args(argv)
    require_flags(args, "source")  # the others once the source is known to exist: the first thing to fix
    if not 0 < args.percentage <= 1:
        raise DataError(f"--percentage {args.percentage} is outside (0, 1]: use e.g. 0.1 for a tenth of the files")
    if args.workers < 1:
        raise DataError("--workers must be at least 1")
    args.name = args.name or slug(Path(args.source.removeprefix("hf:").partition(":")[0]).name) or "corpus"
    return args


def require_flags(args: argparse.Namespace, *flags: str) -> None:
    for flag in flags:
        if not getattr(args, flag):
            raise DataError(f"--{flag} is empty: make data SOURCE=<corpus> TOKENIZER=<tokenizer> DEST=<shard folder>")


def list_inputs(source: str, split: str, percentage: float) -> dict[str, str]:
    """{input name (stable across runs): location (a file path or hf:<name>[:<config>])}."""
    if source.startswith(("/", ".", "~")) and not Path(source).exists():  # a path, never a hub dataset's name
        raise DataError(f"{source} is not a file or folder: check SOURCE (a Hugging Face dataset is hf:<name>)")
    if source.startswith("hf:") or not Path(source).exists():
        name = source.removeprefix("hf:").partition(":")[0]
        if not Path(name).exists() and not hub_reachable():
            raise DataError(f"{source} is not a file or folder, and the Hugging Face hub is unreachable for a "
                            "dataset name: check the path")
        spec = source if source.startswith("hf:") else f"hf:{source}"
        return {spec: spec}
    root = split_root(Path(source), split)
    files = input_files(root)
    if not files:
        raise DataError(f"no .jsonl, .jsonl.zst, .txt or .parquet files under {source} (split {split}): check --source")
    files = files[:max(1, int(len(files) * percentage))]  # TinyLlama's rule: the first files, in sorted order
    return {(str(f.relative_to(root)) if f != root else f.name): str(f) for f in files}


def open_dest(dest: str) -> Path:
    path = Path(dest)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"cannot write to DEST {dest} ({e.strerror or e}): choose a writable folder") from None
    return path


def tokenizer_fingerprint(tokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id,
            "tokenizer_sha1": tokenizer_sha1(tokenizer)}


def start_meta(dest: Path, args, tokenizer, dtype) -> dict:
    """DEST's meta, checked against this run: one folder holds one tokenizer's shards only."""
    meta = read_meta(dest)
    args.chunk_size = args.chunk_size or meta.get("chunk_size", CHUNK_SIZE)
    ours = {**tokenizer_fingerprint(tokenizer), "dtype": dtype.name, "chunk_size": args.chunk_size}
    theirs = {k: meta[k] for k in ours if k in meta}
    if theirs and theirs != ours:
        different = ", ".join(f"{k} {theirs.get(k)} != {v}" for k, v in ours.items() if theirs.get(k) != v)
        raise DataError(f"{dest} was prepared with another tokenizer or layout ({different}): use a new --dest")
    meta.update(ours, format="LITPKDS v1 (TinyLlama PackedDataset)", tokenizer=args.tokenizer)
    split = meta.setdefault("splits", {}).setdefault(args.split, {})
    split.update(source=args.source, percentage=args.percentage)
    split.setdefault("inputs", {})
    split.setdefault("failed", {})
    return meta


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def shard_prefix(split: str, corpus: str, name: str) -> str:
    """<split>_<corpus>_<input>: the loader selects on the split, TinyLlama's recipes on the start
    (e.g. train_slim* for a corpus named slimpajama...), and the input part makes it unique."""
    return f"{split}_{slug(corpus)}_{slug(name)}"


_worker: dict = {}


def init_worker(tokenizer_ref: str, progress, parallel_tokenizer: bool) -> None:
    if not parallel_tokenizer:  # one process per core already: Rust threads would only contend
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=load_tokenizer(tokenizer_ref), progress=progress)


def tokenize_input(name: str, location: str, dest: str, prefix: str, chunk_size: int, dtype: str,
                   split: str, strict: bool) -> dict:
    """One input -> its shards. Returns its meta record, or {"error": ...} after deleting partial shards."""
    tokenizer = _worker["tokenizer"]
    for stale in Path(dest).glob(f"{prefix}_{'[0-9]' * 10}.bin"):  # from an interrupted run
        stale.unlink()
    writer = ShardWriter(Path(dest), prefix, chunk_size, tokenizer.eos_token_id, dtype)
    issues = Issues(strict)
    try:
        if location.startswith("hf:"):
            hf_name, _, config = location[3:].partition(":")
            documents = hf_documents(hf_name, config or None, split, issues)
        else:
            documents = file_documents(Path(location), issues)
        stats = pack_documents(documents, tokenizer, writer, lambda d, t: _worker["progress"].put((d, t)))
        shards = writer.close()
    except BadInput as e:
        writer.remove()
        return {"error": str(e)}
    return {**stats, "shards": shards, "issues": dict(issues.counts), "first_issue": issues.first}


def describe_issues(split: dict) -> list[str]:
    counts, first = {}, {}
    for done in split["inputs"].values():
        for kind, n in done["issues"].items():
            counts[kind] = counts.get(kind, 0) + n
            first.setdefault(kind, done["first_issue"][kind])
    return [f"{n:,} {Issues.KINDS[kind]} (first: {first[kind]})" for kind, n in counts.items()]


def prepare(args) -> dict:
    inputs = list_inputs(args.source, args.split, args.percentage)
    require_flags(args, "tokenizer", "dest")
    dest = open_dest(args.dest)
    tokenizer = load_tokenizer(args.tokenizer)
    if not tokenizer.is_fast or tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {args.tokenizer} must be a fast tokenizer with an EOS token")
    dtype = token_dtype(len(tokenizer))
    meta = start_meta(dest, args, tokenizer, dtype)
    split = meta["splits"][args.split]
    todo = {name: loc for name, loc in inputs.items() if name not in split["inputs"]}
    print(f"tokenizer {args.tokenizer}: {len(tokenizer):,} ids, EOS {tokenizer.eos_token_id} -> {dtype.name} shards"
          + ("" if dtype.name == "uint16" else " (the vocabulary does not fit uint16)"))
    print(f"{args.split}: {len(inputs)} inputs from {args.source}, {len(inputs) - len(todo)} already done"
          + (f", {len(todo)} to tokenize with {min(args.workers, len(todo))} workers -> {dest}" if todo else
             f": nothing to do ({dest} is complete for this split)"))
    write_meta(dest, meta)

    started = time.time()
    run_tokens = tokenize_all(args, todo, meta, dest, dtype.name) if todo else 0
    print_summary(args, split, run_tokens, time.time() - started, dest)
    return meta


def tokenize_all(args, todo: dict[str, str], meta: dict, dest: Path, dtype: str) -> int:
    """Run the inputs across worker processes, committing each to meta as it finishes; returns tokens written."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    progress, workers = ctx.Queue(), min(args.workers, len(todo))
    bar = tqdm(desc=args.split, unit=" docs", dynamic_ncols=True, mininterval=0.5)
    started, run_tokens = time.time(), 0
    with ctx.Pool(workers, init_worker, (args.tokenizer, progress, workers == 1)) as pool:
        pending = {name: pool.apply_async(tokenize_input, (name, location, str(dest),
                                                           shard_prefix(args.split, args.name, name), args.chunk_size,
                                                           dtype, args.split, args.strict))
                   for name, location in todo.items()}
        while pending:
            done = f"{len(todo) - len(pending)}/{len(todo)}"
            run_tokens += show_progress(bar, progress, run_tokens, started, done)
            for name in [n for n, r in pending.items() if r.ready()]:
                record(meta, dest, args.split, name, pending.pop(name).get(), args.strict, bar)
    while not progress.empty():
        run_tokens += show_progress(bar, progress, run_tokens, started, f"{len(todo)}/{len(todo)}")
    bar.close()
    return run_tokens


def show_progress(bar, progress, run_tokens: int, started: float, inputs_done: str) -> int:
    """Wait briefly for a worker's (documents, tokens) report and show it; returns the tokens reported."""
    try:
        docs, tokens = progress.get(timeout=0.2)
    except queue.Empty:
        return 0
    rate = (run_tokens + tokens) / max(time.time() - started, 1e-9)
    bar.set_postfix_str(f"{run_tokens + tokens:,} tokens, {rate:,.0f} tokens/s, {inputs_done} inputs", refresh=False)
    bar.update(docs)
    return tokens


def record(meta: dict, dest: Path, split_name: str, name: str, result: dict, strict: bool, bar) -> None:
    """Commit one finished input to meta.json (atomically): from now on a rerun skips it."""
    split = meta["splits"][split_name]
    if "error" in result:
        split["failed"][name] = result["error"]
        write_meta(dest, meta)
        if strict:
            raise DataError(f"{result['error']} (without --strict it would be listed and skipped)")
        bar.write(f"skipped damaged input: {result['error']}")
        return
    split["failed"].pop(name, None)
    split["inputs"][name] = result
    summarize_split(split)
    write_meta(dest, meta)


def print_summary(args, split: dict, run_tokens: int, seconds: float, dest: Path) -> None:
    summarize_split(split)
    rate = run_tokens / max(seconds, 1e-9)
    print(f"{args.split}: {split['documents']:,} documents, {split['tokens']:,} tokens in {len(split['inputs'])} "
          f"inputs; this run {run_tokens:,} tokens in {seconds:.1f} s ({rate:,.0f} tokens/s)")
    print("per source: " + ", ".join(f"{k} {v:,}" for k, v in split["sources"].items()))
    for line in describe_issues(split):
        print(f"note: {line}")
    for error in split["failed"].values():
        print(f"FAILED (skipped; fix or remove it and rerun): {error}")
    print(f"meta: {dest / 'meta.json'}")


def main(argv=None) -> None:
    prepare(parse_args(argv))


if __name__ == "__main__":
    run(main)
