"""Documents -> token ids + EOS -> packed shards: the one tokenization path of prepare and prepare_lite."""

from typing import Callable, Iterable

import numpy as np

from data.packed import ShardWriter

BATCH_DOCS = 512  # documents per encode_batch call: large enough for the Rust tokenizer's threads to pay off


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """ids without special tokens (a Llama tokenizer would add BOS): documents are separated by EOS alone."""
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def pack_documents(documents: Iterable[tuple[str, str]], tokenizer, writer: ShardWriter,
                   progress: Callable[[int, int], None] = lambda docs, tokens: None) -> dict:
    """Tokenize, append EOS to each document, write; returns {"documents", "tokens", "sources": {name: tokens}}."""
    eos = tokenizer.eos_token_id
    stats = {"documents": 0, "tokens": 0, "sources": {}}
    batch: list[tuple[str, str]] = []

    def flush():
        flat: list[int] = []
        for (_, source), ids in zip(batch, encode_batch(tokenizer, [text for text, _ in batch])):
            flat.extend(ids)
            flat.append(eos)
            stats["sources"][source] = stats["sources"].get(source, 0) + len(ids) + 1
        writer.add(np.array(flat, dtype=writer.dtype))
        stats["documents"] += len(batch)
        stats["tokens"] += len(flat)
        progress(len(batch), len(flat))
        batch.clear()

    for document in documents:
        batch.append(document)
        if len(batch) == BATCH_DOCS:
            flush()
    if batch:
        flush()
    return stats
