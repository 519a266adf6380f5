"""One run on several processes: torchrun's environment, FSDP2 sharding per block, and the few collectives the
loop needs. A plain `python -m engine.train` has no torchrun environment: init_world() returns World(), one
process, and every helper here leaves a tensor as it is.

Under torchrun (`make train ... NPROC=8`):
- init_world(): the process group (gloo on CPU, NCCL on CUDA), this rank's device (cuda:LOCAL_RANK), and
  stdout silenced on every rank but 0, so one process prints the log.
- build_sharded_model(): the model is built on the meta device (no memory), the engine's per-block wrappers
  applied, each block and the input embedding, then the root (final norm and head) wrapped with FSDP2's
  fully_shard, each rank allocating only its shards and initialising them with the model's own
  init_weights: each parameter drawn whole from (seed, its name), the rank keeping its slice (engine/init.py),
  so 2 ranks start from exactly the weights 1 process would and nothing ever holds the whole model; a resumed
  run then loads its shards from the checkpoint.
- World.mean(): the loss and eval loss averaged over ranks, so the non-finite-step skip, logs and best
  checkpoint are decided from the same value on every rank. The gradient norm needs nothing: FSDP's gradients
  are DTensors and clip_grad_norm_ over them is the global norm (engine/optim.py).
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from engine.config import Config, ConfigError


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank `rank` of `size`; `active` when torchrun started it."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    active: bool = False

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of a scalar tensor over the ranks (a copy; the value itself on one process)."""
        if not self.active:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.size


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """(World(), device) for a plain process; under torchrun, join the process group (once per process) and
    move to this rank's GPU."""
    if not launched_by_torchrun():
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), True)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    if world.rank != 0:
        sys.stdout = open(os.devnull, "w")  # errors still reach stderr, with the rank in them (engine/cli.py)
    return world, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_supported(cfg: Config) -> None:
    """What a sharded run cannot do, said before anything is built."""
    if cfg.memory_mode:
        raise ConfigError("memory_mode=true does not run with FSDP (NPROC / torchrun): set memory_mode=false. "
                          "Its updates run inside backward on whole gradients; FSDP instead shards the weights, "
                          "gradients and AdamW states over the ranks, each rank holding 1/N of them")
    if cfg.micro_batch_size == "auto":
        raise ConfigError("micro_batch_size=auto probes the GPU with out-of-memory errors, which a sharded run "
                          "cannot recover from on one rank alone: find the size on one GPU (without NPROC) and "
                          "give micro_batch_size=N")


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's RNG (e.g. mdm's noise) from step `step` on: different on every rank, the same on
    every run."""
    from data.stream import mix64

    return int(mix64(seed, 0xD157, rank, step) >> np.uint64(1))  # 63 bits: what torch.manual_seed accepts


def shard(model: torch.nn.Module, cfg: Config, device: torch.device, world: World) -> None:
    """fully_shard each block and the input embedding, then the root (final norm, lm_head). With
    use_mixed_precision on CUDA the blocks compute in bf16 and gradients are reduced in fp32; the sharded fp32
    weights are what AdamW updates."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world.size,))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and cfg.use_mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=cfg.fsdp_reshard_after_forward, mp_policy=policy)
    # The input embedding as a unit of its own: in the root's, it would stay gathered from forward to the end of
    # backward.
    embedding = model.input_embedding()
    if embedding is not None:
        fully_shard(embedding, mesh=mesh, reshard_after_forward=cfg.fsdp_reshard_after_forward, mp_policy=policy)
    # The root holds the rest: the final norm and the output head (and a tied embedding), gathered from
    # hidden_states to the end of backward, as objectives apply output_weight() to hidden_states after forward.
    # The head is no unit of its own, nor grouped with the norm as torchtitan does: its forward never runs (the
    # objective reads its weight), and torch 2.11 then never gathered the group again after an evaluation.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    # Objectives call hidden_states, not forward: it must gather the root's parameters as forward would.
    register_fsdp_forward_method(model, "hidden_states")


def build_sharded_model(phase, cfg: Config, device: torch.device, world: World, wrap_blocks) -> torch.nn.Module:
    """The phase's model, sharded over the ranks without ever existing whole anywhere: built on the meta device
    (no memory), its blocks wrapped by wrap_blocks(model) (the engine's compile/checkpointing), sharded, each
    rank allocating only its shards, then initialised by the model's own init_weights (engine/init.py): the
    single-process initial weights for cfg.seed, or a checkpoint's loaded over them later."""
    with torch.device("meta"):
        model = phase.build_model(cfg)
    wrap_blocks(model)
    shard(model, cfg, device, world)
    model.to_empty(device=device)
    model.init_weights(cfg.seed)
    return model
