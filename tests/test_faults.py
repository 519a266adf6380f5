"""What a cluster does to a run, on CPU: a stop signal mid-run (1 process and 2 ranks), a move from 2 ranks to 1,
flipped bytes, missing and truncated shards, a full disk, leftovers of dead saves, bad data and bad values.
Every fault is injected at a real point (tests/faults.py), and each test fails if its guarantee breaks."""

import errno
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import engine.train
from data.stream import DataError
from engine import checkpoint as ckpt
from engine.cli import run_cli
from engine.config import ConfigError
from engine.train import PREEMPTED_EXIT, Trainer
from phases import load_config
from tests import faults
from tests.test_distributed import ROOT, TINY, log_of, same_log, torchrun

# 16 steps of 4 sequences in one process (2 x 2 on 2 ranks), no step checkpoint before the end
RUN = [*TINY, "max_steps=16", "save_every=1000", "eval_every=4"]
ONE = [*RUN, "batch_size=4"]


def losses(log):
    return [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in log]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "uninterrupted"
    Trainer(load_config(None, ONE + [f"out_dir={run}"])).fit()
    return log_of(run)


@pytest.fixture(scope="module")
def stopped_on_two_ranks(tmp_path_factory):
    """2 ranks; rank 1 alone gets SIGTERM in step 12: both ranks stop after step 12 and save it."""
    run = tmp_path_factory.mktemp("faults") / "two_ranks"
    result = torchrun(2, *RUN, f"out_dir={run}", module="tests.faults", env={"FAULT_SIGNAL": "1:12:SIGTERM"})
    return run, result


def one_line_error(capsys, main, argv) -> str:
    """What run_cli prints for main(argv): exactly one line on stderr, and exit code 1."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len([line for line in err if not line.startswith("note: ")]) == 1, err
    return err[-1]


# --- 3. SIGTERM / SIGUSR1 ----------------------------------------------------------------------------------------

def test_sigterm_in_one_process_saves_the_step_and_resume_continues_exactly(tmp_path, monkeypatch, capsys,
                                                                           uninterrupted):
    run = tmp_path / "run"
    monkeypatch.setattr(engine.train, "get_phase", faults.signal_in_step(0, 12, signal.SIGTERM))
    stopped = Trainer(load_config(None, ONE + [f"out_dir={run}"]))
    stopped.fit()
    out = capsys.readouterr().out
    assert stopped.stopped and stopped.step == 12
    assert (f"SIGTERM: stopped after step 12 and saved {run / 'phase7_step_12.pt'}; exiting with code "
            f"{PREEMPTED_EXIT} (resume=auto continues from it)") in out
    assert (run / "latest").read_text() == "phase7_step_12.pt\n" and not (run / "phase7_final.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone after it
    monkeypatch.undo()

    resumed = Trainer(load_config(None, ONE + [f"out_dir={run}", "resume=auto"]))
    assert resumed.step == 12
    resumed.fit()
    assert losses(log_of(run)) == losses(uninterrupted)


def test_sigusr1_stops_too_and_exits_with_the_requeue_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tests.faults", *ONE, "max_steps=4", f"out_dir={tmp_path}"],
                            env={**os.environ, "FAULT_SIGNAL": "0:2:SIGUSR1"}, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == PREEMPTED_EXIT == 143, result.stderr
    assert "SIGUSR1: stopped after step 2 and saved" in result.stdout
    assert ckpt.newest_checkpoint(tmp_path) == tmp_path / "phase7_step_2.pt"


def test_sigterm_on_one_rank_of_two_saves_step_12_on_every_rank(stopped_on_two_ranks, uninterrupted):
    run, result = stopped_on_two_ranks
    assert f"exitcode  : {PREEMPTED_EXIT}" in result.stderr, result.stderr[-3000:]
    assert "stop signal (another rank's): stopped after step 12 and saved" in result.stdout  # rank 0 printed
    assert (run / "latest").read_text() == "phase7_step_12\n"
    assert sorted(p.name for p in (run / "phase7_step_12").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "checksums.sha256", "train_state.json"]
    same_log(log_of(run), uninterrupted[:12])


# --- 4. resume=auto after 2 ranks -> 1 ---------------------------------------------------------------------------

def test_two_ranks_then_one_then_resume_auto_takes_the_newest(stopped_on_two_ranks, uninterrupted, tmp_path,
                                                              monkeypatch):
    """2 ranks stop at step 12 (a folder, `latest`); one process continues and is stopped at step 14 (a .pt);
    resume=auto must then continue from step 14, not go back to the ranks' folder of step 12."""
    run = tmp_path / "run"
    shutil.copytree(stopped_on_two_ranks[0], run)
    with monkeypatch.context() as patch:
        patch.setattr(engine.train, "get_phase", faults.signal_in_step(0, 14 - 12, signal.SIGTERM))
        Trainer(load_config(None, ONE + [f"out_dir={run}", "resume=auto"])).fit()
    assert (run / "latest").read_text() == "phase7_step_14.pt\n"
    last = Trainer(load_config(None, ONE + [f"out_dir={run}", "resume=auto"]))
    assert last.step == 14 and last.resume_from == run / "phase7_step_14.pt"
    last.fit()
    same_log(log_of(run)[12:], uninterrupted[12:])  # 2 ranks of 2 sequences = 1 process of 4


