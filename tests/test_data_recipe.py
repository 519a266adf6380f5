"""Mixtures: a recipe YAML from flags or prompts; windows drawn by weight, deterministically per index."""

import builtins
import sys

import numpy as np
import pytest
import torch

from data.loader import open_data
from data.meta import write_meta
from data.packed import ShardWriter
from data.recipe import load_recipe, main, parse_sources
from data.stream import DataError


def shard_folder(folder, first_token, n=5000, sha="same"):
    """A packed folder whose tokens all lie in [first_token, first_token + 100): its windows are recognizable."""
    folder.mkdir()
    for split in ("train", "val"):
        writer = ShardWriter(folder, split, 1000, 0, np.uint16)
        writer.add(first_token + np.arange(n) % 100)
        writer.close()
    write_meta(folder, {"tokenizer_sha1": sha, "tokenizer": f"tok-{sha}", "vocab_size": 2000})
    return str(folder)


def test_parse_sources():
    assert parse_sources("data/a:0.7 data/b:0.3 hf:wikitext hf:x:cfg:2 data/c") == [
        ("data/a", 0.7), ("data/b", 0.3), ("hf:wikitext", 1.0), ("hf:x:cfg", 2.0), ("data/c", 1.0)]


def test_mixture_follows_the_weights_and_resumes(tmp_path):
    a, b = shard_folder(tmp_path / "a", 100), shard_folder(tmp_path / "b", 1000)
    main(["--sources", f"{a}:7", f"{b}:3", "--out", str(tmp_path / "mix.yaml")])  # as Make passes it, unquoted
    assert load_recipe(tmp_path / "mix.yaml") == [(a, 0.7), (b, 0.3)]
    stream = open_data(str(tmp_path / "mix.yaml"), "train", 16, seed=3, vocab_size=2000)
    rows = torch.cat([stream.batch(100 * i, 100) for i in range(40)])
    from_a = (rows < 1000).all(dim=1).float().mean().item()
    assert abs(from_a - 0.7) < 0.03 and ((rows >= 1000).all(dim=1) | (rows < 1000).all(dim=1)).all()
    assert torch.equal(stream.batch(350, 50), rows[350:400])  # batch size 50 resumes the batch-100 stream
    assert stream.vocab_size == 2000 and stream.num_tokens == 10000
    assert not torch.equal(open_data(str(tmp_path / "mix.yaml"), "val", 16, 3, 2000).batch(0, 8), rows[:8])


def test_recipe_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    with pytest.raises(DataError, match="no sources"):
        main([])
    with pytest.raises(DataError, match="not found"):
        main(["--sources", str(tmp_path / "missing"), "--out", str(tmp_path / "x.yaml")])
    (tmp_path / "bad.yaml").write_text("just: text\n")
    with pytest.raises(DataError, match="not a recipe"):
        open_data(str(tmp_path / "bad.yaml"), "train", 8, 0, 100)
    a, b = shard_folder(tmp_path / "a", 1, sha="one"), shard_folder(tmp_path / "b", 1, sha="two")
    main(["--sources", f"{a} {b}", "--out", str(tmp_path / "two.yaml")])
    with pytest.raises(DataError, match="different tokenizers"):
        open_data(str(tmp_path / "two.yaml"), "train", 8, 0, 100)


def test_interactive_recipe(tmp_path, monkeypatch):
    a, b = shard_folder(tmp_path / "a", 1), shard_folder(tmp_path / "b", 200)
    answers = iter([a, "3", str(tmp_path / "typo"), b, "", "", str(tmp_path / "asked.yaml")])
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    main([])
    assert load_recipe(tmp_path / "asked.yaml") == [(a, 0.75), (b, 0.25)]
