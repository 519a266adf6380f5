"""make export of a phase 7 run: transformers' AutoTokenizer + AutoModelForCausalLM.generate at temperature 0 give
the text that `make chat` gives from the checkpoint, with the dense and with the TT embedding."""

import io
import sys

import pytest
import torch
from tokenizers import processors

from engine.train import Trainer
from phases import load_config
from tests.tiny_tokenizer import tiny_bpe

EOS = "<|endoftext|>"
PROMPTS = ["to be", "that is the"]
NEW_TOKENS = 12


def train_run(folder, *extra) -> str:
    """A tiny phase 7 run whose tokenizer adds BOS on encode, as a Llama tokenizer does; training and chat never
    add it (data/pack.py, engine/chat.py), so the export must not either."""
    bpe = tiny_bpe()
    bpe.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, bpe.token_to_id(EOS))])
    bpe.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    Trainer(load_config(None, ["data=dummy", f"tokenizer={folder / 'tokenizer.json'}", "vocab_size=300", "n_seq=32",
                               "d_model=32", "n_heads=2", "n_layers=1", "ffn_dim=64", "batch_size=2", "max_steps=2",
                               "eval_every=2", "eval_batches=1", f"out_dir={folder / 'run'}", *extra])).fit()
    return str(folder / "run")


def chat_completions(run: str, monkeypatch, capsys) -> list[str]:
    """What `make chat CHECKPOINT=run ARGS="temperature=0 ..."` prints for PROMPTS piped on stdin."""
    from engine.chat import main as chat

    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(p + "\n" for p in PROMPTS)))
    capsys.readouterr()
    chat([run, "temperature=0", f"max_new_tokens={NEW_TOKENS}", "device=cpu"])
    return capsys.readouterr().out.split("\n")[:-1]  # one line per prompt; a completion may hold \v or \f


@pytest.mark.parametrize("embedding", [(), ("embedding=tt", "tt_rank=4")], ids=["dense", "tt"])
def test_exported_tokenizer_and_generate_give_the_text_chat_gives(tmp_path, monkeypatch, capsys, embedding):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.export import main as export  # what `make export CHECKPOINT=<run folder> OUT=...` runs

    run = train_run(tmp_path, *embedding)
    export([run, str(tmp_path / "hf")])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (EOS, EOS, EOS)
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id,
            model.generation_config.pad_token_id) == (eos_id, eos_id, eos_id)
    texts = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == tokenizer.encode(prompt, add_special_tokens=False)  # no BOS: as trained
        out = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " "))
    assert all(texts) and texts == chat_completions(run, monkeypatch, capsys)