# --- 5. checksums --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-step single-process run: phase7_final.pt and its checksum."""
    run = tmp_path_factory.mktemp("faults") / "saved"
    Trainer(load_config(None, [*TINY, "max_steps=2", f"out_dir={run}"])).fit()
    return run


def flip_byte_in(path, needle: bytes) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at > 0
    data[at + 5] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_pt_fail_with_one_line_naming_the_file(saved, tmp_path, capsys):
    from engine.chat import main as chat

    broken = tmp_path / "phase7_final.pt"
    for name in ("phase7_final.pt", "phase7_final.pt.sha256"):
        shutil.copy(saved / name, tmp_path / name)
    embedding = torch.load(broken, weights_only=True)["model"]["embed_tokens.weight"]
    flip_byte_in(broken, embedding.numpy().tobytes()[:64])
    line = one_line_error(capsys, chat, [str(broken)])
    assert line == (f"error: {broken} does not match its checksum in {broken}.sha256: its bytes changed after it "
                    "was saved (disk or copy error); use an earlier checkpoint, or verify_checksums=false to load "
                    "it anyway")
    with pytest.raises(ckpt.CheckpointError, match="does not match its checksum"):
        Trainer(load_config(None, [*TINY, f"out_dir={tmp_path / 'resumed'}", f"resume={broken}"]))
    loaded = ckpt.load_checkpoint(broken, verify=False)  # verify_checksums=false: the flipped value is there
    assert not torch.equal(loaded["model"]["embed_tokens.weight"], embedding)


def test_a_checkpoint_without_checksums_loads_with_a_note(saved, tmp_path, capsys):
    old = tmp_path / "phase7_final.pt"
    shutil.copy(saved / "phase7_final.pt", old)
    assert ckpt.load_checkpoint(old)["step"] == 2
    assert capsys.readouterr().err == (f"note: {old} has no checksums (phase7_final.pt.sha256; saved by an older "
                                       "version, or interrupted while saving): loaded unverified\n")


def test_checksums_are_written_off_the_training_thread(tmp_path, monkeypatch):
    """save() returns while hashing is still going on; wait() finishes it (and `latest`)."""
    import threading

    hashing, release = threading.Event(), threading.Event()
    sha256_of = ckpt.sha256_of

    def slow_sha256(path):
        hashing.set()
        release.wait(10)
        return sha256_of(path)

    monkeypatch.setattr(ckpt, "sha256_of", slow_sha256)
    saves = ckpt.FileCheckpoints(tmp_path)
    model, optimizer = torch.nn.Linear(3, 1), torch.optim.SGD([torch.nn.Parameter(torch.ones(3))])
    saves.save("x_step_1", model, optimizer, {"step": 1}, point_latest=True)
    assert hashing.wait(10) and not (tmp_path / "x_step_1.pt.sha256").exists()
    release.set()
    saves.wait()
    assert (tmp_path / "x_step_1.pt.sha256").read_text() == f"{sha256_of(tmp_path / 'x_step_1.pt')}  x_step_1.pt\n"
    assert (tmp_path / "latest").read_text() == "x_step_1.pt\n"


