import numpy as np
import pytest
import torch

from data.packed import ShardWriter


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped, and reported as skipped, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def markov_data(tmp_path) -> str:
    """Packed train/val shards of learnable tokens (vocab 64): each follows a fixed successor of the previous
    one 80% of the time, so a tiny model's loss falls from ln 64 = 4.16 towards the entropy, ~1.31."""
    return markov_shards(tmp_path / "markov")


def markov_shards(folder, vocab=64, n=60_000, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    successor = rng.permutation(vocab - 1) + 1
    tokens = np.empty(n, dtype=np.int64)
    tokens[0] = 1
    noise = rng.integers(1, vocab, n)
    follow = rng.random(n) < 0.8
    for i in range(1, n):
        tokens[i] = successor[tokens[i - 1] - 1] if follow[i] else noise[i]
    for split, part in (("train", tokens[: n * 9 // 10]), ("val", tokens[n * 9 // 10:])):
        writer = ShardWriter(folder, split, 1000, sep_token=0, dtype=np.uint16)  # whole chunks: no padding
        writer.add(part)
        writer.close()
    return str(folder)
