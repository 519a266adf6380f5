"""TinyLlama's packed shard format (lit_gpt/packed_dataset.py), so shards move between the two unchanged.

A shard is `<prefix>_<counter:010d>.bin`: a 24-byte little-endian header, then `chunk_size` tokens.

    offset 0   7 bytes  magic b"LITPKDS"
    offset 7   uint64   version, always 1
    offset 15  uint8    dtype code (DTYPES below)
    offset 16  uint64   chunk_size: tokens in the file
    offset 24  tokens   chunk_size x dtype, C order

Documents are concatenated across shard boundaries; the unused tail of the last shard is filled with
the separator token (EOS here), as TinyLlama's builder does.
"""

import struct
from pathlib import Path

import numpy as np

MAGIC = b"LITPKDS"
VERSION = 1
HEADER_SIZE = 24
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64,
          8: np.uint16}
DTYPE_CODES = {np.dtype(t): code for code, t in DTYPES.items()}
UINT16_LIMIT = 65500  # TinyLlama's cut-off for uint16 ids; larger vocabularies are stored as int32


class ShardError(ValueError):
    """A file that is not a valid packed shard."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype TinyLlama would pick for this vocabulary."""
    return np.dtype(np.uint16 if vocab_size < UINT16_LIMIT else np.int32)


def shard_name(prefix: str, counter: int) -> str:
    return f"{prefix}_{counter:010d}.bin"


def read_header(path: Path) -> tuple[np.dtype, int]:
    """(dtype, chunk_size) of a shard; ShardError if the header is not TinyLlama's."""
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE or header[:7] != MAGIC:
        raise ShardError(f"{path} is not a packed shard (no {MAGIC.decode()} header)")
    (version,) = struct.unpack("<Q", header[7:15])
    code = header[15]
    (chunk_size,) = struct.unpack("<Q", header[16:24])
    if version != VERSION or code not in DTYPES:
        raise ShardError(f"{path}: unsupported shard version {version} or dtype code {code}")
    return np.dtype(DTYPES[code]), chunk_size


def open_shard(path: Path) -> np.ndarray:
    """Memory-map a shard's tokens (read-only, no copy)."""
    dtype, chunk_size = read_header(path)
    available = (Path(path).stat().st_size - HEADER_SIZE) // dtype.itemsize
    if available < chunk_size:
        raise ShardError(f"{path} is truncated: {available} of {chunk_size} tokens")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(chunk_size,))


class ShardWriter:
    """Appends token arrays into fixed-size chunks and writes each full chunk as one shard.

    Files appear only when complete (written to .tmp, then renamed), so a crash leaves no half shard.
    """

    def __init__(self, out_dir: Path, prefix: str, chunk_size: int, sep_token: int, dtype: np.dtype):
        self.out_dir, self.prefix, self.sep_token = Path(out_dir), prefix, sep_token
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no code in the packed format")
        self.chunk = np.full(chunk_size, sep_token, dtype=self.dtype)
        self.filled = 0
        self.shards: dict[str, int] = {}  # file name -> real tokens (the sep padding excluded)

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        while len(tokens):
            take = min(len(tokens), len(self.chunk) - self.filled)
            self.chunk[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == len(self.chunk):
                self._write()

    def close(self) -> dict[str, int]:
        """Write the partly filled last chunk (sep-padded; an empty one is not written); returns `shards`."""
        if self.filled:
            self._write()
        return self.shards

    def remove(self) -> None:
        """Delete what this writer wrote (its input turned out to be damaged)."""
        for name in self.shards:
            (self.out_dir / name).unlink(missing_ok=True)
        self.shards = {}

    def _write(self) -> None:
        path = self.out_dir / shard_name(self.prefix, len(self.shards))
        tmp = path.with_suffix(".bin.tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<QBQ", VERSION, DTYPE_CODES[self.dtype], len(self.chunk)))
            f.write(self.chunk.tobytes(order="C"))
        tmp.replace(path)
        self.shards[path.name] = self.filled
        self.chunk.fill(self.sep_token)
        self.filled = 0