def test_a_flipped_missing_or_truncated_shard_fails_with_one_line(stopped_on_two_ranks, tmp_path, capsys):
    from engine.consolidate import main as consolidate

    folder = tmp_path / "phase7_step_12"
    shutil.copytree(stopped_on_two_ranks[0] / "phase7_step_12", folder)
    shard = folder / "__1_0.distcp"
    good = shard.read_bytes()
    flip_byte_in(shard, good[len(good) // 2:len(good) // 2 + 32])
    assert one_line_error(capsys, consolidate, [str(folder)]) == (
        f"error: {shard} does not match its checksum in {folder / 'checksums.sha256'}: its bytes changed after "
        "it was saved (disk or copy error); use an earlier checkpoint, or verify_checksums=false to load it anyway")
    shard.unlink()
    assert one_line_error(capsys, consolidate, [str(folder)]) == (
        f"error: {shard} is missing (listed in {folder / 'checksums.sha256'}): the checkpoint is incomplete; "
        "use an earlier one")
    # Without checksums DCP's own error (a BaseException, every rank's traceback) is one line too
    line = one_line_error(capsys, consolidate, [str(folder), "verify_checksums=false"])
    assert line.startswith(f"error: {folder} is damaged or incomplete (") and "__1_0.distcp" in line
    shard.write_bytes(good[:len(good) // 3])
    line = one_line_error(capsys, consolidate, [str(folder), "verify_checksums=false"])
    assert line.startswith(f"error: {folder} is damaged or incomplete (")


# --- 6. one-line errors ------------------------------------------------------------------------------------------

def test_a_full_disk_says_so_and_keeps_earlier_checkpoints(saved, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    trainer = Trainer(load_config(None, [*TINY, "max_steps=3", f"out_dir={run}", "resume=auto"]))
    real_open = open

    class FullDisk:
        """A file on a disk that fills up after 4 kB, as the OS reports it: OSError ENOSPC."""

        def __init__(self, *args):
            self.file, self.written = real_open(*args), 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(ckpt, "open", FullDisk, raising=False)
    before = (run / "phase7_final.pt").read_bytes()
    with pytest.raises(ckpt.CheckpointError) as error:
        trainer.save("final")
    assert str(error.value).startswith(f"no space left on device writing {run / 'phase7_final.pt'} (needs ~")
    assert "GB free): free space or set out_dir elsewhere; checkpoints already saved are intact" in str(error.value)
    assert (run / "phase7_final.pt").read_bytes() == before and not list(run.glob(".*.tmp*"))


def test_a_folder_where_a_checkpoint_file_is_expected(tmp_path):
    (tmp_path / "phase7_step_2.pt").mkdir()
    with pytest.raises(ckpt.CheckpointError, match=r"phase7_step_2.pt is a folder but not a complete checkpoint "
                                                   r"folder \(no .metadata and train_state.json\)"):
        Trainer(load_config(None, [*TINY, f"out_dir={tmp_path / 'run'}", f"resume={tmp_path / 'phase7_step_2.pt'}"]))


@pytest.mark.parametrize("value, message", [
    ("beta1=2", "config key 'beta1' must be in [0, 1), got 2.0"),
    ("beta2=1", "config key 'beta2' must be in [0, 1), got 1.0"),
    ("beta1=-0.1", "config key 'beta1' must be in [0, 1), got -0.1"),
    ("warmup_steps=-1", "config key 'warmup_steps' must be >= 0, got -1"),
    ("weight_decay=-0.1", "config key 'weight_decay' must be >= 0, got -0.1"),
    ("grad_clip=nan", "config key 'grad_clip' must be >= 0, got nan"),
    ("grad_clip=-1", "config key 'grad_clip' must be >= 0, got -1.0"),
    ("max_bad_steps=0", "max_bad_steps must be >= 1"),
])
def test_values_out_of_range_are_config_errors(value, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*TINY, value])
    assert message in str(error.value)


# --- 7. leftovers -------------------------------------------------------------------------------------------------

def test_leftovers_of_dead_saves_are_removed_when_a_run_opens_its_folder(saved, tmp_path, capsys):
    import socket

    run = tmp_path / "run"
    shutil.copytree(saved, run)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    (run / f".phase7_step_4.pt.tmp{dead.pid}").write_bytes(b"half")
    (run / f".phase7_step_6.pt.tmp{os.getpid()}").write_bytes(b"being written")  # a live writer: kept
    for name, writer in ((".phase7_step_8.partial", f"{socket.gethostname()} {dead.pid}"),
                         (".phase7_step_10.partial", None),  # died before naming its writer
                         (".phase7_step_12.partial", f"{socket.gethostname()} {os.getpid()}")):
        (run / name).mkdir()
        (run / name / "__0_0.distcp").write_bytes(b"shard")
        if writer:
            (run / name / "writer").write_text(writer)
    Trainer(load_config(None, [*TINY, "max_steps=3", f"out_dir={run}", "resume=auto"]))
    assert (f"removed leftovers of interrupted saves in {run}/: .phase7_step_10.partial/, .phase7_step_4.pt.tmp"
            f"{dead.pid}, .phase7_step_8.partial/\n") in capsys.readouterr().out
    assert sorted(p.name for p in run.glob(".*")) == [".phase7_step_12.partial", f".phase7_step_6.pt.tmp{os.getpid()}"]


# --- 8. token ids -------------------------------------------------------------------------------------------------

def test_token_ids_beyond_the_vocabulary_fail_before_the_model_is_built(tmp_path, monkeypatch):
    from data.packed import ShardWriter

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        writer = ShardWriter(data, split, chunk_size=4096, sep_token=0, dtype=np.uint16)
        ids = np.arange(4096, dtype=np.uint16) % 64
        ids[1000] = 70 if split == "train" else 3
        writer.add(ids)
        writer.close()
    monkeypatch.setattr(Trainer, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    cfg = load_config(None, [*TINY, f"data={data}", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError) as error:
        Trainer(cfg)
    assert str(error.value) == (f"{data / 'train_0000000000.bin'} holds token id 70, outside the model's vocabulary "
                                "[0, 64): set vocab_size=71 or more, or rebuild the data with the tokenizer the "
                                "model uses")
    assert (tmp_path / "cache" / "llm-pretrain" / "token_id_ranges.json").is_file()  # scanned once, cached


def test_slurm_script_stops_the_trainer_before_the_time_limit_then_requeues(tmp_path):
    """USR1 (--signal=B:USR1@120) reaches the script: it sends SIGTERM to the trainer (srun, here a stand-in
    that exits as the trainer does after its save), waits for it, then requeues the job."""
    import time

    log = tmp_path / "log"
    (tmp_path / "srun").write_text(f"#!/bin/bash\ntrap 'echo trainer got TERM >> {log}; exit 143' TERM\n"
                                   f"echo started >> {log}\nwhile true; do sleep 0.05; done\n")
    (tmp_path / "scontrol").write_text(f'#!/bin/sh\n[ "$1" = show ] && echo node01\n[ "$1" = requeue ] && '
                                       f'echo "requeue $2" >> {log}\nexit 0\n')
    for tool in ("srun", "scontrol"):
        (tmp_path / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": ROOT}
    job = subprocess.Popen(["bash", f"{ROOT}/scripts/slurm/train.sbatch", "CONFIG=configs/phase7_test.yaml"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (log.is_file() and "started" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=30)
    assert log.read_text() == "started\ntrainer got TERM\nrequeue 42\n", err
    assert job.returncode == PREEMPTED_EXIT and "USR1: the time limit is near" in out
    assert "#SBATCH --signal=B:USR1@120" in open(f"{ROOT}/scripts/slurm/train.sbatch").read()
