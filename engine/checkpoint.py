"""Checkpoints: everything needed to continue a run exactly, written atomically, loaded without pickle code.

A checkpoint is a dict of tensors and plain values (torch.load(weights_only=True) accepts it):
phase, config, model, optimizer, step, tokens_seen, sequences_drawn, best_val_loss, rng, tokenizer.
The learning-rate schedule is a pure function of the step, so `step` is its whole state.

A single process writes one `.pt` file per checkpoint. A run on several ranks (torchrun, FSDP) writes a
Distributed Checkpoint folder instead (`phase7_step_2000/`, see DistributedCheckpoints): each rank its own
shards, loadable on any number of ranks, or read whole on one process by load_checkpoint (chat, export,
`make consolidate`). Folders are read without running code too (engine/dcp_reader.py); `make consolidate`
turns one into a single .pt.

Every checkpoint is checksummed: a .pt has `NAME.pt.sha256` beside it, a folder `checksums.sha256` inside
(both in `sha256sum -c` format), written by a background thread after the data, and checked on load
(verify_checksums=false skips it). A run's folder has `latest`, naming its newest checkpoint; resume=auto
takes the newest complete checkpoint by step (see newest_checkpoint).

The training loop sees one object, Checkpointer: save(name), load(path), latest(), whichever format its
world writes (FileCheckpoints or DistributedCheckpoints), and keep_last's removal of older step checkpoints.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
from pathlib import Path

import torch

from engine.config import Config
from engine.errors import UserError
from phases import config_from_dict, get_phase


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged or belongs to another model; the message says what to do."""


# Whether load_checkpoint checks checksums when its caller does not say (chat, export and consolidate
# turn it off for their process with verify_checksums=false; training passes its config's key).
VERIFY_BY_DEFAULT = True


def take_loading_options(options: dict) -> dict:
    """The options of chat, export and consolidate that concern loading, taken out of `options`:
    verify_checksums=false, and phase=MODULE to trust a phase module a checkpoint names (see phases/)."""
    global VERIFY_BY_DEFAULT
    from engine.config import parse_value
    from phases import allow_phase_module

    if "verify_checksums" in options:
        VERIFY_BY_DEFAULT = parse_value("verify_checksums", bool, options.pop("verify_checksums"))
    if "phase" in options:
        allow_phase_module(options.pop("phase").strip())
    return options


class KeepsWriteErrors:
    """A file whose failed write is remembered: torch.save reports one only as "unexpected pos"."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def atomic_write_bytes(path: Path, write, size: int = 0) -> None:
    """Write through a temp file in the same folder, then rename: a crash never leaves half a file. A full
    disk is a CheckpointError that says so (size: the bytes expected, for the message)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    file = None
    try:
        with open(tmp, "wb") as raw:
            file = KeepsWriteErrors(raw)
            write(file)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = file.error if file is not None and file.error is not None else e
        if getattr(cause, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
            raise
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        raise CheckpointError(f"no space left on device writing {path} (needs ~{max(size, 1) / 1e9:.2g} GB, "
                              f"{free / 1e9:.2g} GB free): free space or set out_dir elsewhere; "
                              "checkpoints already saved are intact") from None
    finally:
        tmp.unlink(missing_ok=True)


def tensor_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f), size=tensor_bytes(state))


def save_json(path: Path, value) -> None:
    atomic_write_bytes(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


# --- checksums -------------------------------------------------------------------------------------------------

FOLDER_CHECKSUMS = "checksums.sha256"  # inside a checkpoint folder; a .pt's is NAME.pt.sha256 beside it


def checksum_file(path: Path) -> Path:
    """Where a checkpoint's checksums are: `sha256sum -c` checks them by hand too."""
    return path / FOLDER_CHECKSUMS if path.is_dir() else path.with_name(f"{path.name}.sha256")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(listing: Path, files: list[Path]) -> None:
    atomic_write_bytes(listing, lambda f: f.write("".join(f"{sha256_of(p)}  {p.name}\n" for p in files).encode()))


def verify_checksums(path: Path, part: tuple[int, int] = (0, 1)) -> None:
    """Check a checkpoint's files against the checksums written when it was saved: a CheckpointError naming
    the first file that differs or is missing. part=(i, n): only every n-th file from the i-th (a rank's
    share). A checkpoint without checksums (saved by an older version, or its save was interrupted between
    the data and the checksums) loads with a one-line note."""
    listing = checksum_file(path)
    if not listing.is_file():
        if part[0] == 0:  # one note for all ranks
            print(f"note: {path} has no checksums ({listing.name}; saved by an older version, or interrupted while "
                  "saving): loaded unverified", file=sys.stderr)
        return
    folder = listing.parent
    for i, line in enumerate(listing.read_text().splitlines()):
        expected, _, name = line.partition("  ")
        if i % part[1] != part[0]:
            continue
        file = folder / name
        if "/" in name or not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {listing}): the checkpoint is incomplete; "
                                  "use an earlier one")
        if sha256_of(file) != expected:
            raise CheckpointError(f"{file} does not match its checksum in {listing}: its bytes changed after it "
                                  "was saved (disk or copy error); use an earlier checkpoint, or "
                                  "verify_checksums=false to load it anyway")


