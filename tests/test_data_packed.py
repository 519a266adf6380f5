"""The shard format byte for byte: TinyLlama's lit_gpt/packed_dataset.py layout, so shards move both ways."""

import struct

import numpy as np
import pytest

from data.packed import HEADER_SIZE, ShardError, ShardWriter, open_shard, read_header, token_dtype


def test_header_matches_tinyllama_layout(tmp_path):
    writer = ShardWriter(tmp_path, "train_slimpajama_0", chunk_size=8, sep_token=2, dtype=np.uint16)
    writer.add(np.array([5, 6, 7]))
    assert writer.close() == {"train_slimpajama_0_0000000000.bin": 3}
    raw = (tmp_path / "train_slimpajama_0_0000000000.bin").read_bytes()
    # magic, version uint64 = 1, dtype code uint8 (8 = uint16), chunk size uint64, then the tokens
    assert raw[:HEADER_SIZE] == b"LITPKDS" + struct.pack("<Q", 1) + bytes([8]) + struct.pack("<Q", 8)
    assert HEADER_SIZE == 24
    # the unused tail of the last chunk holds the separator, as TinyLlama's builder leaves it
    assert np.frombuffer(raw[HEADER_SIZE:], np.uint16).tolist() == [5, 6, 7, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("vocab_size, dtype, code", [(32000, np.uint16, 8), (65499, np.uint16, 8),
                                                     (65500, np.int32, 4), (128256, np.int32, 4)])
def test_round_trip_uint16_and_int32(tmp_path, vocab_size, dtype, code):
    assert token_dtype(vocab_size) == dtype
    tokens = np.random.default_rng(0).integers(0, vocab_size, 2500)
    writer = ShardWriter(tmp_path, "val", chunk_size=1000, sep_token=1, dtype=token_dtype(vocab_size))
    writer.add(tokens[:700])
    writer.add(tokens[700:])  # appends continue across chunk boundaries
    shards = writer.close()
    assert list(shards.values()) == [1000, 1000, 500]
    assert (tmp_path / "val_0000000000.bin").read_bytes()[15] == code
    read = np.concatenate([open_shard(tmp_path / name)[:n] for name, n in shards.items()])
    assert read.dtype == dtype and np.array_equal(read, tokens)
    assert read_header(tmp_path / "val_0000000002.bin") == (np.dtype(dtype), 1000)


def test_damaged_shards_are_refused(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"NOTPKDS" + bytes(40))
    with pytest.raises(ShardError, match="not a packed shard"):
        open_shard(tmp_path / "a.bin")
    writer = ShardWriter(tmp_path, "b", chunk_size=100, sep_token=0, dtype=np.uint16)
    writer.add(np.arange(100))
    path = tmp_path / next(iter(writer.close()))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match="truncated"):
        open_shard(path)
