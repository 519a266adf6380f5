"""Gated linear attention in plain PyTorch: the definition the Triton kernels (kernels/linear_attention.py) are
tested against, the chunked form that trains on CPU, and the step that decodes one token. Never imports triton,
so the model's CPU path and chat work where Triton is not installed.

q, k: (batch, seq, heads, key_dim); v: (batch, seq, heads, value_dim); g: (batch, seq, heads) = log alpha_t <= 0;
the state is (batch, heads, key_dim, value_dim):
    S_t = exp(g_t) * S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t,    S_{-1} = initial_state (zeros if None).
Each computes in float32 (float64 for float64 inputs) and returns o in q's dtype.
"""

import torch

CHUNK = 64  # positions per chunk in the kernels, and by default here: large enough for tensor-core matmuls


def check_inputs(q, k, v, g, initial_state):
    """Shapes every form needs, as ValueErrors that say what is wrong (the kernels add dtype and dim checks)."""
    if not (q.dim() == k.dim() == v.dim() == 4 and g.dim() == 3):
        raise ValueError(f"q, k, v must be (batch, seq, heads, dim) and g (batch, seq, heads); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(g.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or g.shape != q.shape[:3]:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"g {tuple(g.shape)}")
    if T == 0:
        raise ValueError("empty sequence")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be (batch, heads, key_dim, value_dim) = {(B, H, K, v.shape[-1])}; "
                         f"got {tuple(initial_state.shape)}")


def linear_attention_step(q, k, v, g, state=None, scale=None):
    """One decoding token: q, k (batch, 1, heads, key_dim), v (batch, 1, heads, value_dim), g (batch, 1, heads)
    and the state so far (zeros if None) -> (o (batch, 1, heads, value_dim), the next state). The state's size does
    not depend on how many tokens came before; it is float32 (float64 for float64 inputs)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    q_, k_, v_ = (t[:, 0].to(compute) for t in (q, k, v))
    if state is None:
        state = q_.new_zeros((*q_.shape, v_.shape[-1]))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = torch.exp(g[:, 0].to(compute))[..., None, None] * state + k_[..., :, None] * v_[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q_, state)
    return o[:, None].to(q.dtype), state


def linear_attention_reference(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """The recurrence one position at a time in plain PyTorch (float32; float64 for float64 inputs): the
    definition the kernels are tested against. Slow (a Python loop over the sequence) and its autograd keeps
    every state: for tests and short sequences."""
    check_inputs(q, k, v, g, initial_state)
    state = None if initial_state is None else initial_state.to(torch.promote_types(q.dtype, torch.float32))
    outputs = []
    for t in range(q.shape[1]):
        o, state = linear_attention_step(*(x[:, t:t + 1] for x in (q, k, v, g)), state, scale)
        outputs.append(o)
    o = torch.cat(outputs, 1)
    return (o, state) if output_final_state else o


def linear_attention_chunked_torch(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                                   chunk=CHUNK):
    """The kernels' chunked algorithm in plain PyTorch (float32; float64 for float64 inputs): batched matmuls
    within chunks and a loop over chunks only, so it trains on CPU where the kernels cannot run."""
    check_inputs(q, k, v, g, initial_state)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    pad = -T % chunk  # zero rows past the end: no key, no value, no decay

    def chunks(x):  # (batch, seq, heads, ...) -> (batch, heads, chunks, chunk, ...)
        x = torch.nn.functional.pad(x.to(compute), (0, 0) * (x.dim() - 2) + (0, pad))
        return x.unflatten(1, (-1, chunk)).movedim(3, 1)

    q_, k_, v_, g_ = chunks(q), chunks(k), chunks(v), chunks(g)
    b = g_.cumsum(-1)
    b_last = b[..., -1:]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")))
    inside = ((q_ @ k_.transpose(-1, -2)) * decay) @ v_
    contributions = (k_ * torch.exp(b_last - b)[..., None]).transpose(-1, -2) @ v_  # each chunk's k^T v to its end
    state = q_.new_zeros((B, H, K, v.shape[-1])) if initial_state is None else initial_state.to(compute)
    starts = []
    # unbind, not indexing: the backward of each index would write a zero tensor the size of all chunks,
    # making the loop's backward quadratic in the length
    for decay_c, contribution_c in zip(torch.exp(b_last).unbind(2), contributions.unbind(2)):
        starts.append(state)
        state = decay_c[..., None] * state + contribution_c
    o = scale * ((q_ * torch.exp(b)[..., None]) @ torch.stack(starts, 2) + inside)
    o = o.movedim(1, 3).flatten(1, 2)[:, :T].to(q.dtype)
    return (o, state) if output_final_state else o
