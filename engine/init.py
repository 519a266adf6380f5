"""Initial weights that do not depend on how the model is sharded.

Each parameter is drawn whole, on the CPU, from its own generator seeded by (seed, its name), and a parameter
that FSDP sharded (a DTensor) keeps the slice of that tensor its rank holds. So 1 process and any number of
ranks start from the same weights bit for bit, and no rank ever holds more than one whole parameter besides
its shards. Why whole tensors rather than drawing only the local rows: torch's CPU generator has no offset to
jump to row k of a normal_ stream, so a shard's values would depend on where the shard starts. The cost is CPU
time, every rank drawing every parameter (measured in the meta branch's report: well under the time a rank-0
build and broadcast took). Why a generator per name rather than one stream: on the meta device nothing is
drawn while the model is built, and the order parameters are visited in must not matter.
"""

import hashlib
from typing import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

# Wrappers the engine puts around blocks (engine/blocks.py): not part of a parameter's name in the state_dict
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def parameter_seed(seed: int, name: str) -> int:
    """63 bits from (seed, the parameter's state_dict name)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def init_parameter(param: torch.Tensor, name: str, seed: int,
                   fill: Callable[[torch.Tensor, torch.Generator], None]) -> None:
    """fill(tensor, generator) writes the initial values of parameter `name` into a whole CPU tensor of its
    shape; `param` gets them, or, sharded, its rank's slice of them."""
    whole = torch.empty(param.shape, dtype=param.dtype)
    fill(whole, torch.Generator().manual_seed(parameter_seed(seed, name)))
    copy_whole(param, whole)


@torch.no_grad()
def copy_whole(param: torch.Tensor, whole: torch.Tensor) -> None:
    """param = whole, or, when FSDP sharded param (a DTensor), this rank's slice of whole."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank cuts its own slice out of its own whole copy, no communication
        whole = distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(whole)


def build_initialised(phase, cfg) -> torch.nn.Module:
    """One process's model on the CPU: built on the meta device, then given its initial weights for cfg.seed
    by its own init_weights, as each rank gives its shards (engine/distributed.py build_sharded_model)."""
    with torch.device("meta"):
        model = phase.build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights(cfg.seed)
    return model
