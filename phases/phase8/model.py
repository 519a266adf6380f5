"""Phase 8: phase 7's blocks with a gated linear attention as the token mixer, optionally hybrid.

Every block is phase 7's Block (RMSNorm, mixer, RMSNorm, SwiGLU) with one of three mixers, chosen per layer:
    GatedLinearAttention     O(S) time, a fixed-size state when decoding (the default for every block)
    phase 7's Attention      every hybrid_every-th block, over the whole context
    SlidingWindowAttention   those blocks with sliding_window > 0: each token sees the last `window` tokens
The linear mixer is the scalar-decay member of the GLA / Mamba-2 / Gated DeltaNet family (Mamba-2's SSD, FLA's
"simple GLA"), the recurrence kernels/linear_attention.py computes: per head,
    S_t = exp(g_t) S_{t-1} + k_t^T v_t,    o_t = q_t S_t / sqrt(d_head).
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.linear_attention_torch import CHUNK, linear_attention_chunked_torch, linear_attention_step
from kernels.support import interpreter_requested
from phases.phase7.model import Attention, ModelArgs, RMSNorm, Transformer, attention, \
    fused_linear, repeat_kv, rope_tables

# Mamba-2's initial ranges: the decay rate A per head, and the step dt, log-uniform (see reset_decay).
A_RANGE = (1.0, 16.0)
DT_RANGE = (1e-3, 1e-1)


@dataclass(frozen=True)
class Phase8Args(ModelArgs):
    hybrid_every: int = 0  # every k-th layer (k-1, 2k-1, ... counting from 0) is softmax attention; 0 = none
    sliding_window: int = 0  # softmax layers attend to this many latest tokens; 0 = all
    linear_attention: str = "torch"  # the backend to run: triton | torch
    short_conv: int = 0  # causal depthwise convolution width on q, k, v; 0 = none

    def is_attention_layer(self, layer: int) -> bool:
        return self.hybrid_every > 0 and layer % self.hybrid_every == self.hybrid_every - 1

    @property
    def constant_memory(self) -> bool:
        """Whether decoding memory stays fixed as the text grows: no layer attends to the whole context."""
        return self.hybrid_every == 0 or self.sliding_window > 0


def mixing_flops_per_token(args: Phase8Args, n_seq: int, chunk: int = CHUNK) -> float:
    """Training FLOPs per token (forward + backward) of token mixing beyond the weights' 6 N, summed over layers.

    Softmax attention over S keys: 12 d S, PaLM's convention as phase 7 counts it (phases/phase7/model.py), with S
    the keys a query may see: n_seq, or the window. Linear attention in the chunked form, per head of key and value
    size D and chunks of C: forward 2 C D (scores in the chunk) + 2 C D (scores @ v) + 2 D^2 (q @ the chunk's
    state) + 2 D^2 (k^T v into the state), backward twice that: 12 C D + 12 D^2 per head, 12 d (C + D) per layer.
    No term grows with n_seq.
    """
    d, total = args.d_model, 0.0
    for layer in range(args.n_layers):
        if not args.is_attention_layer(layer):
            total += 12 * d * (min(chunk, n_seq) + args.head_dim)
        else:
            total += 12 * d * (min(n_seq, args.sliding_window) if args.sliding_window else n_seq)
    return total


class RecurrentState:
    """A linear-attention layer's decoding memory: the state (batch, heads, key_dim, value_dim) in float32 and the
    convolution's last inputs. Its size is fixed when made; the length decoded so far changes nothing."""

    def __init__(self, batch, heads, head_dim, conv_width, channels, device, dtype):
        self.state = torch.zeros((batch, heads, head_dim, head_dim), device=device, dtype=torch.float32)
        self.conv = torch.zeros((batch, max(conv_width - 1, 0), channels), device=device, dtype=dtype)

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.state, self.conv))


