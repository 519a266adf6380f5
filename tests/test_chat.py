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


def test_a_default_run_folder_not_trained_here_names_the_runs_of_its_phase(tmp_path):
    """make chat-phase8 without CHECKPOINT reads checkpoints/phase8_1.5b, which a CPU machine never trains."""
    from engine.chat import checkpoint_to_chat

    for run, checkpoint in [("phase8_test", "phase8_best.pt"), ("phase8_small", "phase8_step_10.pt"),
                            ("phase7_test", "phase7_best.pt"), ("phase7_1.5b_triton", None)]:
        (tmp_path / run).mkdir()
        if checkpoint:
            (tmp_path / run / checkpoint).write_bytes(b"")
    with pytest.raises(CheckpointError) as missing:
        checkpoint_to_chat(str(tmp_path / "phase8_1.5b"))
    assert (f"the phase8 runs in {tmp_path}/ are: {tmp_path}/phase8_small, {tmp_path}/phase8_test ("
            in str(missing.value))
    with pytest.raises(CheckpointError) as empty:
        checkpoint_to_chat(str(tmp_path / "phase7_1.5b_triton"))  # made, not trained yet
    assert f"phase7 runs in {tmp_path}/ are: {tmp_path}/phase7_test (" in str(empty.value)
    assert checkpoint_to_chat(str(tmp_path / "phase8_test")) == tmp_path / "phase8_test" / "phase8_best.pt"
    assert checkpoint_to_chat(str(tmp_path / "mdm_1B")) == tmp_path / "mdm_1B"  # no mdm run: loading says not found
