"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, untied embeddings.

Module and parameter names follow transformers' LlamaForCausalLM (embed_tokens, layers.N.self_attn.q_proj,
mlp.gate_proj, input_layernorm, norm, lm_head), so export to Hugging Face is a rename: see export.py.
The same blocks serve bidirectional phases (mdm) with causal=False.
"""

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.config import Config, ConfigError
from kernels.support import ATTENTION_HEAD_DIMS, triton_available



def attention_backend(cfg: Config) -> str:
    """The backend the model will really use: attention=triton falls back to SDPA where the Triton kernels
    cannot run (no CUDA, no triton package, a head size they do not support); use_flash_attention=false
    forces SDPA, as in the seed."""
    if not cfg.use_flash_attention:
        return "sdpa"
    if cfg.attention == "triton":
        return "triton" if triton_available() and cfg.d_model // cfg.n_heads in ATTENTION_HEAD_DIMS else "sdpa"
    if cfg.attention == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attention=flash_attn but flash-attn is not installed: "
                          "pip install flash-attn --no-build-isolation, or use attention=triton")
    return cfg.attention


def norm_backend(cfg: Config) -> str:
    """rms_norm=triton runs kernels/norm.py where Triton can run, the PyTorch RMSNorm elsewhere."""
    return "triton" if cfg.rms_norm == "triton" and triton_available() else "torch"


def ffn_dim_for(cfg: Config) -> int:
    """SwiGLU width: explicit, or 8/3 d rounded up to a multiple of 256 (Llama's rule)."""
    if cfg.ffn_dim:
        return cfg.ffn_dim
    return 256 * math.ceil(8 * cfg.d_model / 3 / 256)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, use_triton: bool = False):
        super().__init__()
        self.eps = eps
        self.use_triton = use_triton  # the Triton kernel runs on CUDA tensors only
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        """norm(x); given a residual, (norm(x + residual), x + residual), one pass over memory with Triton."""
        if self.use_triton and x.is_cuda:
            from kernels.norm import rms_norm, rms_norm_residual
            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return rms_norm_residual(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            return self.forward(x), x
        # Llama semantics: normalise in fp32, cast back, then scale.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_len, head_dim) in the rotate-half layout that HF Llama uses."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x: (B, S, H, D); cos/sin: (S, D)."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(q, k, v, causal: bool, backend: str, mask=None):
    """q, k, v: (B, S, H, D) -> (B, S, H, D). `mask` (bool, True = attend) overrides `causal`.

    The Triton kernel needs CUDA tensors; elsewhere, and for masked decoding steps, SDPA runs.
    """
    if mask is None and backend == "triton" and q.is_cuda:
        from kernels.attention import flash_attention
        return flash_attention(q, k, v, causal=causal)
    if mask is None and backend == "flash_attn":
        from flash_attn import flash_attn_func
        return flash_attn_func(q, k, v, causal=causal)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "eager":
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if mask is None and causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.float().softmax(-1).type_as(q) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return out.transpose(1, 2)


class KVCache:
    """Preallocated keys and values for incremental decoding, one slot per layer."""

    def __init__(self, n_layers, batch, max_len, n_kv_heads, head_dim, device, dtype):
        shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, start: int, k, v):
        end = start + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


def fused_linear(x, *linears):
    """x through several bias-free projections as one matmul, split back: one wide GEMM instead of several
    narrow ones reading x again (and, in backward, one dx instead of a sum). Parameters stay separate, so
    checkpoints and the Hugging Face export keep one weight per projection. Training only: when decoding a
    token at a time, copying the weights together costs more than the matmuls it merges."""
    weight = torch.cat([linear.weight for linear in linears])
    return F.linear(x, weight).split([linear.out_features for linear in linears], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Config, causal: bool, backend: str):
        super().__init__()
        self.fused = cfg.fused_projections
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.causal = causal
        self.backend = backend
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=0, start=0):
        B, S, _ = x.shape
        if self.fused and self.training:
            q, k, v = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rope(q.view(B, S, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, S, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(B, S, self.n_kv_heads, self.head_dim)
        mask = None
        causal = self.causal
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
            if start > 0 and causal:
                # New queries sit at positions start..start+S-1 of a longer key sequence.
                positions = torch.arange(k.shape[1], device=x.device)
                mask = positions[None, :] <= (start + torch.arange(S, device=x.device))[:, None]
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        out = attention(q, k, v, causal, self.backend, mask)
        return self.o_proj(out.reshape(B, S, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, fused: bool):
        super().__init__()
        self.fused = fused
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        if self.fused and self.training:
            gate, up = fused_linear(x, self.gate_proj, self.up_proj)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: Config, causal: bool, backend: str, triton_norm: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, triton_norm)
        self.self_attn = Attention(cfg, causal, backend)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, triton_norm)
        self.mlp = SwiGLU(cfg.d_model, ffn_dim_for(cfg), cfg.fused_projections)

    def forward(self, x, cos, sin, cache=None, layer=0, start=0):
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start)
        normed, x = self.post_attention_layernorm(attn_out, residual=x)
        return x + self.mlp(normed)


class Transformer(nn.Module):
    def __init__(self, cfg: Config, causal: bool = True, vocab_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.vocab_size = vocab_size or cfg.vocab_size
        self.attention_backend = attention_backend(cfg)
        self.norm_backend = norm_backend(cfg)
        triton_norm = self.norm_backend == "triton"
        self.embed_tokens = nn.Embedding(self.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, causal, self.attention_backend, triton_norm)
                                    for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, triton_norm)
        self.lm_head = nn.Linear(cfg.d_model, self.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.n_seq, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = cfg.use_gradient_checkpointing
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2 init: N(0, 0.02), residual projections scaled down by depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, std=std)

    def hidden_states(self, idx, cache: KVCache | None = None, start: int = 0):
        """Final-normed hidden states (B, S, d); the objective applies lm_head (possibly fused)."""
        S = idx.shape[1]
        if start + S > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {start + S} tokens exceeds n_seq={self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        x = self.embed_tokens(idx)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i, start)
        return self.norm(x)

    def forward(self, idx, cache: KVCache | None = None, start: int = 0):
        return self.lm_head(self.hidden_states(idx, cache, start))

    def compile_blocks(self) -> None:
        """torch.compile each block in place rather than the whole model: the objective calls
        hidden_states and lm_head directly, checkpointing wraps blocks, and memory mode's per-parameter
        updates need gradients as each block's backward finishes, not all at the end of one big graph."""
        for layer in self.layers:
            layer.compile()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        attn = self.layers[0].self_attn
        p = self.lm_head.weight
        return KVCache(len(self.layers), batch, max_len, attn.n_kv_heads, attn.head_dim, p.device, p.dtype)

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embedding else n

    def flops_per_token(self, n_seq: int) -> float:
        """Training FLOPs per token: 6 N (N without the input embedding) + 12 L d S for attention."""
        return 6 * self.num_params() + 12 * self.cfg.n_layers * self.cfg.d_model * n_seq
