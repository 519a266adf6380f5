"""Under torchrun: build each config's model sharded, as a training run would, and have rank 0 save the
initial weights gathered whole, for tests/test_distributed.py to compare with one process's.
Usage: python -m torch.distributed.run ... -m tests.initial_weights OUT.pt CONFIGS_JSON (a list of arg lists)."""

import json
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from engine.blocks import apply_to_blocks
from engine.distributed import build_sharded_model, init_world, shutdown
from phases import get_phase, load_config


def main(out: str, configs: str) -> None:
    world, device = init_world(torch.device("cpu"))
    weights = []
    for args in json.loads(configs):
        cfg = load_config(None, args)
        model = build_sharded_model(get_phase(cfg.phase), cfg, device, world,
                                    lambda m, cfg=cfg: apply_to_blocks(m, cfg, device))
        whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        weights.append({"params": whole, "buffers": {n: b.clone() for n, b in model.named_buffers()}})
    if world.rank == 0:
        torch.save(weights, out)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
