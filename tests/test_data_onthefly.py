"""Training straight from text files or a datasets dataset: tokenized once, cached, then the usual windows."""

import json

import numpy as np
import pytest

import data.onthefly as onthefly
from data.bpe import save_tokenizer, train_bpe
from data.loader import open_data
from data.stream import DataError
from data.tokenizer import load_tokenizer

TEXTS = [f"the king {i} walks to the sea with gold and a sword at night" * 3 for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return str(save_tokenizer(train_bpe(TEXTS, 300), tmp_path_factory.mktemp("tok")))


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(onthefly, "CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def ids(tokenizer_path, texts):
    tok = load_tokenizer(tokenizer_path)
    return [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]


def test_text_folder_is_tokenized_once_and_split_95_5(tokenizer_path, tmp_path, cache, monkeypatch):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"{i:03d}.txt").write_text(text)
    train = open_data(str(folder), "train", 8, 0, 300, tokenizer_path)
    val = open_data(str(folder), "val", 8, 0, 300, tokenizer_path)
    everything = ids(tokenizer_path, TEXTS)
    assert np.concatenate(train.arrays + val.arrays).tolist() == everything
    assert val.num_tokens == int(len(everything) * 0.05) and train.vocab_size == len(load_tokenizer(tokenizer_path))
    assert len(list(cache.glob("*.npy"))) == 1
    monkeypatch.setattr(onthefly, "tokenize", lambda *a: pytest.fail("the cache was not used"))
    assert open_data(str(folder), "train", 8, 0, 300, tokenizer_path).batch(6, 3).equal(train.batch(6, 3))


def test_single_jsonl_file(tokenizer_path, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert open_data(str(path), "train", 8, 0, 300, tokenizer_path).num_tokens == \
        len(ids(tokenizer_path, TEXTS)) - int(len(ids(tokenizer_path, TEXTS)) * 0.05)


def test_hf_dataset_uses_its_validation_split(tokenizer_path, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:30]))
    (ds / "validation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[30:]))
    val = open_data(f"hf:{ds}", "val", 8, 0, 300, tokenizer_path)
    assert val.arrays[0].tolist() == ids(tokenizer_path, TEXTS[30:])
    assert open_data(f"hf:{ds}", "train", 8, 0, 300, tokenizer_path).num_tokens == len(ids(tokenizer_path, TEXTS[:30]))


def test_hf_dataset_without_validation_holds_out_the_tail(tokenizer_path, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    train = open_data(f"hf:{ds}", "train", 8, 0, 300, tokenizer_path)
    val = open_data(f"hf:{ds}", "val", 8, 0, 300, tokenizer_path)
    assert train.num_tokens + val.num_tokens == len(ids(tokenizer_path, TEXTS))


def test_unusable_specs_raise_data_error(tokenizer_path, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no packed shards"):
        open_data(str(tmp_path / "empty"), "train", 8, 0, 300, tokenizer_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot open dataset"):
        open_data("hf:no-such-org/no-such-dataset", "train", 8, 0, 300, tokenizer_path)
