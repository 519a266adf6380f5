"""The engine end to end on CPU with dummy data: logging, checkpoints, exact resume, bad input."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from engine.checkpoint import (CheckpointError, best_checkpoint_in, load_checkpoint, remove_older_steps,
                               save_checkpoint)
from engine.config import ConfigError
from engine.train import Trainer, TrainingError, lr_at
from phases import load_config
from tests.resume_check import assert_resume_is_exact

ROOT = __file__.rsplit("/tests/", 1)[0]
TINY = ["data=dummy", "vocab_size=64", "n_seq=16", "d_model=32", "n_heads=2", "n_layers=2", "ffn_dim=64",
        "batch_size=2", "gradient_accumulation_steps=2", "warmup_steps=2", "log_every=1", "eval_every=3",
        "eval_batches=2", "save_every=3", "learning_rate=1e-2"]


def train(tmp_path, *extra, run="run"):
    cfg = load_config(None, TINY + [f"out_dir={tmp_path / run}", *extra])
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


def losses(run_dir):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in json.loads((run_dir / "training_log.json").read_text())]


def test_run_writes_log_checkpoints_and_config(tmp_path, capsys):
    train(tmp_path, "max_steps=6")
    run = tmp_path / "run"
    names = sorted(p.name for p in run.iterdir())
    checkpoints = ["phase7_best.pt", "phase7_final.pt", "phase7_step_3.pt", "phase7_step_6.pt"]
    assert names == sorted(["config.yaml", "latest", "loss.png", "training_log.json", *checkpoints,
                            *(f"{name}.sha256" for name in checkpoints)])
    assert (run / "latest").read_text() == "phase7_final.pt\n"
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")  # redrawn at each evaluation
    log = json.loads((run / "training_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "grad_norm", "time", "tokens"} <= set(log[0])
    assert "val_loss" in log[2] and "val_loss" not in log[1]
    assert log[-1]["tokens"] == 6 * 2 * 2 * 16
    out = capsys.readouterr().out
    assert "Step      6 | Loss: " in out and " | PPL: " in out and " | LR: " in out and " | tok/s: " in out
    state = load_checkpoint(run / "phase7_step_3.pt")
    assert state["step"] == 3 and state["sequences_drawn"] == 12 and state["phase"] == "phase7"
    assert set(state) >= {"model", "optimizer", "rng", "config", "tokenizer", "tokens_seen"}


@pytest.mark.parametrize("phase", ["phase7", "mdm"])  # mdm also draws its noise from the saved RNG state
def test_resume_is_exact(tmp_path, phase):
    assert_resume_is_exact(lambda run, *extra: Trainer(load_config(None, TINY + [
        f"out_dir={tmp_path / run}", "max_steps=6", f"phase={phase}", *extra])), tmp_path, phase)


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = load_config(None, ["learning_rate=1e-3", "min_lr=1e-4", "warmup_steps=10", "max_steps=110"])
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_non_finite_loss_skips_updates_then_stops_without_touching_checkpoints(tmp_path):
    trainer = train(tmp_path, "max_steps=3")
    final = tmp_path / "run" / "phase7_final.pt"
    before = final.read_bytes()
    cfg = load_config(None, TINY + [f"out_dir={tmp_path / 'run'}", "max_steps=9", "max_bad_steps=3",
                                    f"resume={final}"])
    trainer = Trainer(cfg)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.phase = dataclasses.replace(trainer.phase,
                                        loss=lambda model, batch, cfg: model(batch[:, 1:]).sum() * float("nan"))
    with pytest.raises(TrainingError, match="NaN/Inf for 3 steps"):
        trainer.fit()
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert final.read_bytes() == before


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "config": {}})
    with pytest.raises(Exception):  # a lambda cannot be pickled: the write fails half-way
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "config": {}, "bad": lambda: None})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoint_errors(tmp_path):
    train(tmp_path, "max_steps=3")
    final = tmp_path / "run" / "phase7_final.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(final.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"another model shape: d_model=32 \(config: 64\)"):
        train(tmp_path, "max_steps=4", "d_model=64", f"resume={final}", run="other")
    with pytest.raises(CheckpointError, match="'phase7' checkpoint; this run is phase 'mdm'"):
        train(tmp_path, "max_steps=4", "phase=mdm", f"resume={final}", run="other")
    assert best_checkpoint_in(tmp_path / "run") == tmp_path / "run" / "phase7_best.pt"


def test_keep_last_removes_older_step_checkpoints_and_changes_no_loss(tmp_path):
    """keep_last=2 with a save every step: steps 4 and 5 stay, with best and final; the others go with their
    checksums. The losses are those of a run that keeps all. (Resume with keep_last: tests/test_distributed.py.)"""
    train(tmp_path, "max_steps=5", "save_every=1", run="all")
    train(tmp_path, "max_steps=5", "save_every=1", "keep_last=2")
    run = tmp_path / "run"
    assert losses(run) == losses(tmp_path / "all")
    checkpoints = ["phase7_best.pt", "phase7_final.pt", "phase7_step_4.pt", "phase7_step_5.pt"]
    assert sorted(p.name for p in run.iterdir() if ".pt" in p.name) == sorted(
        checkpoints + [f"{name}.sha256" for name in checkpoints])
    assert len(list((tmp_path / "all").glob("*_step_*.pt"))) == 5
    assert (run / "latest").read_text() == "phase7_final.pt\n"
    with pytest.raises(ConfigError, match="'keep_last' must be >= 0"):
        load_config(None, TINY + ["keep_last=-1"])


def test_keep_last_never_removes_best_final_latest_or_a_higher_step(tmp_path):
    """Of phase7's step checkpoints up to the new one, all but the last K go: .pt files and folders alike."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("phase7_step_1.pt", "phase7_step_2.pt", "phase7_step_9.pt", "phase7_best.pt", "phase7_final.pt",
                 "mdm_step_1.pt", "phase7_step_1.pt.sha256", "phase7_step_2.pt.sha256"):
        (run / name).write_bytes(b"x")
    for name in ("phase7_step_3", "phase7_step_4"):  # checkpoint folders, with their checksums inside
        for file in (".metadata", "train_state.json", "checksums.sha256"):
            (run / name).mkdir(exist_ok=True)
            (run / name / file).write_text("{}")
    (run / "latest").write_text("phase7_step_1.pt\n")  # e.g. the one this run resumed from
    assert remove_older_steps(run, run / "phase7_step_4", keep_last=1) == ["phase7_step_2.pt", "phase7_step_3"]
    assert sorted(p.name for p in run.iterdir()) == [
        "latest", "mdm_step_1.pt", "phase7_best.pt", "phase7_final.pt", "phase7_step_1.pt",
        "phase7_step_1.pt.sha256", "phase7_step_4", "phase7_step_9.pt"]


