"""Llama-style decoder: RMSNorm, RoPE, SwiGLU; embeddings untied unless tie_embeddings, dense or tensor-train.

Module and parameter names follow transformers' LlamaForCausalLM (embed_tokens, layers.N.self_attn.q_proj,
mlp.gate_proj, input_layernorm, norm, lm_head), so export to Hugging Face is a rename: see export.py.
The model knows nothing of training: it takes a `ModelArgs` (backends already chosen), and the engine applies
checkpointing, torch.compile and sharding to its blocks from outside. A block's token mixer is a parameter:
attention here, linear attention in phase 8. The same blocks serve bidirectional phases (mdm) with causal=False.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.init import init_parameter
from kernels.hyperbolic import expmap0, hyperbolic_attention_reference
from phases.phase7.tt_embedding import TTEmbedding


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int  # SwiGLU hidden size
    max_seq_len: int  # RoPE tables are built for this many positions
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    causal: bool = True
    attention: str = "sdpa"  # the backend to run: triton | sdpa | eager | flash_attn
    rms_norm: str = "torch"  # triton | torch
    fused_projections: bool = True  # q/k/v and gate/up as one matmul each in training
    embedding: str = "dense"  # dense | tt (tensor-train cores, tt_embedding.py)
    tt_rank: int = 0  # the TT cores' rank, with embedding=tt
    tie_embeddings: bool = False  # the output head is the input embedding's table (no lm_head of its own)
    attention_geometry: str = "euclidean"  # euclidean | hyperbolic (kernels/hyperbolic.py)
    curvature: float = 1.0  # hyperbolic: the scheduled curvature a new model starts at (the engine sets it per step)
    curvature_learned: bool = False  # hyperbolic: a learned per-kv-head factor on the scheduled curvature

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def dense_flops_per_token(non_embedding_params: int, n_layers: int, d_model: int, n_seq: int) -> float:
    """Training FLOPs per token of a dense Transformer: 6 N (N without the input embedding; forward 2, backward
    4 per weight) + 12 L d S for the attention scores and their use (PaLM's MFU convention)."""
    return 6 * non_embedding_params + 12 * n_layers * d_model * n_seq


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


def repeat_kv(k, v, n_heads: int):
    """Grouped-query k, v (B, S, kv_heads, D) with each head repeated for its group of n_heads // kv_heads query
    heads, for attention code that needs one k, v head per query head (the Triton kernel reads groups directly)."""
    if k.shape[2] == n_heads:
        return k, v
    group = n_heads // k.shape[2]
    return k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)


def attention(q, k, v, causal: bool, backend: str, mask=None):
    """q, k, v: (B, S, H, D) -> (B, S, H, D). `mask` (bool, True = attend) overrides `causal`.

    k and v may have fewer (grouped) heads than q. The Triton kernel needs CUDA tensors; elsewhere, and for
    masked decoding steps, SDPA runs.
    """
    if mask is None and backend == "triton" and q.is_cuda:
        from kernels.attention import flash_attention
        return flash_attention(q, k, v, causal=causal)  # grouped heads natively: no copy of k, v
    if mask is None and backend == "flash_attn":
        from flash_attn import flash_attn_func
        return flash_attn_func(q, k, v, causal=causal)
    k, v = repeat_kv(k, v, q.shape[2])
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
    """One attention layer's preallocated keys and values for incremental decoding."""

    def __init__(self, batch, max_len, n_kv_heads, head_dim, device, dtype):
        self.k = torch.zeros((batch, max_len, n_kv_heads, head_dim), device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k, v):
        end = start + k.shape[1]
        self.k[:, start:end] = k
        self.v[:, start:end] = v
        return self.k[:, :end], self.v[:, :end]


def fused_linear(x, *linears):
    """x through several bias-free projections as one matmul, split back: one wide GEMM instead of several
    narrow ones reading x again (and, in backward, one dx instead of a sum). Parameters stay separate, so
    checkpoints and the Hugging Face export keep one weight per projection. Training only: when decoding a
    token at a time, copying the weights together costs more than the matmuls it merges."""
    weight = torch.cat([linear.weight for linear in linears])
    return F.linear(x, weight).split([linear.out_features for linear in linears], dim=-1)


