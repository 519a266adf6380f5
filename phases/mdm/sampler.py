"""Ancestral unmasking (MDLM's reverse process) for the masked diffusion LM: the Phase's `generate`."""

import torch
import torch.nn.functional as F

from engine.sampling import SamplingSettings, sample


def mask_id(model) -> int:
    """The mask token is the extra id after the tokenizer's vocabulary (build_model adds its row)."""
    return model.args.vocab_size - 1


def token_weight(model) -> torch.Tensor:
    """Output head rows of the real tokens: the mask token's row is never a prediction."""
    return model.output_weight()[:mask_id(model)]


@torch.no_grad()
def generate(model, prompt: torch.Tensor, settings: SamplingSettings, on_token=None) -> torch.Tensor:
    """Fill L = max_new_tokens masked positions after the prompt in K = settings.steps steps. prompt: (1, T).

    The noise level falls from t = 1 to 0 on the grid k/K; going from t = k/K to s = (k-1)/K, each position
    still masked is revealed with probability (t - s)/t = 1/k, with a token sampled from the model's
    prediction (temperature, top-k, top-p). The last step (k = 1) reveals all that remain. The prompt never
    changes. Returns the new ids (1, L), cut after the first EOS; on_token gets them left to right at the
    end, because a diffusion model fills positions in no particular order.
    """
    mask, max_len = mask_id(model), model.args.max_seq_len
    prompt = prompt[:, -(max_len - 1):]  # keep the prompt's tail, leaving room for one new token at least
    length = min(settings.max_new_tokens, max_len - prompt.shape[1])
    if length <= 0:
        return prompt[:, :0]
    x = torch.cat([prompt, prompt.new_full((prompt.shape[0], length), mask)], dim=1)
    masked = torch.zeros_like(x, dtype=torch.bool)
    masked[:, prompt.shape[1]:] = True
    weight = token_weight(model)  # once: a tied TT head is materialised here, not at every step
    for k in range(max(1, settings.steps), 0, -1):
        reveal = masked & (torch.rand(x.shape, device=x.device) < 1 / k)
        if reveal.any():  # a step that reveals nothing needs no forward pass
            hidden = model.hidden_states(x)[reveal]
            x[reveal] = sample(F.linear(hidden, weight), settings)
            masked &= ~reveal
    new_ids = x[:, prompt.shape[1]:]
    if settings.eos_id is not None:
        is_eos = new_ids == settings.eos_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), length)  # per row; `length` = no EOS
        new_ids = new_ids[:, :int(first.max()) + 1]
    if on_token is not None:
        for i in range(new_ids.shape[1]):
            on_token(new_ids[:, i])
    return new_ids
