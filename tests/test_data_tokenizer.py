"""load_tokenizer: files, folders, and a clear error instead of a minute of hub retries."""

import pytest

from data.bpe import save_tokenizer, train_bpe
from data.stream import DataError
from data.tokenizer import EOS, load_tokenizer


def test_saved_bpe_loads_from_file_and_folder(tmp_path):
    path = save_tokenizer(train_bpe(["to be or not to be, that is the question"] * 20, 300), tmp_path)
    for ref in (str(path), str(tmp_path)):
        tok = load_tokenizer(ref)
        assert tok.eos_token == EOS and tok.eos_token_id == 0
        assert tok.decode(tok("to be or not")["input_ids"]) == "to be or not"


def test_unloadable_tokenizers_raise_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="unreachable"):
        load_tokenizer("no-such-org/no-such-tokenizer")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer("")
