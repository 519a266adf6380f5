"""open_data: a pure function of (seed, split, index) over dummy tokens and packed shards."""

import numpy as np
import pytest
import torch

from data.loader import open_data
from data.packed import ShardWriter
from data.stream import DataError


def write_split(folder, prefix, tokens, chunk_size=100, dtype=np.uint16):
    writer = ShardWriter(folder, prefix, chunk_size, sep_token=0, dtype=dtype)
    writer.add(np.asarray(tokens))
    return writer.close()


def test_dummy_is_deterministic_in_seed_split_index():
    a = open_data("dummy", "train", 16, seed=1, vocab_size=50)
    b = open_data("dummy", "train", 16, seed=1, vocab_size=50)
    assert a.batch(12, 4).shape == (4, 17) and a.batch(12, 4).dtype == torch.long
    assert torch.equal(a.batch(12, 4), b.batch(12, 4))
    assert not torch.equal(a.batch(12, 4), a.batch(16, 4))
    assert not torch.equal(a.batch(12, 4), open_data("dummy", "val", 16, 1, 50).batch(12, 4))
    assert not torch.equal(a.batch(12, 4), open_data("dummy", "train", 16, 2, 50).batch(12, 4))
    assert int(a.batch(0, 64).max()) < 50 and a.vocab_size == 50


def test_stream_continues_across_batch_sizes(tmp_path):
    """Reading window j in batches of any size reads the same windows as the uninterrupted run."""
    write_split(tmp_path, "train", np.arange(1000) % 500 + 1)
    stream = open_data(str(tmp_path), "train", 8, seed=0, vocab_size=512)
    whole = torch.cat([stream.batch(4 * i, 4) for i in range(4)])
    assert torch.equal(torch.cat([stream.batch(8 * i, 8) for i in range(2)]), whole)
    assert torch.equal(stream.batch(12, 2), whole[12:14])


def test_packed_windows_are_contiguous_slices(tmp_path):
    tokens = np.arange(1, 951)  # 10 shards of 100 (last one padded): windows cross shard boundaries
    write_split(tmp_path, "train", tokens)
    write_split(tmp_path, "val", np.arange(1, 60), chunk_size=64)
    stream = open_data(str(tmp_path), "train", 31, seed=5, vocab_size=1000)
    assert stream.num_tokens == 1000  # no meta.json: padding is read like TinyLlama reads it
    every_window = np.lib.stride_tricks.sliding_window_view(np.r_[tokens, np.zeros(50)], 32)
    for row in stream.batch(0, 64).numpy():
        assert (every_window == row).all(axis=1).any()
    assert open_data(str(tmp_path), "val", 31, 5, 1000).num_tokens == 64


def test_int32_shards_read_back(tmp_path):
    tokens = np.arange(70000, 70300)
    write_split(tmp_path, "train", tokens, chunk_size=300, dtype=np.int32)
    batch = open_data(str(tmp_path), "train", 299, seed=0, vocab_size=80000).batch(0, 1)
    assert np.array_equal(batch[0].numpy(), tokens)


def test_missing_data_lite_names_the_make_target(tmp_path):
    with pytest.raises(DataError, match="make data-lite"):
        open_data(str(tmp_path / "data" / "lite"), "train", 8, 0, 10)


def test_split_too_small_for_a_window(tmp_path):
    write_split(tmp_path, "train", np.arange(1, 20), chunk_size=20)
    with pytest.raises(DataError, match="fewer than one window"):
        open_data(str(tmp_path), "train", 32, 0, 100)
    with pytest.raises(DataError, match="no val"):
        open_data(str(tmp_path), "val", 8, 0, 100)
