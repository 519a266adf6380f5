"""The bottom of data/: a stream of training windows and data's one-line error.

A stream is a pure function: `stream.batch(first, count)` (windows first..first+count-1) depends only on
(seed, split, window numbers), so resuming at any window continues the same stream and no reader state is saved.

Window j of a split starts at a position hashed from (seed, split, j): a counter-based draw, so the stream
does not depend on how it is cut into batches either.
Windows are n_seq+1 tokens and may cross document (EOS) and shard boundaries.
"""

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a batch is made, so the data commands start without it
    import torch

SPLITS = {"train": 0, "val": 1, "validation": 1}
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