def linear_attention(q, k, v, g, backend: str, interpreted: bool = False, **kwargs):
    """The chunked forms: our Triton kernels on CUDA (or on CPU tensors in Triton's interpreter), else the same
    algorithm in PyTorch."""
    if backend == "triton" and (q.is_cuda or interpreted):
        from kernels.linear_attention import linear_attention as triton_linear_attention
        return triton_linear_attention(q, k, v, g, **kwargs)
    return linear_attention_chunked_torch(q, k, v, g, **kwargs)


@torch.no_grad()
def decay_or_conv_values(name: str, tensor: torch.Tensor, generator: torch.Generator | None) -> bool:
    """Fill a GatedLinearAttention parameter `name` (its name in the mixer) that is neither a projection nor a
    norm: Mamba-2's initial decay (see the class docstring), PyTorch's default convolution init. False, the
    tensor untouched, for any other."""
    if name == "A_log":
        tensor.copy_(torch.empty(tensor.shape).uniform_(*A_RANGE, generator=generator).log())
    elif name == "dt_bias":
        dt = torch.exp(torch.empty(tensor.shape).uniform_(math.log(DT_RANGE[0]), math.log(DT_RANGE[1]),
                                                          generator=generator))
        tensor.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    elif name == "conv.weight":
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)  # nn.Conv1d's own init
    else:
        return False
    return True


