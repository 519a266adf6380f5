"""The benchmarks' CPU-checkable parts: their lever ladder is valid configs, and without a GPU they refuse."""

import argparse
import subprocess
import sys

import pytest
import torch

from bench import phase7
from phases import load_config

ROOT = __file__.rsplit("/tests/", 1)[0]


def test_each_lever_row_changes_only_its_own_switches():
    args = argparse.Namespace(batch_size=8, mem_gb=None, overrides=[])
    switches, previous = [], None
    for name, lever in phase7.LEVERS:
        switches += lever
        cfg = load_config(phase7.CONFIG, phase7.bench_overrides(args) + switches).to_dict()
        if previous is not None:
            changed = {key for key in cfg if cfg[key] != previous[key]}
            assert changed == {s.split("=")[0] for s in lever}, f"{name}: changes {changed}"
        previous = cfg
    assert (cfg["attention"], cfg["rms_norm"], cfg["use_compile"], cfg["fused_cross_entropy"],
            cfg["fused_projections"]) == ("triton", "triton", True, True, True)  # the recipe's speed settings


def test_table_shows_the_gain_over_the_row_above():
    rows = [{"name": "a", "n_layers": 24, "tok_per_s": 1000.0, "mfu": 0.3, "peak_gib": 3.0},
            {"name": "b", "n_layers": 24, "tok_per_s": 1250.0, "mfu": None, "peak_gib": 3.5, "gain": 1.25}]
    lines = phase7.table(rows).splitlines()
    assert lines[0].endswith("gain |") and lines[2].endswith("| - |") and lines[3].endswith("| 1.250x |")
    assert "gain" not in phase7.table(rows[:1])


def test_table_puts_memory_modes_estimated_peak_beside_the_measured_one():
    rows = [{"name": "a", "n_layers": 24, "tok_per_s": 1000.0, "mfu": 0.3, "peak_gib": 3.0},
            {"name": "b", "n_layers": 24, "tok_per_s": 900.0, "mfu": 0.2, "peak_gib": 6.1, "estimate_gib": 6.05}]
    lines = phase7.table(rows).splitlines()
    assert lines[0].endswith("| peak GiB | estimated GiB |") and lines[1].count("|") == 7
    assert lines[2].endswith("| 3.00 | - |") and lines[3].endswith("| 6.10 | 6.05 |")
    assert "estimated" not in phase7.table(rows[:1])


def test_kernel_bench_counts_the_bytes_of_the_dtypes_it_moves():
    """bf16 throughout: 2 passes forward, 5 with backward; an fp32 weight makes y and dy fp32."""
    from bench.bench_kernels import rms_norm_bytes

    bf16, fp32 = torch.bfloat16, torch.float32
    assert [rms_norm_bytes(8, 4, bf16, bf16, mode) for mode in ("fwd", "fwd+bwd")] == [2 * 64, 5 * 64]
    assert [rms_norm_bytes(8, 4, bf16, fp32, mode) for mode in ("fwd", "fwd+bwd")] == [32 * 6, 32 * 14]


def test_kernel_bench_compares_ours_with_peers_only_and_lists_our_variants_first():
    from bench.bench_kernels import DETERMINISTIC, row, table

    fwd = row("attn", "fwd", {"ours": 2.0, "SDPA FA2": 4.0}, 1.0, lambda ms: 100 / ms, "TFLOP/s")
    both = row("attn", "fwd+bwd", {"ours": 2.0, DETERMINISTIC: 1.0, "SDPA FA2": 4.0}, 1.0, lambda ms: 100 / ms,
               "TFLOP/s")
    assert both["vs_best_peer"] == "2.00x" and both["of_floor"] == "50%"
    header, _, fwd_line, _ = table([fwd, both]).splitlines()
    assert header.startswith(f"| case | mode | unit | ours | {DETERMINISTIC} | SDPA FA2 |")
    assert fwd_line.startswith("| attn | fwd | TFLOP/s | 50 |  | 25 |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize("module", ["bench.phase7", "bench.bench_kernels", "bench.hf"])
def test_gpu_benchmarks_without_cuda_are_a_one_line_error(module):
    result = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1


def test_adam8bit_reports_each_optimizer_against_the_fp32_reference(capsys):
    from bench import adam8bit

    adam8bit.main(["--steps", "3", "--no-record", "data=dummy", "vocab_size=64", "n_seq=16", "d_model=32",
                   "n_heads=2", "n_layers=1", "ffn_dim=64", "batch_size=2", "log_every=1", "eval_batches=1",
                   "warmup_steps=1"])
    rows = {cells[0]: cells[1:] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert set(adam8bit.RUNS) <= set(rows)  # a missing peer gets a row that says so
    reference = rows["fp32 AdamW (reference)"]
    assert reference[1] == reference[3] == "+0.00%"
    for name, cells in rows.items():
        if name in adam8bit.RUNS and "not installed" not in cells[0]:
            for loss, relative, ref in ((cells[0], cells[1], reference[0]), (cells[2], cells[3], reference[2])):
                assert float(relative.rstrip("%")) == pytest.approx(100 * (float(loss) / float(ref) - 1), abs=0.02)
    ours = rows["ours (memory mode)"]
    assert ours[0] != reference[0]  # 8-bit states and bf16 weights: not the same run


def test_gpu_check_script_parses_and_refuses_an_unknown_step(tmp_path):
    import os

    script = f"{ROOT}/scripts/gpu_check.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    result = subprocess.run([script, "bogus"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 2 and "unknown step 'bogus'" in result.stderr