class Attention(nn.Module):
    """Multi-head (grouped-query) attention with RoPE: the token mixer of phase 7's blocks. With
    attention_geometry=hyperbolic the scores are -beta d_c(q, k) on a hyperboloid (kernels/hyperbolic.py): beta is
    learned per query head; the curvature is the buffer curvature_scale (the schedule's value, set by the engine
    each step and saved with the weights) times a learned per-kv-head factor when curvature_learned."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fused = args.fused_projections
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.causal, self.backend = args.causal, args.attention
        self.q_proj = nn.Linear(args.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.d_model, bias=False)
        self.hyperbolic = args.attention_geometry == "hyperbolic"
        if self.hyperbolic:
            self.log_beta = nn.Parameter(torch.zeros(self.n_heads))
            self.log_curvature = nn.Parameter(torch.zeros(self.n_kv_heads)) if args.curvature_learned else None
            self.register_buffer("curvature_scale", torch.tensor(float(args.curvature)))

    def curvature(self) -> torch.Tensor:
        """This step's curvature per kv head: the scheduled value, times the learned factor if any."""
        if self.log_curvature is None:
            return self.curvature_scale.expand(self.n_kv_heads)
        return self.curvature_scale * self.log_curvature.exp()

    def hyperbolic_attention(self, q, k, v, mask):
        """q, k mapped onto the hyperboloid, softmax(-beta d_c(q, k)) v: our Triton kernel on CUDA (unmasked
        calls), the PyTorch reference elsewhere."""
        c, beta = self.curvature(), self.log_beta.exp()
        q_s, q0 = expmap0(q, c.repeat_interleave(self.n_heads // self.n_kv_heads))
        k_s, k0 = expmap0(k, c)
        if mask is None and self.backend == "triton" and q.is_cuda:
            from kernels.attention import hyperbolic_flash_attention
            return hyperbolic_flash_attention(q_s, k_s, q0, k0, v, c, beta, causal=self.causal)
        return hyperbolic_attention_reference(q_s, k_s, q0, k0, v, c, beta, self.causal, mask)

    def project(self, x, rope):
        """q, k, v (B, S, heads, head_dim) of x (B, S, d), RoPE applied to q and k."""
        B, S, _ = x.shape
        cos, sin = rope
        if self.fused and self.training:
            q, k, v = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rope(q.view(B, S, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(B, S, self.n_kv_heads, self.head_dim), cos, sin)
        return q, k, v.view(B, S, self.n_kv_heads, self.head_dim)

    def forward(self, x, rope, cache: KVCache | None = None, start: int = 0):
        """x (B, S, d); rope = (cos, sin) of positions start..start+S-1; cache: this layer's, when decoding."""
        B, S, _ = x.shape
        q, k, v = self.project(x, rope)
        mask = None
        if cache is not None:
            k, v = cache.update(start, k, v)
            if start > 0 and self.causal:
                # New queries sit at positions start..start+S-1 of a longer key sequence.
                positions = torch.arange(k.shape[1], device=x.device)
                mask = positions[None, :] <= (start + torch.arange(S, device=x.device))[:, None]
        if self.hyperbolic:
            out = self.hyperbolic_attention(q, k, v, mask)
        else:
            out = attention(q, k, v, self.causal, self.backend, mask)
        return self.o_proj(out.reshape(B, S, -1))

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, max_len, self.n_kv_heads, self.head_dim, device, dtype)


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
    """Pre-norm block: x + mixer(norm(x)), then + SwiGLU(norm(.)). The mixer (attention, linear attention, ...)
    takes (x, rope, cache, start) and makes its own decoding cache with new_cache(batch, max_len, device, dtype)."""

    def __init__(self, args: ModelArgs, mixer: nn.Module):
        super().__init__()
        triton_norm = args.rms_norm == "triton"
        self.input_layernorm = RMSNorm(args.d_model, args.norm_eps, triton_norm)
        self.self_attn = mixer
        self.post_attention_layernorm = RMSNorm(args.d_model, args.norm_eps, triton_norm)
        self.mlp = SwiGLU(args.d_model, args.ffn_dim, args.fused_projections)

    def forward(self, x, rope, cache=None, start: int = 0):
        mixed = self.self_attn(self.input_layernorm(x), rope, cache, start)
        normed, x = self.post_attention_layernorm(mixed, residual=x)
        return x + self.mlp(normed)


# (args, layer index) -> a block's token mixer
MixerFactory = Callable[[ModelArgs, int], nn.Module]


def attention_mixer(args: ModelArgs, layer: int) -> nn.Module:
    return Attention(args)


class Transformer(nn.Module):
    """Embedding, blocks, final norm, output head: the LanguageModel (phases/__init__.py) of phases 7 and mdm."""

    def __init__(self, args: ModelArgs, mixer: MixerFactory = attention_mixer):
        super().__init__()
        self.args = args
        if args.embedding == "tt":
            self.embed_tokens = TTEmbedding(args.vocab_size, args.d_model, args.tt_rank, args.init_std)
        else:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList(Block(args, mixer(args, i)) for i in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps, args.rms_norm == "triton")
        # Tied: the head is the embedding's table (output_weight), so no module and no state_dict key of its own.
        self.lm_head = None if args.tie_embeddings else nn.Linear(args.d_model, args.vocab_size, bias=False)
        # RoPE tables, computed by init_weights
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim), persistent=False)
        if not self.norm.weight.is_meta:  # on the meta device the engine calls init_weights once sharded
            self.init_weights(seed=int(torch.randint(2**62, (), device="cpu")))  # seeded by the torch RNG

    def init_weights(self, seed: int):
        """The RoPE tables, and every parameter from a generator seeded by (seed, its name), whole or as this
        rank's shard, so the weights do not depend on the sharding (engine/init.py)."""
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for module in self.modules():  # hyperbolic attention's scheduled curvature, until the engine sets it
            if getattr(module, "curvature_scale", None) is not None:
                module.curvature_scale.fill_(self.args.curvature)
        for name, p in self.named_parameters():
            init_parameter(p, name, seed, lambda tensor, generator: self.initial_values(name, tensor, generator))

    def initial_values(self, name: str, tensor: torch.Tensor, generator: torch.Generator):
        """GPT-2 init of parameter `name`: N(0, 0.02), residual projections scaled down by depth, vectors
        (norms) ones, hyperbolic attention's log-scales zeros; TT cores so that the table they stand for has the
        same std (TTEmbedding.core_std)."""
        std = self.args.init_std
        if isinstance(self.embed_tokens, TTEmbedding) and name.startswith("embed_tokens."):
            tensor.normal_(0, self.embed_tokens.core_std(std), generator=generator)
        elif name.endswith((".log_beta", ".log_curvature")):  # hyperbolic attention's beta and factor start at 1
            tensor.zero_()
        elif tensor.ndim == 1:
            tensor.fill_(1)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.normal_(0, std / math.sqrt(2 * self.args.n_layers), generator=generator)
        else:
            tensor.normal_(0, std, generator=generator)

    def input_embedding(self) -> nn.Module | None:
        """The input embedding, which FSDP shards as a unit of its own; None when the head is its table."""
        return None if self.lm_head is None else self.embed_tokens

    def hidden_states(self, idx, cache: list | None = None, start: int = 0):
        """Final-normed hidden states (B, S, d); the objective applies output_weight() (possibly fused).
        cache: new_cache()'s per-layer caches when decoding, with idx at positions start..start+S-1."""
        S = idx.shape[1]
        if start + S > self.args.max_seq_len:
            raise ValueError(f"sequence of {start + S} tokens exceeds n_seq={self.args.max_seq_len}")
        rope = (self.rope_cos[start:start + S], self.rope_sin[start:start + S])
        x = self.embed_tokens(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if cache is None else cache[i], start)
        return self.norm(x)

    def output_weight(self) -> torch.Tensor:
        """The output head's (vocab, d) weight: lm_head's, or when tied the embedding's table (a TT one is
        materialised from its cores at each call, with the gradient flowing back into them)."""
        if self.lm_head is not None:
            return self.lm_head.weight
        if isinstance(self.embed_tokens, TTEmbedding):
            return self.embed_tokens.full_table()
        return self.embed_tokens.weight

    def forward(self, idx, cache: list | None = None, start: int = 0):
        return F.linear(self.hidden_states(idx, cache, start), self.output_weight())

    def new_cache(self, batch: int, max_len: int) -> list:
        p = self.norm.weight
        return [layer.self_attn.new_cache(batch, max_len, p.device, p.dtype) for layer in self.layers]

    def num_params(self, exclude_embedding: bool = True) -> int:
        """Distinct parameters (a tied table counts once). exclude_embedding gives the N of C = 6 N D: the
        weights each token is multiplied by, so the input embedding (a lookup) is left out whatever its kind,
        and the output head counts as its vocab x d matrix however it is stored: lm_head's own weight, the
        tied dense table (counted once, as the head), or the tied TT table materialised from its cores."""
        n = sum(p.numel() for p in self.parameters())
        if not exclude_embedding:
            return n
        n -= sum(p.numel() for p in self.embed_tokens.parameters())
        return n + self.args.vocab_size * self.args.d_model if self.lm_head is None else n

    def flops_per_token(self, n_seq: int) -> float:
        """dense_flops_per_token, plus a TT embedding's lookup matmuls (dense lookups cost no FLOPs). A tied TT
        head's per-step materialisation (6 V d R (1 + R / (v3 d3)) FLOPs per micro-step, forward and backward)
        is left out: per token it is R / (tokens per micro-step) of the head's own 6 V d, e.g. 6% at R 64 and
        1024 tokens, and this count is per token of a sequence, not of a micro-batch."""
        flops = dense_flops_per_token(self.num_params(), self.args.n_layers, self.args.d_model, n_seq)
        if isinstance(self.embed_tokens, TTEmbedding):
            flops += self.embed_tokens.lookup_flops_per_token()
        return flops

    def describe(self) -> str:
        attention = self.args.attention
        if self.args.attention_geometry == "hyperbolic":
            attention = f"hyperbolic ({'triton' if attention == 'triton' else 'PyTorch reference'}" + \
                (", learned curvature)" if self.args.curvature_learned else ")")
        parts = [f"attention {attention}", f"rms_norm {self.args.rms_norm}"]
        if isinstance(self.embed_tokens, TTEmbedding):
            e = self.embed_tokens
            parts.append(f"embedding tt rank {e.rank} ({' x '.join(map(str, e.vocab_factors))} by "
                         f"{' x '.join(map(str, e.dim_factors))}, {sum(p.numel() for p in e.parameters()):,} params)")
        if self.lm_head is None:
            parts.append("tied output head")
        return " | ".join(parts)
