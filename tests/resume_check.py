"""The exact-resume check every phase's tests share: a run stopped after step 3 and resumed from its step-3
checkpoint logs and ends exactly as one that never stopped."""

import json

import pytest
import torch

from engine.checkpoint import load_checkpoint


def logged(run_dir) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in json.loads((run_dir / "training_log.json").read_text())]


def assert_resume_is_exact(trainer_for, tmp_path, phase: str) -> tuple[dict, dict]:
    """trainer_for(run name, *overrides) -> a Trainer of 6 steps saving every 3 into tmp_path / run name.
    Returns the two final checkpoints (straight, resumed) for checks of the caller's own."""
    trainer_for("straight").fit()
    interrupted = trainer_for("resumed")
    real_step = interrupted.forward_backward

    def crash_after_step_3():
        if interrupted.step == 3:
            raise KeyboardInterrupt
        return real_step()

    interrupted.forward_backward = crash_after_step_3
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    trainer_for("resumed", f"resume={tmp_path / 'resumed' / f'{phase}_step_3.pt'}").fit()
    assert logged(tmp_path / "straight") == logged(tmp_path / "resumed")
    a, b = (load_checkpoint(tmp_path / run / f"{phase}_final.pt") for run in ("straight", "resumed"))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    return a, b
