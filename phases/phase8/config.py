"""Phase 8's config keys (which blocks mix tokens how) on top of phase 7's, and how they become Phase8Args."""

import dataclasses
from dataclasses import dataclass

from engine.config import ConfigError, choose
from kernels.support import LINEAR_ATTENTION_HEAD_DIMS, triton_available
from phases.phase7.config import SHAPE_KEYS as PHASE7_SHAPE_KEYS
from phases.phase7.config import Phase7Config, model_args
from phases.phase8.model import Phase8Args

# hybrid_every decides which blocks have attention's weights and which linear attention's; short_conv adds weights
SHAPE_KEYS = PHASE7_SHAPE_KEYS + ("hybrid_every", "short_conv")


@dataclass
class Phase8Config(Phase7Config):
    # --- token mixing (the rest of the block is phase 7's) ---
    # every k-th block (k, 2k, ...) keeps softmax attention; 0 = every block linear, the default bench/RESULTS.md
    # (bench-phase8-variants) chose: at equal steps no hybrid beat it
    hybrid_every: int = 0
    sliding_window: int = 0  # those softmax blocks see only the last N tokens (O(S N), fixed decoding memory); 0 = all
    linear_attention: str = "triton"  # triton (the chunked PyTorch form where Triton cannot run) | torch
    # width of a causal depthwise convolution on q, k, v of linear blocks; 0 = none (measured no better on data-lite)
    short_conv: int = 0

    def check(self) -> None:
        super().check()
        for key in ("hybrid_every", "sliding_window", "short_conv"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{key}' must be >= 0, got {getattr(self, key)}")
        if self.sliding_window and not self.hybrid_every:
            raise ConfigError(f"sliding_window={self.sliding_window} applies to the softmax blocks of a hybrid: "
                              "set hybrid_every too (e.g. hybrid_every=2), or sliding_window=0")
        choose(self, "linear_attention", ["triton", "torch"])
        if self.attention_geometry != "euclidean":
            raise ConfigError("attention_geometry=hyperbolic is for phase 7 and mdm; phase 8's softmax blocks are "
                              "euclidean")


def linear_attention_backend(cfg: Phase8Config) -> str:
    """linear_attention=triton runs kernels/linear_attention.py on CUDA with the head sizes it compiles for, and
    the chunked PyTorch form elsewhere (as attention=triton falls back to SDPA)."""
    head_dim = cfg.d_model // cfg.n_heads
    if cfg.linear_attention == "triton" and triton_available() and head_dim in LINEAR_ATTENTION_HEAD_DIMS:
        return "triton"
    return "torch"


def phase8_args(cfg: Phase8Config) -> Phase8Args:
    return Phase8Args(**dataclasses.asdict(model_args(cfg, causal=True)), hybrid_every=cfg.hybrid_every,
                      sliding_window=cfg.sliding_window, linear_attention=linear_attention_backend(cfg),
                      short_conv=cfg.short_conv)
