"""Phase 7's config keys (model shape, kernels, objective switches) and how they become the model's ModelArgs."""

import importlib.util
import math
from dataclasses import dataclass
from typing import ClassVar

from engine.config import Config, ConfigError, choose
from kernels.hyperbolic import SCHEDULES, curvature_at
from kernels.support import ATTENTION_HEAD_DIMS, RMS_NORM_MAX_HIDDEN, triton_available
from phases.phase7.model import ModelArgs
from phases.phase7.tt_embedding import tt_shape

# A checkpoint saved before embedding/tt_rank/tie_embeddings/attention_geometry/curvature_learned existed reads
# their defaults: dense, untied, euclidean.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "embedding", "tt_rank",
              "tie_embeddings", "attention_geometry", "curvature_learned")


@dataclass
class Phase7Config(Config):
    # The seed's switch: use_flash_attention=false is attention=sdpa; true leaves `attention` as it is.
    ALIASES: ClassVar[dict] = {"use_flash_attention": ("attention", {True: None, False: "sdpa"})}

    # --- model ---
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = n_heads (no grouped-query attention)
    ffn_dim: int = 0  # SwiGLU hidden size; 0 = 8/3 * d_model rounded up to a multiple of 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention: str = "triton"  # triton (SDPA where Triton cannot run) | sdpa | eager | flash_attn
    rms_norm: str = "triton"  # triton (PyTorch where Triton cannot run; fuses each block's residual add) | torch
    fused_projections: bool = True  # one matmul for q, k, v and one for gate, up (weights concatenated per call)
    embedding: str = "dense"  # dense | tt: the input table as three tensor-train cores (phases/phase7/tt_embedding.py)
    tt_rank: int = 0  # the TT rank with embedding=tt (required there, e.g. 16 or 64; 0 with dense)
    tie_embeddings: bool = False  # the output head is the input embedding's table (a TT one materialised per step)
    # Hyperbolic attention (kernels/hyperbolic.py; README "Hyperbolic attention"): scores -beta d_c(q, k) on the
    # hyperboloid of curvature -c, beta learned per head; the curvature follows curvature_schedule from
    # curvature_start to curvature over curvature_warmup_steps (a pure function of the step, like the learning rate),
    # times a learned per-kv-head factor when curvature_learned.
    attention_geometry: str = "euclidean"  # euclidean | hyperbolic
    curvature: float = 1.0  # c > 0: the curvature (-c) after warm-up, or throughout with curvature_schedule=constant
    curvature_learned: bool = False
    curvature_schedule: str = "constant"  # constant | linear | cosine
    curvature_start: float = 0.1  # linear/cosine: the curvature at step 0
    curvature_warmup_steps: int = 0  # linear/cosine: the steps from curvature_start to curvature

    # --- objective ---
    fused_cross_entropy: bool = True  # lm_head + cross-entropy in chunks of tokens: never the full logits

    def check(self) -> None:
        super().check()
        for key in ("d_model", "n_layers", "n_heads"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key '{key}' must be > 0, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("head size d_model/n_heads must be even for RoPE")
        kv_heads = self.n_kv_heads or self.n_heads
        if self.n_heads % kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({kv_heads})")
        choose(self, "attention", ["triton", "sdpa", "eager", "flash_attn"])
        choose(self, "rms_norm", ["triton", "torch"])
        choose(self, "embedding", ["dense", "tt"])
        if self.embedding == "tt":
            try:
                tt_shape(self.vocab_size, self.d_model, self.tt_rank)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        elif self.tt_rank:
            raise ConfigError(f"tt_rank={self.tt_rank} is for embedding=tt; this config has embedding=dense")
        choose(self, "attention_geometry", ["euclidean", "hyperbolic"])
        choose(self, "curvature_schedule", list(SCHEDULES))
        if self.attention_geometry == "hyperbolic":
            if self.attention != "triton":
                raise ConfigError(f"attention_geometry=hyperbolic runs our Triton kernel (its PyTorch reference where "
                                  f"Triton cannot run): set attention=triton, not {self.attention}")
            for key in ("curvature", "curvature_start"):
                if not getattr(self, key) > 0:
                    raise ConfigError(f"config key '{key}' must be > 0 (the hyperboloid's curvature is -c), "
                                      f"got {getattr(self, key)}")
            if self.curvature_schedule != "constant" and self.curvature_warmup_steps <= 0:
                raise ConfigError(f"curvature_schedule={self.curvature_schedule} needs curvature_warmup_steps > 0")


def scheduled_curvature(cfg: Phase7Config, step: int) -> float:
    """The curvature schedule's value at a step (0 before training)."""
    return curvature_at(step, cfg.curvature_schedule, cfg.curvature_start, cfg.curvature, cfg.curvature_warmup_steps)


def ffn_dim_for(cfg: Phase7Config) -> int:
    """SwiGLU width: explicit, or 8/3 d rounded up to a multiple of 256 (Llama's rule)."""
    if cfg.ffn_dim:
        return cfg.ffn_dim
    return 256 * math.ceil(8 * cfg.d_model / 3 / 256)


def attention_backend(cfg: Phase7Config) -> str:
    """The backend the model will really use: attention=triton falls back to SDPA where the Triton kernels
    cannot run (no CUDA, no triton package, a head size they do not support)."""
    if cfg.attention == "triton":
        return "triton" if triton_available() and cfg.d_model // cfg.n_heads in ATTENTION_HEAD_DIMS else "sdpa"
    if cfg.attention == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attention=flash_attn but flash-attn is not installed: "
                          "pip install flash-attn --no-build-isolation, or use attention=triton")
    return cfg.attention


def norm_backend(cfg: Phase7Config) -> str:
    """rms_norm=triton runs kernels/norm.py where Triton can run and a row fits its registers, the PyTorch
    RMSNorm elsewhere."""
    fits = cfg.d_model <= RMS_NORM_MAX_HIDDEN
    return "triton" if cfg.rms_norm == "triton" and triton_available() and fits else "torch"


def model_args(cfg: Phase7Config, causal: bool = True, vocab_size: int | None = None) -> ModelArgs:
    return ModelArgs(
        vocab_size=vocab_size or cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads or cfg.n_heads, ffn_dim=ffn_dim_for(cfg), max_seq_len=cfg.n_seq,
        rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps, init_std=cfg.init_std, causal=causal,
        attention=attention_backend(cfg), rms_norm=norm_backend(cfg), fused_projections=cfg.fused_projections,
        embedding=cfg.embedding, tt_rank=cfg.tt_rank, tie_embeddings=cfg.tie_embeddings,
        attention_geometry=cfg.attention_geometry, curvature=scheduled_curvature(cfg, 0),
        curvature_learned=cfg.curvature_learned)
