import subprocess
import sys

import pytest

from data.stream import DataError
from engine.checkpoint import CheckpointError
from engine.cli import run_cli
from engine.config import ConfigError
from engine.plot import PlotError
from engine.train import TrainingError
from phases import load_config

ROOT = __file__.rsplit("/tests/", 1)[0]


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("d_model: 64\nn_heads: 4\nlearning_rate: 3e-4\nuse_compile: false\n")
    cfg = load_config(str(path), ["n_layers=3", "learning_rate=1e-3", "use_compile=true", "max_steps=1e3"])
    assert (cfg.d_model, cfg.n_layers, cfg.max_steps) == (64, 3, 1000)
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)  # YAML reads 3e-4 as a string
    assert cfg.use_compile is True


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat'.*learning_rate"):
        load_config(None, ["learning_rat=1e-3"])


@pytest.mark.parametrize("text, where", [
    ("n_layers: 2\nd_model: 64\n  n_heads: 4\n", "line 3, column 10: mapping values are not allowed here"),
    ("n_layers: 2\nmodel_name: \"Qwen\n", "line 3, column 1: found unexpected end of stream "
     "(while scanning a quoted scalar at line 2, column 13)"),
    ("n_layers: 2\n\tn_heads: 4\n", "line 2, column 1: found character '\\t' that cannot start any token "
     "(while scanning for the next token)"),
])
def test_malformed_yaml_is_reported_at_its_line_and_column(tmp_path, text, where):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(str(tmp_path / "bad.yaml"))
    assert str(error.value) == f"{tmp_path / 'bad.yaml'} is not valid YAML at {where}"


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*d_modle.*d_model"):
        load_config(str(path))


