"""The phase seam: a phase outside engine/ trains through `make train` with its own config key, and every
shipped phase's model is what the engine relies on (phases.LanguageModel)."""

import json
import subprocess
import sys

import pytest

from engine.config import ConfigError
from phases import LanguageModel, get_phase, load_config, phase_names

ROOT = __file__.rsplit("/tests/", 1)[0]


def make_train(config, *args):
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={sys.executable}", "train", f"CONFIG={config}",
                           f"ARGS={' '.join(args)}"], cwd=ROOT, capture_output=True, text=True)


def test_a_phase_outside_phases_trains_through_make_train_with_its_own_key(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text("phase: tests.toy_phase\ndata: dummy\nvocab_size: 32\nn_seq: 8\ntoy_width: 24\n"
                      "batch_size: 4\nmax_steps: 6\nwarmup_steps: 1\nlog_every: 2\neval_every: 3\neval_batches: 1\n"
                      "save_every: 3\nlearning_rate: 0.01\n")
    result = make_train(config, f"out_dir={tmp_path / 'run'}", "toy_layers=3")
    assert result.returncode == 0, result.stderr
    assert "phase toy" in result.stdout and "toy bigram, width 24" in result.stdout
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == ["toy_best.pt", "toy_final.pt",
                                                                       "toy_step_3.pt", "toy_step_6.pt"]
    assert [r["step"] for r in json.loads((tmp_path / "run" / "training_log.json").read_text())] == [2, 3, 4, 6]
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "toy_width: 24" in saved and "toy_layers: 3" in saved

    wrong = make_train(config, f"out_dir={tmp_path / 'other'}", "toy_width=0")
    assert wrong.returncode != 0 and wrong.stderr.splitlines()[0] == "error: toy_width must be > 0, got 0"
    resumed = make_train(config, f"out_dir={tmp_path / 'other'}", "toy_width=8",
                         f"resume={tmp_path / 'run' / 'toy_step_3.pt'}")
    assert resumed.returncode != 0 and "another model shape: toy_width=24 (config: 8)" in resumed.stderr


# What a phase needs beyond the defaults to build offline: phase hf's default model is on the hub.
OFFLINE = {"hf": [f"model_name={ROOT}/configs/hf_tiny_qwen3", "init=scratch"]}


@pytest.mark.parametrize("name", phase_names())
def test_every_phase_model_is_a_language_model(name):
    phase = get_phase(name)
    cfg = load_config(None, [f"phase={name}", "vocab_size=64", "n_seq=16", *OFFLINE.get(name, [])])
    assert type(cfg) is phase.config
    model = phase.build_model(cfg)
    assert isinstance(model, LanguageModel)
    assert model.flops_per_token(16) > 6 * model.num_params() > 0


def test_a_key_of_another_phase_names_its_phase():
    with pytest.raises(ConfigError, match="'mdm_eps' belongs to phase mdm"):
        load_config(None, ["phase=phase7", "mdm_eps=0.01"])
    assert load_config(None, ["phase=mdm", "mdm_eps=0.01"]).mdm_eps == 0.01


def test_unknown_phase_lists_the_phases():
    with pytest.raises(ConfigError, match=r"unknown phase 'phase9'.*mdm, phase7"):
        load_config(None, ["phase=phase9"])
