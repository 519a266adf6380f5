"""Benchmark scoring of a model: log p(continuation | context) for lm-evaluation-harness (engine/evaluate.py).

A phase names its scorer in `Phase.scorer`; None means CausalScorer, the exact likelihood of a next-token model
(phase7, phase8, hf). phases/mdm/likelihood.py holds the masked diffusion LM's. A scorer is built from the model
and the user's options (ARGS="batch_size=... ..."), and scores lists of (context ids, continuation ids) pairs.
Nothing here imports lm_eval, so the engine runs without it.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.config import ConfigError


def parse_options(options_class, options: dict[str, str]):
    """A scorer's options dataclass from key=value strings; an unknown key or a bad value is a ConfigError."""
    fields = {f.name: f.type for f in dataclasses.fields(options_class)}
    unknown = [key for key in options if key not in fields]
    if unknown:
        raise ConfigError(f"unknown eval option(s) {', '.join(unknown)}; this phase takes: {', '.join(fields)}")
    values = {}
    for key, text in options.items():
        kind = fields[key]
        try:
            values[key] = parse_bool(text) if kind is bool else kind(text)
        except (KeyError, ValueError):
            raise ConfigError(f"eval option {key} expects {kind.__name__}, got '{text}'") from None
    result = options_class(**values)
    result.check()
    return result


def parse_bool(text: str) -> bool:
    return {"true": True, "1": True, "false": False, "0": False}[text.lower()]


def context_length(model) -> int:
    """The longest sequence the model scores in one forward: n_seq for our models, the position limit for hf."""
    args = getattr(model, "args", None)
    if args is not None:
        return args.max_seq_len
    return getattr(model.hf.config.get_text_config(), "max_position_embeddings", None) or 2048


def fit_pair(context: list[int], continuation: list[int], length: int) -> tuple[list[int], list[int]]:
    """Context and continuation cut to `length` tokens in all, dropping the context's oldest tokens first."""
    continuation = continuation[-length:]
    return context[max(0, len(context) - (length - len(continuation))):], continuation


@dataclass
class CausalOptions:
    batch_size: int = 16  # requests per forward pass

    def check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1; got {self.batch_size}")


class CausalScorer:
    """Exact log-likelihoods of a next-token model: one forward over a batch of requests, each row the context
    and continuation (its last token dropped, as nothing follows it), right-padded: with a causal mask padding
    never reaches the positions that are read. is_greedy: every continuation token is the argmax."""

    options_class = CausalOptions

    def __init__(self, model, options: CausalOptions):
        self.model, self.options = model, options
        self.length = context_length(model)

    @torch.no_grad()
    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        device = next(self.model.parameters()).device
        # Longest first: similar lengths share a batch (little padding), and the longest batch comes first, so
        # running out of memory happens at once, not after an hour.
        inputs = [(context + continuation)[-(self.length + 1):][:-1] for context, continuation in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        size = self.options.batch_size
        for start in tqdm(range(0, len(order), size), desc="log-likelihoods", unit="batch"):
            batch = order[start:start + size]
            width = max(len(inputs[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
            log_probs = F.log_softmax(self.model(ids.to(device)).float(), dim=-1)
            for row, i in enumerate(batch):
                continuation = torch.tensor(pairs[i][1], device=device)
                end = len(inputs[i])
                scores = log_probs[row, end - len(continuation):end]
                picked = scores.gather(-1, continuation[:, None]).squeeze(-1)
                results[i] = (float(picked.sum()), bool((scores.argmax(-1) == continuation).all()))
        return results
