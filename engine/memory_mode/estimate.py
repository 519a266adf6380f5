"""What memory mode needs on the GPU, item by item, before a run tries it: make check-env reports it for the
1.44B recipe, make bench-phase7-1.5b MEM_GB=... beside the peak it measures."""

import math

import torch

from kernels.adamw_8bit_torch import BLOCK
from kernels.cross_entropy import default_chunk_tokens


def estimate_memory_mode_bytes(n_params: int, largest_param: int, d_model: int, n_layers: int, ffn_dim: int,
                               vocab_size: int, n_seq: int, batch_size: int = 1, accumulation_steps: int = 1,
                               budget: int = 8 * 2**30) -> dict:
    """Bytes on the GPU at the peak of a memory-mode step on CUDA (the Triton update, which keeps no fp32
    temporaries), by item, with `total` and `left` (of `budget`).

    Activations assume gradient checkpointing per block (one bf16 (B, S, d) input kept per block, one block's
    internals alive while it is recomputed and backpropagated, taken as twice its saved tensors) and the
    fused cross-entropy (one chunk of logits). Not counted: the CUDA context (~0.5 GB, outside PyTorch's
    allocator), cuBLAS workspaces and allocator fragmentation, which `left` must cover.

    The 1.44B model (1.4398e9 parameters; largest the 32000 x 2048 embedding; d 2048, 24 layers, SwiGLU 6144,
    S = 1024): weights 2.88e9 + 8-bit states 2.93e9 = 5.81e9 bytes. At micro-batch 1 without accumulation
    the peak is ~6.5e9, leaving 2.07e9 (1.9 GiB); that is room for micro-batch 4 to 6 without accumulation
    (1.3e9 to 0.8e9 left). Accumulating 16 micro-steps of 1 adds the 1.46e9 accumulator: ~8.0e9, leaving 0.6e9
    for the allocator's slack (fine when PyTorch's allocator is what counts; not on an 8 GB card, where the
    CUDA context takes most of it).
    """
    tokens = batch_size * n_seq
    blocks = math.ceil(n_params / BLOCK)
    items = {
        "weights_bf16": 2 * n_params,
        "adamw_states_8bit": 2 * (n_params + 4 * blocks),
        "grad_accumulator_8bit": (n_params + 4 * blocks) if accumulation_steps > 1 else 0,
        # the lm_head gradient (made in the loss's forward, applied in backward) and the one being applied
        "live_gradients": 2 * vocab_size * d_model + 2 * largest_param,
        "checkpointed_block_inputs": 2 * n_layers * tokens * d_model,
        "one_block_recomputed": 2 * 2 * tokens * (6 * d_model + 4 * ffn_dim),
        # a chunk's fp32 logits next to their bf16 copy (before the upcast, and after the gradient's downcast)
        "cross_entropy_chunk": min(tokens, default_chunk_tokens(vocab_size)) * vocab_size * (4 + 2),
    }
    items["total"] = sum(items.values())
    items["left"] = budget - items["total"]
    return items


def estimate_for_model(model: torch.nn.Module, cfg, budget: int = 8 * 2**30) -> dict:
    """estimate_memory_mode_bytes of a phase 7 shaped model (on any device, meta included) with its config's
    dims and batch: what make check-env reports for the 1.44B recipe and bench-phase7-1.5b --mem-gb puts beside
    the measured peak."""
    sizes = [p.numel() for p in model.parameters()]
    return estimate_memory_mode_bytes(sum(sizes), max(sizes), cfg.d_model, cfg.n_layers, cfg.ffn_dim, cfg.vocab_size,
                                      cfg.n_seq, cfg.batch_size, cfg.gradient_accumulation_steps, budget)
