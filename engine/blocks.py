"""What the engine applies to a model's blocks from outside the model: torch.compile and activation
checkpointing, one block at a time (the model stays free of training concerns; see phases/__init__.py).

Per block rather than the whole model: objectives call hidden_states and lm_head directly, and memory mode's
per-parameter updates need each block's gradients as its backward finishes, not all at the end of one graph.
"""

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from engine.config import Config


def compile_blocks(model) -> None:
    for block in model.layers:
        block.compile()


def checkpoint_blocks(model) -> None:
    """Recompute each block's activations in backward instead of keeping them. The wrapper leaves state_dict
    keys as they were, so checkpoints do not depend on this switch."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_to_blocks(model, cfg: Config, device: torch.device) -> None:
    """use_compile (CUDA only), then use_gradient_checkpointing around each compiled block."""
    if cfg.use_compile:
        if device.type == "cuda":
            compile_blocks(model)
        else:
            print("use_compile ignored on CPU")
    if cfg.use_gradient_checkpointing:
        checkpoint_blocks(model)
