"""A checkpoint from a stranger cannot run code: the two payloads of issue 20, tried on every entry point that
loads a checkpoint (consolidate, chat, export, resume on 1 process and on 2 ranks). Each leaves a marker file
if its code runs; each entry point must refuse with one line and leave no marker."""

import json
import shutil
import sys

import pytest

from engine import checkpoint as ckpt
from engine.chat import main as chat
from engine.consolidate import main as consolidate
from engine.export import main as export
from engine.train import Trainer
from phases import load_config
from tests.test_distributed import TINY, torchrun
from tests.test_faults import one_line_error


def dcp_index_payload(command: str) -> bytes:
    """A .metadata pickle (protocol 4, which resolves dotted names) that calls os.system(command) through
    torch.distributed.checkpoint.filesystem's `os`: GLOBAL filesystem / os.system, then REDUCE."""
    return (b"\x80\x04ctorch.distributed.checkpoint.filesystem\nos.system\n(V" + command.encode() + b"\ntR.")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 2-step single-process run (its train state is what a folder's train_state.json holds)."""
    run = tmp_path_factory.mktemp("security") / "run"
    Trainer(load_config(None, [*TINY, "max_steps=2", f"out_dir={run}"])).fit()
    return run


@pytest.fixture
def dcp_payload_folder(run, tmp_path):
    """A checkpoint folder, complete to the eye, whose index runs `touch marker` when unpickled by pickle."""
    marker = tmp_path / "marker"
    folder = tmp_path / "evilrun" / "phase7_step_2"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(dcp_index_payload(f"touch {marker}"))
    state = ckpt.load_checkpoint(run / "phase7_final.pt")
    (folder / ckpt.TRAIN_STATE).write_text(json.dumps({k: v for k, v in state.items()
                                                       if k not in ("model", "optimizer", "rng")}))
    return folder, marker


def eval_model(path):
    """make eval's lm-eval model over a checkpoint: the loading that `make eval` does before any task runs."""
    pytest.importorskip("lm_eval")
    from engine.lm_eval_model import CheckpointLM

    return CheckpointLM(str(path))


def test_the_index_payload_would_run_under_plain_pickle(dcp_payload_folder):
    """The payload is real: pickle (what DCP's own reader uses) runs it."""
    import pickle

    folder, marker = dcp_payload_folder
    pickle.loads((folder / ".metadata").read_bytes())
    assert marker.exists()


def test_a_folder_index_payload_runs_on_no_entry_point(dcp_payload_folder, tmp_path, capsys):
    folder, marker = dcp_payload_folder
    refused = (f"{folder}: its .metadata refers to torch.distributed.checkpoint.filesystem.os.system, which a "
               "Distributed Checkpoint index never holds: refused to load it")
    assert one_line_error(capsys, consolidate, [str(folder)]) == f"error: {refused}"
    assert one_line_error(capsys, chat, [str(folder)]) == f"error: {refused}"
    assert one_line_error(capsys, export, [str(folder), str(tmp_path / "out")]) == f"error: {refused}"
    with pytest.raises(ckpt.CheckpointError, match="refused to load it"):
        eval_model(folder)
    with pytest.raises(ckpt.CheckpointError, match="refused to load it"):
        Trainer(load_config(None, [*TINY, f"out_dir={tmp_path / 'resumed'}", f"resume={folder}"]))
    with pytest.raises(ckpt.CheckpointError, match="refused to load it"):  # resume=auto finds it too
        Trainer(load_config(None, [*TINY, f"out_dir={folder.parent}", "resume=auto"]))
    assert not marker.exists()


def test_a_folder_index_payload_runs_on_no_rank_of_two(dcp_payload_folder, tmp_path):
    folder, marker = dcp_payload_folder
    result = torchrun(2, *TINY, f"out_dir={tmp_path / 'resumed'}", f"resume={folder}")
    assert result.returncode != 0
    assert "refers to torch.distributed.checkpoint.filesystem.os.system" in result.stderr
    assert not marker.exists()


@pytest.fixture
def phase_payload(run, tmp_path, monkeypatch):
    """A .pt whose config says `phase: evilrun.payload`, with payload.py beside it in an importable folder
    (as checkpoints/evilrun/ is from the repository root)."""
    marker = tmp_path / "marker"
    evilrun = tmp_path / "evilrun"
    evilrun.mkdir()
    (evilrun / "__init__.py").write_text("")
    (evilrun / "payload.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    state = ckpt.load_checkpoint(run / "phase7_final.pt")
    state["phase"] = state["config"]["phase"] = "evilrun.payload"
    path = evilrun / "phase7_step_2.pt"
    ckpt.save_checkpoint(path, state)
    yield path, marker
    for name in ("evilrun.payload", "evilrun"):  # an import cached here would hide one in the next test
        sys.modules.pop(name, None)


def test_the_phase_payload_is_importable(phase_payload):
    import importlib

    path, marker = phase_payload
    importlib.import_module("evilrun.payload")
    assert marker.exists()


def test_a_phase_a_checkpoint_names_is_never_imported(phase_payload, tmp_path, capsys):
    path, marker = phase_payload
    refused = ("error: phase 'evilrun.payload' is a module path that your own config or command line does not "
               "name: only those are imported (give phase=evilrun.payload if you trust that module's code); "
               "phases of phases/: ")
    assert one_line_error(capsys, chat, [str(path)]).startswith(refused)
    assert one_line_error(capsys, chat, [str(path.parent)]).startswith(refused)  # the run folder's checkpoint
    assert one_line_error(capsys, export, [str(path), str(tmp_path / "out")]).startswith(refused)
    with pytest.raises(Exception, match="phase 'evilrun.payload' is a module path"):
        eval_model(path)
    with pytest.raises(Exception, match="phase 'evilrun.payload' is a module path"):
        Trainer(load_config(None, [*TINY, f"out_dir={tmp_path / 'resumed'}", f"resume={path}"]))
    with pytest.raises(Exception, match="phase 'evilrun.payload' is a module path"):
        Trainer(load_config(None, [*TINY, f"out_dir={path.parent}", "resume=auto"]))
    assert not marker.exists()


def test_a_phase_module_the_user_names_is_honoured(tmp_path):
    """The user's own command line (or config file) naming a module path is what makes it importable."""
    from phases import USER_NAMED_MODULES, get_phase

    USER_NAMED_MODULES.discard("tests.toy_phase")
    with pytest.raises(Exception, match="phase 'tests.toy_phase' is a module path that your own config"):
        get_phase("tests.toy_phase")
    cfg = load_config(None, ["phase=tests.toy_phase", "data=dummy", "vocab_size=32", "n_seq=8"])
    assert get_phase(cfg.phase).name == "toy"
    with pytest.raises(Exception, match="unknown phase 'os'"):
        get_phase("os")  # a name without a dot must be a folder of phases/


def test_the_allowlist_is_exact_pairs():
    from engine.dcp_reader import DCP_CLASSES

    assert all("." not in name for _, name in DCP_CLASSES)
    assert ("torch.distributed.checkpoint.filesystem", "os") not in DCP_CLASSES


def test_a_real_checkpoint_folder_still_loads(tmp_path):
    """The exact allowlist covers what DCP writes (saved here in one process, as the ranks' folders are)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from engine import dcp_reader

    state = {"model": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)},
             "optimizer": {"state": {"w": {"step": torch.tensor(1.0)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": ["w"]}]},
             "rng": {"rank0": {"torch": torch.get_rng_state()}}}
    dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    whole = dcp_reader.read_whole(tmp_path)
    assert torch.equal(whole["model"]["w"], state["model"]["w"])
    assert whole["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    shutil.rmtree(tmp_path)