class FileCheckpoints:
    """A single process's checkpoints: the training thread writes the .pt (temp file, then rename); a background
    thread then hashes it and writes its checksums and `latest`, so the loop never waits for hashing. One save
    is in flight at a time; wait() finishes it (the end of a run calls it)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.in_flight: tuple[threading.Thread, list] | None = None

    def path_of(self, name: str) -> Path:
        return self.run_dir / f"{name}.pt"

    def save(self, name: str, model, optimizer, train_state: dict, point_latest: bool, then=None) -> None:
        """then(path): called in the background thread once the checkpoint is complete (checksums, `latest`)."""
        self.wait()
        path = self.path_of(name)
        checksum_file(path).unlink(missing_ok=True)  # a rewritten best never meets the old file's checksum
        save_checkpoint(path, {**train_state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "rng": rng_state()})
        errors = []

        def finish():
            try:
                write_checksums(checksum_file(path), [path])
                if point_latest:
                    write_latest(self.run_dir, path)
                if then is not None:
                    then(path)
            except BaseException as e:  # re-raised in the training thread by wait()
                errors.append(e)

        thread = threading.Thread(target=finish, name=f"checksum {path.name}")
        thread.start()
        self.in_flight = (thread, errors)

    def wait(self) -> None:
        if self.in_flight is None:
            return
        thread, errors = self.in_flight
        thread.join()
        self.in_flight = None
        if errors:
            raise errors[0]

    def load(self, path: Path, model, optimizer, verify: bool) -> bool:
        """A .pt, or a checkpoint folder read whole, into the model, optimizer and RNG (always restored: True)."""
        state = load_checkpoint(path, verify=verify)
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, model, state["optimizer"])
        restore_rng(state["rng"])
        return True


# --- leftovers of interrupted saves ------------------------------------------------------------------------------

WRITER = "writer"  # in a .partial folder: "host pid" of the process that writes it


def writer_alive(host: str, pid: int) -> bool:
    """Whether the process that writes a leftover still runs. One on another host cannot be asked: a run that
    opens its folder is its only writer, so that one is taken as gone."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete half-written saves whose writer is gone: `.NAME.tmp<pid>` files and `.NAME.partial/` folders
    (a full disk leaves them, and they keep it full). Returns their names."""
    removed = []
    for p in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if p.is_file() and (m := re.fullmatch(r"\..+\.tmp(\d+)", p.name)):
            if not writer_alive(socket.gethostname(), int(m.group(1))):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        elif p.is_dir() and re.fullmatch(r"\..+\.partial", p.name):
            host, _, pid = (p / WRITER).read_text().partition(" ") if (p / WRITER).is_file() else ("", "", "0")
            if not writer_alive(host, int(pid or 0)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(f"{p.name}/")
    return removed


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def missing_checkpoint(path: Path) -> CheckpointError:
    """Name what the folder does hold: the seed's examples say step_2000.pt where files are phase7_step_2000.pt."""
    held = [p.name for p in checkpoints_in(path.parent)]
    if held:
        return CheckpointError(f"checkpoint {path} not found; {path.parent}/ holds: {', '.join(held)}")
    return CheckpointError(f"checkpoint {path} not found: give CHECKPOINT=<path to a .pt file or checkpoint folder>")