class GatedLinearAttention(nn.Module):
    """Linear attention with a per-head, data-dependent decay, an output norm and gate.

        q, k, v = silu(causal_conv(x W_q, x W_k, x W_v)), q and k L2-normalised per head
        g = -exp(A_log) * softplus(x W_a + dt_bias)            log decay per head and token, <= 0
        o = RMSNorm(linear_attention(q, k, v, g)) * silu(x W_g), then o_proj

    The decay is Mamba-2's: exp(g) = exp(-A dt) with A > 0 per head and dt = softplus(.) the data-dependent step:
    a token can hold the state (dt -> 0) or wipe it (dt large), which plain linear attention cannot, and which is
    most of the quality gap to softmax attention closed by GLA, Mamba-2 and Gated DeltaNet. Initially A is
    uniform in [1, 16] and dt log-uniform in [0.001, 0.1] (Mamba-2's ranges), so each head's decay per token
    starts between exp(-1.6) = 0.2 and 0.999: memories from about one token to about a thousand, spread over the
    heads, for training to move.
    q and k are L2-normalised (as in Gated DeltaNet): each token adds a rank-one k^T v of norm |v| and the state
    decays, so it stays bounded at any length, in bf16 at 128k tokens or when chat runs past the training length.
    The per-head RMSNorm and silu gate on the output (GLA's) restore the scale that normalisation and decay set.
    The short causal convolution (Mamba-2, Gated DeltaNet) mixes each position with the few before it, which
    a decaying sum alone does poorly (e.g. copying the previous token).
    No RoPE: the decay already weights key j for query i by exp(g_{j+1} + ... + g_i), a relative-position
    signal learnt per token, and a rotation of q and k by absolute position would have to be carried through
    the state; the recurrence has no position index at all, so nothing limits the length it runs at.
    """

    def __init__(self, args: Phase8Args):
        super().__init__()
        self.fused = args.fused_projections
        self.n_heads, self.head_dim, self.backend = args.n_heads, args.head_dim, args.linear_attention
        self.interpreted = interpreter_requested()  # read once here: forward stays free of environment lookups
        width = self.n_heads * self.head_dim
        self.qkv_proj = nn.Linear(args.d_model, 3 * width, bias=False)  # one matmul: the convolution takes all three
        self.g_proj = nn.Linear(args.d_model, width, bias=False)  # the output gate
        self.a_proj = nn.Linear(args.d_model, self.n_heads, bias=False)  # the decay's data-dependent step
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.conv_width = args.short_conv
        if self.conv_width:
            self.conv = nn.Conv1d(3 * width, 3 * width, self.conv_width, groups=3 * width, bias=False)
        self.o_norm = RMSNorm(self.head_dim, args.norm_eps)
        self.o_proj = nn.Linear(width, args.d_model, bias=False)
        if not self.A_log.is_meta:  # built alone (in a model, LinearTransformer.initial_values draws them)
            for name, p in self.named_parameters():
                decay_or_conv_values(name, p, generator=None)

    def log_decay(self, a):
        """g = -A softplus(a + dt_bias) in float32: (batch, seq, heads), <= 0."""
        return -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float())

    def short_conv(self, qkv, cache: RecurrentState | None):
        """Causal depthwise convolution over the sequence, continuing from the cache's last inputs when decoding."""
        if not self.conv_width:
            return qkv
        past = cache.conv.to(qkv.dtype) if cache is not None else qkv.new_zeros(
            (qkv.shape[0], self.conv_width - 1, qkv.shape[2]))
        padded = torch.cat([past, qkv], dim=1)
        if cache is not None:
            cache.conv = padded[:, padded.shape[1] - past.shape[1]:].clone()
        return F.conv1d(padded.transpose(1, 2), self.conv.weight, groups=qkv.shape[2]).transpose(1, 2)

    def forward(self, x, rope=None, cache: RecurrentState | None = None, start: int = 0):
        """x (B, S, d). rope and start are unused (see the class docstring); cache: this layer's, when decoding."""
        B, S, _ = x.shape
        projections = (self.qkv_proj, self.g_proj, self.a_proj)
        if self.fused and self.training:
            qkv, gate, a = fused_linear(x, *projections)
        else:
            qkv, gate, a = (projection(x) for projection in projections)
        qkv = F.silu(self.short_conv(qkv, cache))
        q, k, v = qkv.view(B, S, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = (F.normalize(t.float(), dim=-1, eps=1e-6).to(v.dtype) for t in (q, k))
        g = self.log_decay(a)
        if cache is None:
            o = linear_attention(q, k, v, g, self.backend, self.interpreted)
        elif S == 1:
            o, cache.state = linear_attention_step(q, k, v, g, cache.state)
        else:
            o, cache.state = linear_attention(q, k, v, g, self.backend, self.interpreted,
                                              initial_state=cache.state, output_final_state=True)
        o = self.o_norm(o.to(v.dtype)) * F.silu(gate.view(B, S, self.n_heads, self.head_dim))
        return self.o_proj(o.reshape(B, S, -1))

    def new_cache(self, batch: int, max_len: int, device, dtype) -> RecurrentState:
        """max_len is not needed: the state's size does not depend on the length."""
        return RecurrentState(batch, self.n_heads, self.head_dim, self.conv_width,
                              3 * self.n_heads * self.head_dim, device, dtype)


def sliding_window_attention(q, k, v, window: int):
    """Causal attention in which each query sees the `window` latest keys, itself included: O(S window).

    q, k, v: (B, S, H, D). The sequence is cut into blocks of `window`; each block's queries attend to its own
    keys and the previous block's, under a band mask, as one batched SDPA call: the (S, S) scores never exist.
    SDPA on every device (our Triton flash kernel has no window)."""
    B, S, H, D = q.shape
    pad = -S % window
    n = (S + pad) // window

    def blocks(t):  # (B, n, window, H, D)
        return F.pad(t, (0, 0, 0, 0, 0, pad)).view(B, n, window, H, D)

    def frames(t):  # each block after the one before it: (B, n, 2 window, H, D); block 0 follows zeros
        return torch.cat([F.pad(t, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1], t], dim=2)

    qb, kf, vf = blocks(q), frames(blocks(k)), frames(blocks(v))
    i = torch.arange(window, device=q.device)[:, None]
    j = torch.arange(2 * window, device=q.device)[None, :]
    band = (j > i) & (j <= i + window)  # query i of a block sees frame keys i+1 .. i+window
    mask = torch.stack([band & (j >= window), *[band] * (n - 1)])  # block 0 has no block before it
    mask = mask[None].expand(B, n, window, 2 * window).reshape(B * n, 1, window, 2 * window)

    def heads_first(t):
        return t.reshape(B * n, t.shape[2], H, D).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(qb), heads_first(kf), heads_first(vf), attn_mask=mask)
    return out.transpose(1, 2).reshape(B, n * window, H, D)[:, :S]


