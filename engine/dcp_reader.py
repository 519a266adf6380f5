"""Reading Distributed Checkpoint folders without running code from them.

torch.distributed.checkpoint unpickles a folder's index (.metadata) with plain pickle and its non-tensor values
(the optimizer's hyperparameters) with torch.load(weights_only=False): a folder from elsewhere could run code
when loaded. Here the index is unpickled with an allowlist of the classes DCP itself writes there, and the
values with weights_only=True, as this repo loads every .pt, so a checkpoint folder is as safe to load as a file.
"""

import contextlib
import io
import pickle

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

# Every class a DCP index holds, found by saving a folder (model, optimizer, RNG; bf16, fp32 and uint8
# tensors) with torch 2.13 and listing the globals its pickle looks up; each is older than torch 2.11, the
# oldest torch we run. Exact pairs: no other name of these modules (e.g. filesystem's `os`, reachable as
# the dotted name `os.system`) is ever looked up.
DCP_CLASSES = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")}  # the folder's path (_local: Python 3.13 pickles)
DTYPES = {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}


class UnsafeCheckpointError(Exception):
    """A checkpoint folder whose index names something DCP never writes there."""


class DamagedCheckpointError(Exception):
    """A checkpoint folder DCP could not read (a shard missing or truncated): DCP's own CheckpointException
    derives from BaseException and carries every rank's traceback; this carries its first line."""


def first_failure(e: CheckpointException) -> str:
    """The first rank's error as one line, e.g. "FileNotFoundError: ... __1_0.distcp"."""
    for error, _ in e.failures.values():
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    return "unknown error"


@contextlib.contextmanager
def one_line_errors():
    try:
        yield
    except CheckpointException as e:
        raise DamagedCheckpointError(first_failure(e)) from None


class IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in DCP_CLASSES | DTYPES:  # a dotted name is never in the set: refused too
            raise UnsafeCheckpointError(f"its .metadata refers to {module}.{name}, which a Distributed Checkpoint "
                                        "index never holds: refused to load it")
        return super().find_class(module, name)


class Reader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as index:
            metadata = IndexUnpickler(index).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class ValuesWithoutCode:
    """load_bytes of DCP's load planners, reading each value with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class Planner(ValuesWithoutCode, DefaultLoadPlanner):
    pass


class WholePlanner(ValuesWithoutCode, _EmptyStateDictLoadPlanner):
    pass


def read_metadata(path) -> object:
    try:
        return Reader(str(path)).read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as e:
        raise DamagedCheckpointError(f".metadata is truncated or corrupt ({type(e).__name__}: {e})") from None


def load(state: dict, path) -> None:
    """dcp.load into a (sharded) state dict, on every rank of the default group."""
    read_metadata(path)  # refuses a doubtful index here, not wrapped in DCP's collective error
    with one_line_errors():
        dcp.load(state, storage_reader=Reader(str(path)), planner=Planner())


def read_whole(path) -> dict:
    """A whole checkpoint folder into this one process (no process group), nested as it was saved."""
    # what torch's own whole-folder reader (_load_state_dict_from_keys) does, with the planner above
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    read_metadata(path)
    state: dict = {}
    with one_line_errors():
        _load_state_dict(state, storage_reader=Reader(str(path)), planner=WholePlanner(), no_dist=True)
    return state