def load_checkpoint(path: str | Path, map_location="cpu", lazy: bool = False, verify: bool | None = None) -> dict:
    """A whole checkpoint on the CPU: a .pt file, or a Distributed Checkpoint folder read into one process.
    lazy: tensors are read when used (a .pt is memory-mapped; a folder gives its plain values only, for
    DistributedCheckpoints.load to read the shards). verify: check its checksums first (not when lazy: the
    caller reading the tensors checks them, see DistributedCheckpoints.load)."""
    path, verify = Path(path), VERIFY_BY_DEFAULT if verify is None else verify
    if is_distributed_checkpoint(path):
        if lazy:
            return read_train_state(path)
        if verify:
            verify_checksums(path)
        return read_distributed_checkpoint(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder but not a complete checkpoint folder (no .metadata and "
                              f"{TRAIN_STATE}): give a .pt file or a checkpoint folder; chat and export also take a "
                              "run folder")
    if not path.is_file():
        raise missing_checkpoint(path)
    if verify and not lazy:
        verify_checksums(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=lazy)
    except Exception as e:  # truncated zip, foreign pickle, disk error: all mean "not a usable checkpoint"
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}); use an earlier one") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this repo (no model/config inside)")
    return state


def check_compatible(state: dict, cfg: Config, path) -> None:
    """Refuse to load a checkpoint into a model of another phase or shape, naming the differences."""
    saved = config_from_dict(state["config"])
    if saved.phase != cfg.phase:
        raise CheckpointError(f"{path} is a '{saved.phase}' checkpoint; this run is phase '{cfg.phase}'")
    diffs = [f"{k}={getattr(saved, k)} (config: {getattr(cfg, k)})"
             for k in get_phase(cfg.phase).shape_keys if getattr(saved, k) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"{path} has another model shape: {', '.join(diffs)}; "
                              f"use the config it was trained with ({Path(path).parent / 'config.yaml'})")
    if saved.memory_mode != cfg.memory_mode:  # bf16 weights and 8-bit states vs fp32 and torch's AdamW
        raise CheckpointError(f"{path} was trained with memory_mode={str(saved.memory_mode).lower()}: "
                              f"resume with the same (its optimizer state is of the other kind)")


