"""Peak host memory (RSS) per rank of building a model sharded over the ranks, as `make train NPROC=N` does,
on CPU processes (gloo): what per-rank init on the meta device saves against building the whole model once.
Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 -m bench.sharded_build_memory [key=value
...] (phase 7 config overrides)."""

import resource
import sys
import time

import torch

from engine.blocks import apply_to_blocks
from engine.distributed import build_sharded_model, init_world, shutdown
from phases import get_phase, load_config


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(overrides: list[str]) -> None:
    world, device = init_world(torch.device("cpu"))
    cfg = load_config(None, ["data=dummy", *overrides])
    before = peak_rss_mib()
    start = time.perf_counter()
    model = build_sharded_model(get_phase(cfg.phase), cfg, device, world, lambda m: apply_to_blocks(m, cfg, device))
    seconds = time.perf_counter() - start
    whole = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20  # a DTensor counts whole
    print(f"rank {world.rank}: model {whole:.0f} MiB whole, peak RSS {before:.0f} MiB before the build and "
          f"{peak_rss_mib():.0f} MiB after, build {seconds:.1f} s", file=sys.stderr, flush=True)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
