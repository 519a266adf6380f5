"""Training-curve PNGs from fake training logs: what is drawn follows the data, and bad folders are one-line errors."""

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from engine import plot
from engine.plot import PlotError

ROOT = __file__.rsplit("/tests/", 1)[0]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUPS = ["loss", "lr", "grad_norm", "throughput"]


def fake_log(n=40, decay=10.0, flops=False):
    """Records as engine.train writes them: val_loss every 10th record, flops only with a budget."""
    log = []
    for i in range(1, n + 1):
        record = {"step": 5 * i, "loss": 1.5 + 3 * math.exp(-i / decay) + 0.05 * math.sin(i),
                  "lr": 1e-3 * min(1, i / 4), "grad_norm": 1 + 2 * math.exp(-i / 5), "time": 0.1,
                  "tokens": 5 * i * 1024, "tok_per_s": 10_000 + i}
        if flops:
            record["flops"] = 6 * 1e6 * record["tokens"]
        if i % 10 == 0:
            record["val_loss"] = record["loss"] + 0.1
        log.append(record)
    return log


def write_run(folder, log):
    folder.mkdir(parents=True)
    (folder / "training_log.json").write_text(json.dumps(log))
    return folder


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_one_png_per_group_with_a_subplot_per_x_axis_and_flops_only_when_every_run_has_them(tmp_path):
    plain = write_run(tmp_path / "plain", fake_log())
    budget = write_run(tmp_path / "budget", fake_log(flops=True))
    written = plot.plot([str(plain), str(budget)], str(tmp_path / "both.png"))
    assert written == [tmp_path / f"both_{group}.png" for group in GROUPS]
    two_axes = png_size(written[0])
    runs = plot.find_runs(budget)
    assert plot.x_axes(runs) == ["step", "tokens", "flops"]
    width, height = png_size(plot.draw(runs, "loss", plot.x_axes(runs), tmp_path / "budget.png"))
    assert height == two_axes[1] and width > two_axes[0] * 1.4  # a third subplot: loss against FLOPs


def test_the_loss_plot_changes_with_the_data_and_only_with_it(tmp_path):
    def loss_png(name, log):  # the same run name everywhere, so the legend is the same
        return plot.save_loss_plot(write_run(tmp_path / name / "run", log), log).read_bytes()

    first = loss_png("a", fake_log())
    assert first[:8] == PNG_SIGNATURE
    assert loss_png("b", fake_log()) == first
    assert loss_png("c", fake_log(decay=3.0)) != first


def test_a_sweep_folder_expands_to_its_runs_by_subfolder_name(tmp_path):
    sweep = tmp_path / "sweep"
    for name, decay in (("learning_rate-2e-3", 5.0), ("learning_rate-1e-3", 10.0)):
        write_run(sweep / name, fake_log(decay=decay))
    (sweep / "not_trained_yet").mkdir()
    (sweep / "summary.md").write_text("# Sweep\n")
    assert [label for label, _ in plot.find_runs(sweep)] == ["learning_rate-1e-3", "learning_rate-2e-3"]


def test_out_is_a_file_stem_or_a_folder_and_defaults_to_the_first_run(tmp_path):
    assert plot.out_stem(None, "checkpoints/x") == Path("checkpoints/x/plot")
    assert plot.out_stem("figs/lr.png", "checkpoints/x") == Path("figs/lr")
    assert plot.out_stem("figs/lr", "checkpoints/x") == Path("figs/lr")
    assert plot.out_stem("figs/", "checkpoints/x") == Path("figs/plot")
    assert plot.out_stem(str(tmp_path), "checkpoints/x") == tmp_path / "plot"  # an existing folder


def test_old_logs_without_throughput_skip_that_group(tmp_path):
    log = [{k: v for k, v in r.items() if k != "tok_per_s"} for r in fake_log()]
    assert [p.name for p in plot.plot([str(write_run(tmp_path / "old", log))])] == [
        "plot_loss.png", "plot_lr.png", "plot_grad_norm.png"]


def test_a_folder_without_a_log_is_a_one_line_error_that_says_to_train_first(tmp_path):
    result = subprocess.run([sys.executable, "-m", "engine.plot", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no training_log.json in ")
    assert str(tmp_path) in result.stderr and "train first" in result.stderr


@pytest.mark.parametrize("text,message", [
    ("", r"training_log.json is damaged \(Expecting value"),
    ('[{"step": 1, "loss": 4.0}', r"training_log.json is damaged"),
    ("[]", r"training_log.json holds no records"),
    ('[{"step": 1}]', r"training_log.json is damaged: every record needs a step and a loss"),
])
def test_a_damaged_or_empty_log_names_the_file(tmp_path, text, message):
    (tmp_path / "training_log.json").write_text(text)
    with pytest.raises(PlotError, match=message):
        plot.plot([str(tmp_path)])


def test_save_loss_plot_writes_loss_png_or_returns_none_without_matplotlib(tmp_path, monkeypatch):
    assert plot.save_loss_plot(tmp_path, fake_log()) == tmp_path / "loss.png"
    assert png_size(tmp_path / "loss.png")[0] > 0
    (tmp_path / "loss.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert plot.save_loss_plot(tmp_path, fake_log()) is None
    assert not (tmp_path / "loss.png").exists()


def test_smoothing_follows_the_length_of_the_curve():
    from engine.plot import ema, ema_decay

    assert ema_decay(10) == 0.0 and ema(list(range(10)), ema_decay(10)) == list(range(10))  # short: raw
    assert 13 < ema(list(range(15)), ema_decay(15))[-1] < 14  # a 15-point curve lags under a point
    assert ema_decay(500) == pytest.approx(0.98) and ema_decay(10**6) == pytest.approx(0.99)
    falling = [10 - i / 100 for i in range(500)]
    assert abs(ema(falling, ema_decay(500))[-1] - falling[-1]) < 0.6  # lags ~50 points of a 500-point curve