class WindowKVCache:
    """The keys and values of the last window - 1 positions (all a new token can see besides itself)."""

    def __init__(self, batch, window, n_kv_heads, head_dim, device, dtype):
        self.window = window
        self.k = torch.zeros((batch, 0, n_kv_heads, head_dim), device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def update(self, k, v):
        """(keys and values of the kept positions followed by the new ones, how many were kept)."""
        past = self.k.shape[1]
        k, v = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        keep = min(self.window - 1, k.shape[1])
        self.k, self.v = k[:, k.shape[1] - keep:].clone(), v[:, v.shape[1] - keep:].clone()
        return k, v, past

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.k, self.v))


class SlidingWindowAttention(Attention):
    """Phase 7's attention (same weights, RoPE) restricted to the last `window` tokens: O(S window) in training
    and a KV cache of window - 1 positions when decoding."""

    def __init__(self, args: Phase8Args):
        super().__init__(args)
        self.window = args.sliding_window

    def forward(self, x, rope, cache: WindowKVCache | None = None, start: int = 0):
        B, S, _ = x.shape
        q, k, v = self.project(x, rope)
        past = 0
        if cache is not None:
            k, v, past = cache.update(k, v)
        k, v = repeat_kv(k, v, self.n_heads)
        if past == 0 and S <= self.window:
            out = attention(q, k, v, True, self.backend)  # no key is out of reach: plain causal (Triton on CUDA)
        elif past == 0:
            out = sliding_window_attention(q, k, v, self.window)
        else:  # decoding: the new queries sit after `past` kept positions
            query = past + torch.arange(S, device=x.device)[:, None]
            key = torch.arange(k.shape[1], device=x.device)[None, :]
            out = attention(q, k, v, True, "sdpa", mask=(key <= query) & (query - key < self.window))
        return self.o_proj(out.reshape(B, S, -1))

    def new_cache(self, batch: int, max_len: int, device, dtype) -> WindowKVCache:
        return WindowKVCache(batch, self.window, self.n_kv_heads, self.head_dim, device, dtype)


def mixer_for(args: Phase8Args, layer: int) -> nn.Module:
    if not args.is_attention_layer(layer):
        return GatedLinearAttention(args)
    return SlidingWindowAttention(args) if args.sliding_window else Attention(args)


class LinearTransformer(Transformer):
    """Phase 7's Transformer with phase 8's mixers: the LanguageModel of phase 8."""

    def __init__(self, args: Phase8Args):
        super().__init__(args, mixer=mixer_for)

    def initial_values(self, name: str, tensor: torch.Tensor, generator: torch.Generator):
        """Phase 7's init, except the decay and convolution of the linear-attention mixers."""
        mixer, _, own = name.rpartition("self_attn.")
        if not (mixer and isinstance(self.get_submodule(mixer + "self_attn"), GatedLinearAttention)
                and decay_or_conv_values(own, tensor, generator)):
            super().initial_values(name, tensor, generator)

    @property
    def constant_memory(self) -> bool:
        return self.args.constant_memory

    def extend_positions(self, length: int) -> None:
        """Let a model without full-context attention run past n_seq (chat): longer RoPE tables for its windowed
        layers, if any, and a larger limit. A full-attention model keeps n_seq, the length it was trained at."""
        if length <= self.args.max_seq_len or not self.constant_memory:
            return
        self.args = dataclasses.replace(self.args, max_seq_len=length)
        cos, sin = rope_tables(self.args.head_dim, length, self.args.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos), sin.to(self.rope_sin)

    def flops_per_token(self, n_seq: int) -> float:
        return 6 * self.num_params() + mixing_flops_per_token(self.args, n_seq)

    def describe(self) -> str:
        args = self.args
        mixers = f"linear attention {args.linear_attention}" + (f" + conv {args.short_conv}" if args.short_conv else "")
        if args.hybrid_every:
            window = f", window {args.sliding_window}" if args.sliding_window else ""
            mixers += f" | attention {args.attention} every {args.hybrid_every} layers{window}"
        return f"{mixers} | rms_norm {args.rms_norm}"

