"""Sweeps and scaling runs end to end on CPU with dummy data and tiny models, and their bad input."""

import csv
import math
import subprocess
import sys

import pytest

from engine import scaling
from engine.config import ConfigError
from engine.sweep import sweep

ROOT = __file__.rsplit("/tests/", 1)[0]
TINY = {"data": "dummy", "vocab_size": 64, "n_seq": 16, "d_model": 32, "n_heads": 2, "ffn_dim": 64,
        "batch_size": 2, "warmup_steps": 1, "eval_batches": 1, "log_every": 1}


def tiny_config(path, phase="mdm", n_layers=1):
    path.write_text("".join(f"{k}: {v}\n" for k, v in {**TINY, "phase": phase, "n_layers": n_layers}.items()))
    return str(path)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_point_sweep_writes_a_two_row_summary_and_reuses_finished_points(tmp_path):
    config = tiny_config(tmp_path / "tiny.yaml")
    rows = sweep(config, ["learning_rate=1e-3,2e-3", "max_steps=2"], str(tmp_path / "out"))
    assert [r["point"] for r in rows] == ["learning_rate-1e-3", "learning_rate-2e-3"]
    table = read_csv(tmp_path / "out" / "summary.csv")
    assert [(r["learning_rate"], r["steps"], r["status"]) for r in table] == [("1e-3", "2", "ok"), ("2e-3", "2", "ok")]
    assert all(math.isfinite(float(r["val_loss"])) for r in table)
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert markdown.count("| learning_rate-") == 2 and "Best: **" in markdown
    final = tmp_path / "out" / "learning_rate-1e-3" / "mdm_final.pt"
    written = final.stat().st_mtime_ns
    again = sweep(config, ["learning_rate=1e-3", "max_steps=2"], str(tmp_path / "out"))
    assert again[0]["val_loss"] == rows[0]["val_loss"]
    assert final.stat().st_mtime_ns == written  # read back, not trained again


@pytest.mark.parametrize("grid,message", [
    (["learning_rat=1e-3,2e-3"], r"unknown config key 'learning_rat'.*learning_rate"),
    (["learning_rate=1e-3,fast"], r"'learning_rate' expects float, got 'fast'"),
    (["batch_size=8,"], r"'batch_size' expects int, got ''"),
    (["batch_size"], r"expected key=value\[,value...\], got 'batch_size'"),
])
def test_bad_grid_is_a_one_line_error_naming_it(tmp_path, grid, message):
    with pytest.raises(ConfigError, match=message):
        sweep(tiny_config(tmp_path / "tiny.yaml"), grid, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # checked before anything runs


def test_sweep_cli_reports_a_bad_key_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "engine.sweep", tiny_config(tmp_path / "tiny.yaml"), "lr=1,2"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "error: unknown config key 'lr'" in result.stderr
    assert "Traceback" not in result.stderr


def test_tiny_scaling_runs_fit_plot_and_compare(tmp_path):
    out = tmp_path / "scaling"
    sizes = f"{tiny_config(tmp_path / 'one.yaml')},{tiny_config(tmp_path / 'two.yaml', n_layers=2)}"
    for phase in ("mdm", "phase7"):  # a size names a config; --phase decides the objective
        scaling.main(["--phase", phase, "--sizes", sizes, "--budgets", "1e7,2e7,1e3", "--out", str(out)])
        rows = read_csv(out / f"{phase}_results.csv")
        assert len(rows) == 6 and sum(r["status"] == "ok" for r in rows) == 4
        assert all("less than one step" in r["status"] for r in rows if r["budget"] == "1000.0")
        assert (out / f"{phase}_scaling.png").stat().st_size > 0
        report = (out / f"{phase}_scaling.md").read_text()
        assert "Compute-optimal frontier" in report and "Fit on the frontier: log L =" in report
        assert (out / "mdm_vs_phase7.md").exists() == (phase == "phase7")  # compared once both have results
    steps = {r["run"]: int(r["steps"]) for r in read_csv(out / "phase7_results.csv") if r["status"] == "ok"}
    assert steps["phase7_one_1e7"] * 2 == steps["phase7_one_2e7"] and steps["phase7_two_1e7"] < steps["phase7_one_1e7"]
    (out / "mdm_vs_phase7.md").unlink()
    scaling.main(["--compare", "--out", str(out)])
    assert (out / "mdm_vs_phase7.png").stat().st_size > 0 and "Compute gap:" in (out / "mdm_vs_phase7.md").read_text()


def test_gap_is_the_compute_factor_between_the_laws():
    laws = [{"budget": c, "val_loss": 5 * c ** -0.1} for c in (1e15, 1e16, 1e17)]
    a, b = scaling.fit_power_law(laws)
    assert (math.exp(a), b) == (pytest.approx(5), pytest.approx(-0.1))
    causal = [{"budget": c, "val_loss": 5 * (16 * c) ** -0.1} for c in (1e15, 1e16)]  # 16x as efficient
    gaps = scaling.compute_gap((a, b), causal, [1e15, 1e17])
    assert [g["gap"] for g in gaps] == [pytest.approx(16), pytest.approx(16)]
    assert [g["extrapolated"] for g in gaps] == ["no", "yes"]  # 1.6e17 lies past the MDM's largest run


def test_compare_without_results_says_what_to_run(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"finished runs of phase7 and of another phase .*\(found: none\).*make scaling PHASE="):
        scaling.main(["--compare", "--out", str(tmp_path)])


def test_a_phase_key_can_be_an_axis(tmp_path):
    rows = sweep(tiny_config(tmp_path / "tiny.yaml"), ["d_model=16,32", "max_steps=1", "fast_dev_run=1"],
                 str(tmp_path / "out"))
    assert [r["point"] for r in rows] == ["d_model-16", "d_model-32"]