def checkpoints_in(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder: .pt files and Distributed Checkpoint folders (a folder is
    renamed to its name only once every rank's part is written)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if not p.name.startswith(".")
                  and ((p.suffix == ".pt" and p.is_file()) or is_distributed_checkpoint(p)))


def checkpoint_name(path: Path) -> str:
    return path.name.removesuffix(".pt")


def best_checkpoint_in(run_dir: str | Path) -> Path | None:
    """The checkpoint to use a run folder's model from (chat, export, evaluation): best, else final, else the
    highest step. Not the one to resume from: that is newest_checkpoint."""
    found = checkpoints_in(Path(run_dir))
    for suffix in ("_best", "_final"):
        named = [p for p in found if checkpoint_name(p).endswith(suffix)]
        if named:
            return named[0]
    steps = [(int(m.group(1)), p) for p in found if (m := re.fullmatch(r".+_step_(\d+)", checkpoint_name(p)))]
    return max(steps)[1] if steps else None


def resolve_checkpoint(path: str) -> Path:
    """The checkpoint a user named: a .pt file, a checkpoint folder, or a run folder's best_checkpoint_in."""
    if not path:
        raise CheckpointError("no checkpoint given: CHECKPOINT=<file.pt, checkpoint folder or run folder>")
    target = Path(path)
    if target.is_dir() and not is_distributed_checkpoint(target):  # a run folder, not a checkpoint folder
        found = best_checkpoint_in(target)
        if found is None:
            raise CheckpointError(f"no checkpoint in {target}/: train first (e.g. `make train-phase7-test`)")
        return found
    return target


# --- resume=auto --------------------------------------------------------------------------------------------

LATEST = "latest"  # names a run's newest checkpoint; rewritten after each save but best's


def checkpoint_step(path: Path) -> int:
    if m := re.fullmatch(r".+_step_(\d+)", checkpoint_name(path)):
        return int(m.group(1))
    return load_checkpoint(path, lazy=True)["step"]


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """resume=auto's checkpoint: of the complete step and final checkpoints, .pt files and folders alike, the
    one of the highest step (the later written on a tie). One rule for both formats: after a run moves from
    several ranks to one process, its newer .pt files win over its older folders. Complete: a .pt is written
    to a temp file and renamed, a folder renamed once every rank's part is in. A best checkpoint is never the
    answer: it is rewritten in place, while step and final ones are not."""
    candidates = [p for p in checkpoints_in(Path(run_dir))
                  if re.fullmatch(r".+_step_\d+", checkpoint_name(p)) or checkpoint_name(p).endswith("_final")]
    return max(candidates, key=lambda p: (checkpoint_step(p), p.stat().st_mtime_ns), default=None)


def write_latest(run_dir: Path, target: Path) -> None:
    atomic_write_bytes(run_dir / LATEST, lambda f: f.write(f"{target.name}\n".encode()))


def named_by_latest(run_dir: Path) -> str | None:
    return (run_dir / LATEST).read_text().strip() if (run_dir / LATEST).is_file() else None


# --- keep_last ------------------------------------------------------------------------------------------------

STEP_NAME = re.compile(r"(.+)_step_(\d+)")


def remove_older_steps(run_dir: Path, newest: Path, keep_last: int) -> list[str]:
    """keep_last=K: of the run's step checkpoints of `newest`'s phase up to its step (.pt files and folders
    alike), delete all but the last K, each with its checksums. Never best or final, never the one `latest`
    names, never `newest` itself, never one of a higher step (not older: left by a run this one was resumed
    before). Returns the names removed."""
    prefix, newest_step = STEP_NAME.fullmatch(checkpoint_name(newest)).groups()
    steps = [(int(m.group(2)), p) for p in checkpoints_in(run_dir) if (m := STEP_NAME.fullmatch(checkpoint_name(p)))
             and m.group(1) == prefix and int(m.group(2)) <= int(newest_step)]
    steps.sort(key=lambda found: (found[0], found[1].stat().st_mtime_ns))
    keep = {newest.name, named_by_latest(run_dir)}
    removed = []
    for _, old in steps[:-keep_last]:
        if old.name in keep:
            continue
        try:
            delete_checkpoint(old)
            removed.append(old.name)
        except OSError as e:  # a checkpoint left behind fills the disk later, but loses nothing: go on training
            print(f"note: keep_last={keep_last} could not remove {old} ({e.strerror or e}): remove it by hand",
                  file=sys.stderr)
    return removed


def delete_checkpoint(path: Path) -> None:
    """A .pt is unlinked, then its checksum file. A folder is first renamed to a hidden `.NAME.partial`, so
    that no reader meets it half-deleted (and remove_leftovers finishes the job if this process dies)."""
    if path.is_dir():
        hidden = path.with_name(f".{path.name}.partial")
        shutil.rmtree(hidden, ignore_errors=True)
        os.replace(path, hidden)
        shutil.rmtree(hidden)
    else:
        path.unlink()
        checksum_file(path).unlink(missing_ok=True)


# --- one checkpointer for the training loop --------------------------------------------------------------------


class Checkpointer:
    """A run's checkpoints, for the training loop: save(name), load(path), latest(), in the format its world
    writes (one process: `.pt` files, FileCheckpoints; several ranks: folders, DistributedCheckpoints), so
    the loop never asks which. load() takes either format at any world size. `latest` names each new step and
    final checkpoint, never best (rewritten in place). keep_last=K > 0: once a new step checkpoint is complete
    (its checksums written; for a folder, published by rank 0), older step checkpoints beyond the last K go
    (remove_older_steps). One save is in flight at a time; wait() finishes it."""

    def __init__(self, run_dir: Path, world, device: torch.device, keep_last: int = 0):
        self.run_dir, self.keep_last = run_dir, keep_last
        self.format = DistributedCheckpoints(run_dir, world.rank, device) if world.active else FileCheckpoints(run_dir)

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the run folder's newest complete one by step (newest_checkpoint)."""
        return newest_checkpoint(self.run_dir)

    def to_resume_from(self, resume: str) -> Path | None:
        """`resume` as given, or with resume=auto latest() (None: nothing yet, start fresh)."""
        if resume != "auto":
            return Path(resume) if resume else None
        found = self.latest()
        print(f"resume=auto: continuing from {found}" if found else
              f"resume=auto: no checkpoint in {self.run_dir}/, starting fresh")
        return found

    def path_of(self, name: str) -> Path:
        """Where save(name) writes: `NAME.pt` or the folder `NAME/`."""
        return self.format.path_of(name)

    def save(self, name: str, model, optimizer, train_state: dict) -> None:
        """The model, optimizer, this process's RNG and train_state (plain values) as checkpoint `name`,
        finished in the background."""
        prune = None
        if self.keep_last > 0 and STEP_NAME.fullmatch(name):
            def prune(path):
                remove_older_steps(self.run_dir, path, self.keep_last)
        self.format.save(name, model, optimizer, train_state, point_latest=not name.endswith("_best"), then=prune)

    def load(self, path: Path, model, optimizer, verify: bool = True) -> bool:
        """The checkpoint at `path` into this process's model, optimizer and RNG. False: it holds no RNG state
        for this rank (saved by fewer ranks), so the caller seeds it."""
        return self.format.load(path, model, optimizer, verify)

    def wait(self) -> None:
        self.format.wait()


# --- Distributed Checkpoint folders (runs on several ranks) ------------------------------------------------------

TRAIN_STATE = "train_state.json"  # beside the shards: phase, config, step, counters, tokenizer


def is_distributed_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file()


def read_train_state(path: Path) -> dict:
    """A checkpoint folder's plain values: phase, config, step, counters, tokenizer."""
    return json.loads((path / TRAIN_STATE).read_text())


def read_distributed_checkpoint(path: Path) -> dict:
    """A Distributed Checkpoint folder read whole into this process, in the shape of a .pt checkpoint: model
    and optimizer unsharded (the optimizer keyed by parameter name), rank 0's RNG state as `rng`."""
    from engine import dcp_reader

    try:
        stored = dcp_reader.read_whole(path)
    except dcp_reader.UnsafeCheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except dcp_reader.DamagedCheckpointError as e:
        raise CheckpointError(f"{path} is damaged or incomplete ({e}); use an earlier checkpoint") from None
    rng = stored.get("rng", {}).get("rank0", {})
    rng = {"torch": rng["torch"], "cuda": [rng["cuda"]] if "cuda" in rng else []} if rng else None
    return {**read_train_state(path), "model": stored["model"], "optimizer": stored["optimizer"], "rng": rng}


def rank_rng_state(device: torch.device) -> dict:
    """This rank's RNG: the CPU generator and, on CUDA, its own GPU's (not every visible GPU's)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rank_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def optimizer_state_by_name(state: dict, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """A torch.optim state dict keyed by parameter index (a single process's .pt) re-keyed by parameter name,
    as torch.distributed.checkpoint.state_dict expects, matching indices to this optimizer's parameters in
    order (the same groups: the model's shape was checked). One keyed by name already is returned as it is."""
    if keyed_by_name(state):
        return state
    names = {p: n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
             for n, p in model.named_parameters()}
    by_index = {}
    for saved, group in zip(state["param_groups"], optimizer.param_groups):
        by_index.update({i: names[p] for i, p in zip(saved["params"], group["params"])})
    return {"state": {by_index[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in state["param_groups"]]}


def keyed_by_name(state: dict) -> bool:
    """A torch.optim state dict from torch.distributed.checkpoint.state_dict (keyed by parameter name)."""
    return "param_groups" in state and any(isinstance(p, str) for g in state["param_groups"] for p in g["params"])


def load_optimizer_state(optimizer, model: torch.nn.Module, state: dict) -> None:
    """A single process's optimizer from a .pt (keyed by index) or a checkpoint folder read whole (by name)."""
    if not keyed_by_name(state):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizer, state)


class DistributedCheckpoints:
    """Saving and loading a sharded run's checkpoints with torch.distributed.checkpoint (DCP).

    save(name): every rank stages its shards of the model and optimizer and its own RNG state to CPU memory
    and writes them in a background thread (async_save) while training goes on. The shards go into
    `.<name>.partial/`; when the last rank is done, rank 0 adds train_state.json, renames the folder to
    `<name>/` and then rewrites `latest` to name it. A rank that dies mid-save leaves only the `.partial`
    folder, which nothing reads and the next save of that name replaces: `latest` still names the previous
    complete checkpoint. One save is in flight at a time; wait() finishes it (the end of a run calls it).

    The background writes talk over a gloo group of their own, so they never interleave with FSDP's
    collectives on the default group.
    """

    def __init__(self, run_dir: Path, rank: int, device: torch.device):
        import torch.distributed as dist

        self.run_dir, self.rank, self.device = run_dir, rank, device
        self.group = dist.new_group(backend="gloo")
        self.in_flight: tuple[threading.Event, list] | None = None

    def path_of(self, name: str) -> Path:
        return self.run_dir / name

    def save(self, name: str, model, optimizer, train_state: dict, point_latest: bool, then=None) -> None:
        """then(path): called on rank 0, in the background, once the folder is published."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        partial = self.run_dir / f".{name}.partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # left by a run that died while writing it
            partial.mkdir(parents=True)
            (partial / WRITER).write_text(f"{socket.gethostname()} {os.getpid()}")  # see remove_leftovers
        dist.barrier(group=self.group)  # no rank writes into the folder before it is there, empty
        model_state, optimizer_state = get_state_dict(model, optimizer.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state,
                 "rng": {f"rank{self.rank}": rank_rng_state(self.device)}}
        done, errors = threading.Event(), []

        def publish(future) -> None:  # runs when this rank's write ends; rank 0's ends after every rank's
            try:
                future.result()
                if self.rank == 0:
                    self.publish(partial, self.path_of(name), {**train_state, "world_size": dist.get_world_size()},
                                 point_latest)
                    if then is not None:
                        then(self.path_of(name))
            except BaseException as e:  # re-raised in the training thread by wait()
                errors.append(e)
            finally:
                done.set()

        dcp.async_save(state, checkpoint_id=partial, process_group=self.group).add_done_callback(publish)
        self.in_flight = (done, errors)

    def publish(self, partial: Path, final: Path, train_state: dict, point_latest: bool) -> None:
        """In the background thread, after every rank's shards are written: checksums, then the rename."""
        (partial / WRITER).unlink()
        save_json(partial / TRAIN_STATE, train_state)
        write_checksums(partial / FOLDER_CHECKSUMS, sorted(p for p in partial.iterdir() if p.is_file()))
        old = final.with_name(f".{final.name}.old")
        if final.exists():  # best (and a re-saved final) replace an earlier folder of the same name
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
        if point_latest:
            write_latest(self.run_dir, final)

    def wait(self) -> None:
        if self.in_flight is None:
            return
        done, errors = self.in_flight
        done.wait()
        self.in_flight = None
        if errors:
            from torch.distributed.checkpoint.api import CheckpointException

            from engine import dcp_reader

            if isinstance(errors[0], CheckpointException):  # a BaseException with every rank's traceback
                raise CheckpointError(f"saving a checkpoint folder in {self.run_dir} failed: "
                                      f"{dcp_reader.first_failure(errors[0])}") from None
            raise errors[0]

    def load(self, path: Path, model, optimizer, verify: bool = True) -> bool:
        """The checkpoint's shards into this rank's model and optimizer, at any world size: from a folder
        (DCP reshards) or a single process's .pt (each rank takes its slice), and this rank's RNG state.
        False when the checkpoint has none for this rank (it was saved by fewer ranks)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict, set_state_dict)

        from engine import dcp_reader

        if verify:  # each rank checks its share of the files
            verify_checksums(path, (self.rank, dist.get_world_size()))
        if not is_distributed_checkpoint(path):
            state = load_checkpoint(path, lazy=True)
            whole = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, state["model"], options=whole)
            set_optimizer_state_dict(model, optimizer.optimizer, options=whole,
                                     optim_state_dict=optimizer_state_by_name(state["optimizer"],
                                                                              optimizer.optimizer, model))
            if self.rank != 0:  # a single process has one RNG state: rank 0 continues it
                return False
            rng = state["rng"]
            restore_rank_rng({"torch": rng["torch"], **({"cuda": rng["cuda"][0]} if rng["cuda"] else {})}, self.device)
            return True
        model_state, optimizer_state = get_state_dict(model, optimizer.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        try:
            stored = dcp_reader.read_metadata(path).state_dict_metadata
            rng = rank_rng_state(self.device)
            if all(f"rng.rank{self.rank}.{key}" in stored for key in rng):
                state["rng"] = {f"rank{self.rank}": rng}
            dcp_reader.load(state, path)
        except (dcp_reader.UnsafeCheckpointError, dcp_reader.DamagedCheckpointError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        set_state_dict(model, optimizer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        if "rng" not in state:
            return False
        restore_rank_rng(state["rng"][f"rank{self.rank}"], self.device)
        return True
