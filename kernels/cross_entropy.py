"""Fused lm_head + cross-entropy that never holds the full (tokens x vocab) logits.

The plain path keeps the logits (N, V) in bf16, their fp32 copy and the fp32 gradient: ~0.4 GB at N = 1024
tokens and V = 32000, growing with the micro-batch. Here the tokens go through in chunks: each chunk's
logits become the loss and, at once, d loss / d logits = w * (softmax - onehot), which is multiplied into the
gradients of hidden and of the weight; then the chunk is dropped. Backward only scales those gradients by
grad_output (Liger Kernel's fused linear cross-entropy works the same way).

Extra memory at the peak: one chunk of logits (chunk_tokens x V in fp32, plus its compute-dtype copy), the
gradient of hidden (N x d, the size of hidden) and of the weight (V x d): nothing of size N x V.
Without a Triton kernel: the matmuls are cuBLAS's and the softmax is a handful of elementwise passes over
one chunk, which is small next to the matmuls' 6 N V d FLOPs.
"""

import torch
import torch.nn.functional as F

LOGITS_CHUNK_BYTES = 128 * 2**20  # fp32 logits of a chunk: ~1,000 tokens at V = 32000, still full-speed matmuls


def default_chunk_tokens(vocab_size: int) -> int:
    return max(1024, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def _prepare(targets, token_weights, ignore_index, reduction):
    """Targets with ignored positions set to 0, per-token weights (0 where ignored), the reduction's scale."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    valid = targets != ignore_index
    weights = valid.float() if token_weights is None else torch.where(valid, token_weights.float(), 0.0)
    scale = 1 / valid.sum().clamp(min=1).float() if reduction == "mean" else torch.ones((), device=targets.device)
    return torch.where(valid, targets, 0), weights, scale


def _chunked(hidden, weight, targets, weights, scale, chunk_tokens, compute_dtype, need_hidden, need_weight):
    """The loss, and the gradients asked for, chunk by chunk over the tokens."""
    h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    softmax_dtype = torch.promote_types(compute_dtype, torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None
    several_chunks = hidden.shape[0] > chunk_tokens  # then the weight's gradient adds up in fp32
    loss = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        logits = (h[rows] @ w.T).to(softmax_dtype)
        lse = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(1, targets[rows, None]).squeeze(1)
        loss += ((lse - target_logit) * weights[rows]).sum()
        if not (need_hidden or need_weight):
            continue
        grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        grad[torch.arange(grad.shape[0], device=grad.device), targets[rows]] -= 1
        grad = grad.mul_((weights[rows].to(softmax_dtype) * scale)[:, None]).to(compute_dtype)
        if need_hidden:
            grad_hidden[rows] = grad @ w
        if need_weight:
            part = grad.T @ h[rows]
            if grad_weight is None:
                grad_weight = part.to(softmax_dtype) if several_chunks else part
            else:
                grad_weight += part
    return loss * scale, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, scale, chunk_tokens, compute_dtype):
        loss, grad_hidden, grad_weight = _chunked(hidden, weight, targets, weights, scale, chunk_tokens,
                                                  compute_dtype, *ctx.needs_input_grad[:2])
        ctx.grads = grad_hidden, grad_weight
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # scaled in place: a second backward through the same graph must fail, not lie
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, token_weights=None, ignore_index=-100, reduction="mean",
                         chunk_tokens=None):
    """sum_i w_i * CE(hidden_i @ weight.T, targets_i) over the tokens whose target is not ignore_index.

    hidden (N, d), weight (V, d), targets (N,) int64, token_weights (N,) or None for all 1 (never
    differentiated). "mean" divides by the number of non-ignored tokens (a loss of 0 when there are none),
    "sum" does not. The matmuls run in the dtype F.linear would use here (autocast's when it is on), the
    softmax in fp32. Under torch.no_grad only the loss is computed.
    """
    targets, weights, scale = _prepare(targets, token_weights, ignore_index, reduction)
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0])
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute_dtype = torch.get_autocast_dtype(device)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, weights, scale, chunk_tokens, compute_dtype)
        return _chunked(hidden, weight, targets, weights, scale, chunk_tokens, compute_dtype, False, False)[0]


def linear_cross_entropy_reference(hidden, weight, targets, token_weights=None, ignore_index=-100,
                                   reduction="mean"):
    """The same loss the plain way: full logits in fp32 (or fp64) and F.cross_entropy."""
    targets, weights, scale = _prepare(targets, token_weights, ignore_index, reduction)
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    ce = F.cross_entropy(F.linear(hidden.to(dtype), weight.to(dtype)), targets, reduction="none")
    return (ce * weights).sum() * scale
