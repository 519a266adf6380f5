"""Phase 8: an O(N) linear-attention LM on phase 7's blocks (phases/phase8/model.py), next-token objective.

The objective is phase 7's. Sampling is phase 7's loop over per-layer caches, which here are fixed-size
recurrent states (and, in windowed hybrids, the window's keys): a model with no full-context attention decodes
with memory that does not grow with the text, and may run past n_seq.
"""

import torch

from phases import Phase
from phases.phase7 import generate as phase7_generate
from phases.phase7 import next_token_loss
from phases.phase8.config import SHAPE_KEYS, Phase8Config, phase8_args
from phases.phase8.model import LinearTransformer


def build_model(cfg: Phase8Config) -> LinearTransformer:
    return LinearTransformer(phase8_args(cfg))


@torch.no_grad()
def generate(model: LinearTransformer, prompt: torch.Tensor, settings, on_token=None):
    """Phase 7's sampler. Without full-context attention neither the prompt nor the answer is cut to n_seq."""
    model.extend_positions(prompt.shape[1] + settings.max_new_tokens + 1)
    return phase7_generate(model, prompt, settings, on_token)


PHASE = Phase(name="phase8", build_model=build_model, loss=next_token_loss, generate=generate,
              config=Phase8Config, shape_keys=SHAPE_KEYS)