@pytest.mark.parametrize("override, expected", [
    ("n_layers=two", "expects int"),
    ("n_layers=2.5", "expects int"),
    ("learning_rate=fast", "expects float"),
    ("use_compile=maybe", "expects bool"),
    ("n_layers", "expected key=value"),
    ("attention=magic", "must be one of"),
    ("rms_norm=apex", "rms_norm.*must be one of triton, torch"),
    ("micro_batch_size=3", "divisor of batch_size x gradient_accumulation_steps = 8"),
    ("micro_batch_size=big", "micro_batch_size must be auto or a divisor"),
    ("d_model=102", "divisible by n_heads"),
    ("batch_size=0", "must be > 0"),
])
def test_bad_values_are_named(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_every_shipped_config_loads():
    from pathlib import Path
    paths = sorted(Path(ROOT, "configs").rglob("*.yaml"))
    assert any(p.parent.name == "tiny_scaling" for p in paths)
    for path in paths:
        load_config(str(path))


@pytest.mark.parametrize("source, attention", [
    (["use_flash_attention=false"], "sdpa"),
    (["use_flash_attention=true"], "triton"),  # true leaves attention as it is
    (["use_flash_attention=true", "attention=eager"], "eager"),
    (["use_flash_attention=false", "attention=sdpa"], "sdpa"),
])
def test_the_seeds_use_flash_attention_is_an_alias_of_attention(source, attention):
    cfg = load_config(None, source)
    assert cfg.attention == attention and "use_flash_attention" not in cfg.to_dict()


def test_alias_and_key_that_disagree_are_an_error_and_a_later_source_wins(tmp_path):
    with pytest.raises(ConfigError, match="use_flash_attention=false means attention=sdpa, but attention=eager"):
        load_config(None, ["use_flash_attention=false", "attention=eager"])
    path = tmp_path / "c.yaml"
    path.write_text("use_flash_attention: false\n")
    assert load_config(str(path), ["attention=triton"]).attention == "triton"  # the override wins


def test_epochs_and_flops_budget_exclude_each_other():
    assert load_config(None, ["epochs=2.5"]).epochs == 2.5
    with pytest.raises(ConfigError, match="epochs and flops_budget both set max_steps"):
        load_config(None, ["epochs=1", "flops_budget=1e15"])


def test_a_base_gives_its_keys_then_the_file_and_the_overrides_win(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "root.yaml").write_text("d_model: 64\nn_heads: 4\nn_layers: 2\nmax_steps: 10\n")
    # a base's path is relative to the file that names it, and bases chain
    (tmp_path / "shared" / "mid.yaml").write_text("base: root.yaml\nn_layers: 3\nuse_flash_attention: false\n")
    (tmp_path / "run.yaml").write_text("base: shared/mid.yaml\nphase: phase8\nmax_steps: 20\nattention: eager\n")
    cfg = load_config(str(tmp_path / "run.yaml"), ["max_steps=30"])
    assert (cfg.phase, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.max_steps) == ("phase8", 64, 4, 3, 30)
    assert cfg.attention == "eager"  # the file's key beats the alias its base set
    assert "base" not in cfg.to_dict() and cfg.hybrid_every == 0  # the last file's phase chose the class


def test_a_bad_key_in_a_base_names_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("d_modle: 64\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"^\S*base.yaml: unknown config key 'd_modle'"):
        load_config(str(tmp_path / "run.yaml"))


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: missing.yaml\n"}, "{d}/a.yaml: base 'missing.yaml' not found (looked for {d}/missing.yaml)"),
    ({"a.yaml": "base:\n"}, "{d}/a.yaml: base must name another config file, got None"),
    ({"a.yaml": "base: a.yaml\n"}, "config bases form a cycle: {d}/a.yaml -> {d}/a.yaml"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: c.yaml\n", "c.yaml": "base: b.yaml\n"},
     "config bases form a cycle: {d}/b.yaml -> {d}/c.yaml -> {d}/b.yaml"),
])
def test_a_missing_base_or_a_cycle_is_a_one_line_error(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(str(tmp_path / "a.yaml"))
    assert str(error.value) == message.format(d=tmp_path)


def test_print_config_shows_a_based_config_resolved(capsys):
    from engine.train import main

    main([f"{ROOT}/configs/phase8_1.5b.yaml", "print_config=true"])
    printed = capsys.readouterr().out
    assert "base:" not in printed
    assert "d_model: 2048" in printed and "phase: phase8" in printed  # the base's key, the file's


def run_train(*args):
    return subprocess.run([sys.executable, "-m", "engine.train", *args], cwd=ROOT, capture_output=True, text=True)


def test_print_config_prints_resolved_values_and_exits():
    result = run_train("configs/phase7_test.yaml", "print_config=true", "n_layers=7")
    assert result.returncode == 0, result.stderr
    assert "n_layers: 7" in result.stdout and "d_model: 128" in result.stdout


def test_cli_error_is_one_line_without_traceback():
    result = run_train("configs/phase7_test.yaml", "n_layer=7")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'n_layer'. Did you mean: n_layers")



@pytest.mark.parametrize("error, line", [(error, "error: what to change") for error in
                                         (ConfigError, CheckpointError, DataError, PlotError, TrainingError)]
                         + [(RuntimeError, "error: RuntimeError: what to change (run with DEBUG=1 for the traceback)")])
def test_run_cli_reports_a_user_error_as_its_message_and_any_other_with_its_type(error, line, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("DEBUG", raising=False)

    def main(argv):
        raise error("what to change")

    with pytest.raises(SystemExit) as exit:
        run_cli(main, [])
    assert exit.value.code == 1 and capsys.readouterr().err == line + "\n"


def test_a_training_error_of_python_m_engine_train_is_one_line(tmp_path):
    """python -m runs engine/train.py as __main__, whose TrainingError is another class than engine.train's."""
    result = run_train("configs/phase7_test.yaml", "data=dummy", "flops_budget=10", f"out_dir={tmp_path}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert [line[:46] for line in lines] == ["error: flops_budget=10 is less than one step ("]
