"""Chat over stdin (the scripted mode) on a checkpoint trained here with a tokenizer built here."""

import subprocess
import sys

import pytest

from engine.checkpoint import resolve_checkpoint
from engine.checkpoint import CheckpointError
from engine.train import Trainer
from phases import load_config
from tests.tiny_tokenizer import tiny_bpe

ROOT = __file__.rsplit("/tests/", 1)[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    tiny_bpe().save(str(tmp / "tokenizer.json"))
    cfg = load_config(None, ["data=dummy", f"tokenizer={tmp / 'tokenizer.json'}", "vocab_size=300", "n_seq=32",
                             "d_model=32", "n_heads=2", "n_layers=1", "ffn_dim=64", "batch_size=2",
                             "max_steps=2", "eval_every=2", "eval_batches=1", f"out_dir={tmp / 'run'}"])
    Trainer(cfg).fit()
    return tmp / "run"


def chat(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "engine.chat", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True)


def test_stdin_gives_one_completion_per_prompt(run_dir):
    result = chat(str(run_dir), "max_new_tokens=8", "seed=0", stdin="to be\n\nthat is\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2  # the empty line is not a prompt


def test_sampling_settings_from_arguments_are_checked(run_dir):
    greedy = [chat(str(run_dir), "temperature=0", "max_new_tokens=6", stdin="to be\n").stdout for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0].strip()
    result = chat(str(run_dir), "temprature=0", stdin="to be\n")
    assert result.returncode != 0 and "unknown setting 'temprature'" in result.stderr


def test_run_folder_resolves_to_best_checkpoint(run_dir, tmp_path):
    assert resolve_checkpoint(str(run_dir)).name == "phase7_best.pt"
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        resolve_checkpoint(str(tmp_path))
    result = chat(str(tmp_path / "missing.pt"), stdin="hi\n")
    assert result.returncode != 0 and "not found" in result.stderr and "Traceback" not in result.stderr