def test_fast_dev_run_saves_nothing(tmp_path):
    train(tmp_path, "fast_dev_run=2", "max_steps=100")
    assert not (tmp_path / "run").exists()


def make(*args):
    return subprocess.run(["make", "--no-print-directory", f"PYTHON={sys.executable}", *args], cwd=ROOT,
                          capture_output=True, text=True)


def test_make_resume_without_checkpoint_is_a_clear_error():
    result = make("train-phase7-1.5b-resume")
    assert result.returncode != 0 and "CHECKPOINT=<path> is required" in result.stderr


def test_missing_data_says_make_data_lite(tmp_path):
    # Run from an empty folder, where the config's data/lite does not exist.
    result = subprocess.run([sys.executable, "-m", "engine.train", f"{ROOT}/configs/phase7_test.yaml"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode != 0
    assert "make data-lite" in result.stderr and "Traceback" not in result.stderr


def test_a_skipped_step_does_not_draw_the_same_batches_again(tmp_path):
    trainer = Trainer(load_config(None, TINY + [f"out_dir={tmp_path / 'run'}", "max_steps=2", "max_bad_steps=2"]))
    seen = []
    real_loss = trainer.phase.loss

    def nan_on_first_batch(model, batch, cfg):
        seen.append(batch.clone())
        loss = real_loss(model, batch, cfg)
        return loss * float("nan") if len(seen) <= 2 else loss  # the first step's two micro-batches

    trainer.phase = dataclasses.replace(trainer.phase, loss=nan_on_first_batch)
    trainer.fit()
    assert trainer.step == 2 and len(seen) == 6
    assert not any(torch.equal(seen[0], later) for later in seen[2:])
    assert load_checkpoint(tmp_path / "run" / "phase7_final.pt")["sequences_drawn"] == 12


def test_fused_cross_entropy_is_the_plain_loss_and_gradient():
    from phases.phase7 import build_model, next_token_loss

    batch = torch.randint(0, 64, (3, 17))
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        cfg = load_config(None, TINY + [f"fused_cross_entropy={fused}"])
        model = build_model(cfg)
        loss = next_token_loss(model, batch, cfg)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=0)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_triton_kernels_fall_back_to_pytorch_where_they_cannot_run(monkeypatch):
    from phases.phase7.config import attention_backend, norm_backend

    cfg = load_config(None, TINY)
    assert (cfg.attention, cfg.rms_norm) == ("triton", "triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (attention_backend(cfg), norm_backend(cfg)) == ("triton", "triton")
    assert attention_backend(load_config(None, TINY + ["d_model=48"])) == "sdpa"  # head size 24
    assert attention_backend(load_config(None, TINY + ["use_flash_attention=false"])) == "sdpa"
    assert norm_backend(load_config(None, TINY + ["rms_norm=torch"])) == "torch"
    assert norm_backend(load_config(None, TINY + ["d_model=32768", "n_heads=256"])) == "torch"  # row too wide
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (attention_backend(cfg), norm_backend(cfg)) == ("sdpa", "torch")


def test_flash_attn_backend_without_the_package_is_a_clear_error():
    import importlib.util

    from engine.config import ConfigError
    from phases.phase7 import build_model

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="pip install flash-attn"):
        build_model(load_config(None, TINY + ["attention=flash_attn"]))


def test_wandb_logger_runs_offline_without_a_login(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no stored key from this machine
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train(tmp_path, "max_steps=3", "logger=wandb", "experiment=tiny", "tags=a,b")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and losses(tmp_path / "run")[-1][0] == 3


# --- micro_batch_size ----------------------------------------------------------------------------------------

def test_micro_batch_size_resplits_each_step_over_the_same_sequences(tmp_path):
    """2 x 2 (the config), 4 x 1 and 1 x 4 draw the same windows per step, so the runs match to rounding."""
    runs = {}
    for split in ("", "4", "1"):
        trainer = train(tmp_path, "max_steps=4", f"micro_batch_size={split}", run=f"split{split}")
        runs[split] = losses(tmp_path / f"split{split}")
        assert trainer.sequences_drawn == 4 * 4 and trainer.micro_batch_size == (int(split) if split else 2)
    for split in ("4", "1"):
        for (step, loss, val), (_, ref_loss, ref_val) in zip(runs[split], runs[""]):
            assert loss == pytest.approx(ref_loss, rel=1e-4), f"micro_batch_size={split}, step {step}"
            assert val == (None if ref_val is None else pytest.approx(ref_val, rel=1e-4))  # same val windows


def test_a_resplit_after_12_sequences_draws_every_window_exactly_once(tmp_path):
    """12 sequences drawn, then micro-batches of 8: windows 12, 13, ... follow, not 8-11 again."""
    trainer = Trainer(load_config(None, TINY + [f"out_dir={tmp_path}", "batch_size=8",
                                                "gradient_accumulation_steps=1"]))
    drawn = []
    real_batch = trainer.train_data.batch
    trainer.train_data.batch = lambda first, count: (drawn.extend(range(first, first + count)),
                                                      real_batch(first, count))[1]
    trainer.sequences_drawn = 12
    trainer.forward_backward()
    trainer.forward_backward()
    assert drawn == list(range(12, 28))


def test_epochs_set_max_steps_from_the_training_tokens(tmp_path, capsys):
    trainer = Trainer(load_config(None, TINY + [f"out_dir={tmp_path}", "epochs=0.001"]))
    tokens = trainer.train_data.num_tokens
    assert trainer.cfg.max_steps == math.ceil(0.001 * tokens / (2 * 2 * 16)) > 1
    trainer.fit()
    assert f"epochs 0.001 x {tokens:,} train tokens -> {trainer.cfg.max_steps} steps" in capsys.readouterr().out


def test_a_missing_checkpoint_names_what_its_folder_holds(tmp_path):
    train(tmp_path, "max_steps=3")
    with pytest.raises(CheckpointError, match=r"step_3.pt not found; .*holds: phase7_best.pt, phase7_final.pt, "
                                              r"phase7_step_3.pt"):
        load_checkpoint(tmp_path / "run" / "step_3.pt")


def test_resume_with_another_split_continues_the_same_data(tmp_path):
    train(tmp_path, "max_steps=3", run="first")
    checkpoint = tmp_path / "first" / "phase7_step_3.pt"
    trainer = Trainer(load_config(None, TINY + [f"out_dir={tmp_path / 'next'}", "micro_batch_size=1",
                                                f"resume={checkpoint}"]))
    assert trainer.sequences_drawn == 3 * 4 and trainer.accumulation_steps == 4
    old_style = load_checkpoint(checkpoint)  # before micro_batch_size: micro-batches of batch_size
    old_style["data_position"] = old_style.pop("sequences_drawn") // 2
    save_checkpoint(tmp_path / "old.pt", old_style)
    resumed = Trainer(load_config(None, TINY + [f"out_dir={tmp_path / 'old'}", f"resume={tmp_path / 'old.pt'}"]))
    assert resumed.sequences_drawn == 3 * 4


@pytest.mark.parametrize("memory_mode", [False, True])
def test_auto_micro_batch_takes_the_largest_that_fits_and_leaves_no_trace(tmp_path, memory_mode):
    from engine.train import to_cpu

    trainer = Trainer(load_config(None, TINY + [f"out_dir={tmp_path}", "batch_size=4", f"memory_mode={memory_mode}"]))
    real_loss, tried = trainer.phase.loss, []

    def out_of_memory_above_2(model, batch, cfg):
        tried.append(batch.shape[0])
        if batch.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_loss(model, batch, cfg)

    trainer.phase = dataclasses.replace(trainer.phase, loss=out_of_memory_above_2)
    weights, optimizer = to_cpu(trainer.model.state_dict()), to_cpu(trainer.optimizer.state_dict())
    rng = torch.get_rng_state()
    assert trainer.largest_micro_batch_that_fits(8) == 2 and tried == [8, 4, 2]
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    if memory_mode:  # its updates run inside backward: the successful try did change weights and states
        after = trainer.optimizer.state_dict()["params"]
        assert all(torch.equal(optimizer["params"][n][k], v) for n in after for k, v in after[n].items())
    assert torch.equal(torch.get_rng_state(), rng) and trainer.sequences_drawn == 0
    assert all(p.grad is None for p in trainer.model.parameters())


def test_auto_micro_batch_without_a_gpu_keeps_the_configured_split(tmp_path, capsys):
    trainer = Trainer(load_config(None, TINY + [f"out_dir={tmp_path}", "micro_batch_size=auto", "device=cpu"]))
    assert (trainer.micro_batch_size, trainer.accumulation_steps) == (2, 2)
    assert "micro_batch_size=auto: no GPU" in capsys.readouterr().out


@pytest.mark.parametrize("extra, says", [
    (["batch_size=3"], "96 tokens/step (micro-batch 3 x 2 accumulation steps x 16 tokens)"),
    (["gradient_accumulation_steps=1"], "32 tokens/step (micro-batch 2 x 1 accumulation step x 16 tokens)")],
    ids=["accumulating", "one micro-batch"])
def test_the_run_header_says_which_factor_is_the_micro_batch_and_which_the_accumulation(tmp_path, capsys, extra,
                                                                                         says):
    Trainer(load_config(None, TINY + [f"out_dir={tmp_path}", *extra])).print_header()
    assert says in capsys.readouterr().out
