"""Benchmark scoring of the masked diffusion LM: SMDM's definitions, for engine/evaluate.py (Phase.scorer).

A diffusion LM has no next-token logits, so log p(continuation | context) is measured one of two ways (nll=):
- mc: the diffusion bound by Monte Carlo. Each of mc_num draws picks a noise level t, masks each continuation
  token with probability t (the context stays visible) and adds log p(token | visible ones) / t over the masked
  tokens; the mean over draws is a lower bound on the log-likelihood (the ELBO the model was trained on), noisy
  for small mc_num. The levels are stratified over [0, 1) (one uniform offset, then mc_num evenly spaced), and the
  masks of a request come from a generator seeded by its tokens: the same request always gets the same estimate,
  whatever the batch size, the LIMIT or the order of requests.
- chain_rule: exact, in left-to-right order: log p(c_1 | ctx, c_2.. masked) + log p(c_2 | ctx, c_1, c_3.. masked)
  + ..., one forward per continuation token (batched).
is_greedy (greedy=true, for LAMBADA-style accuracy): start from the masked continuation and reveal, one per step,
the masked position whose argmax is most confident; true when the result is the continuation. Off by default,
as in SMDM: it costs one forward per continuation token, and multiple-choice tasks do not read it.
cfg > 0: classifier-free guidance on the context, logits = u + (1 + cfg)(c - u), c with the context visible and
u with it masked too.
"""

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.config import ConfigError
from engine.likelihood import context_length, fit_pair
from phases.mdm.sampler import mask_id, token_weight


@dataclass
class DiffusionOptions:
    batch_size: int = 32  # sequences per forward pass (draws of mc, rows of chain_rule)
    nll: str = "mc"  # mc | chain_rule
    mc_num: int = 128  # Monte Carlo draws per request (SMDM: 1024)
    cfg: float = 0.0  # classifier-free guidance scale on the context; 0 = off
    greedy: bool = False  # compute is_greedy by greedy unmasking (LAMBADA's accuracy)
    seed: int = 0  # mixed into every request's mask generator

    def check(self) -> None:
        if self.nll not in ("mc", "chain_rule"):
            raise ConfigError(f"nll must be mc or chain_rule; got '{self.nll}'")
        if self.batch_size < 1 or self.mc_num < 1:
            raise ConfigError(f"batch_size and mc_num must be >= 1; got {self.batch_size} and {self.mc_num}")
        if self.cfg < 0:
            raise ConfigError(f"cfg must be >= 0; got {self.cfg}")


class DiffusionScorer:
    options_class = DiffusionOptions

    def __init__(self, model, options: DiffusionOptions):
        self.model, self.options = model, options
        self.mask = mask_id(model)
        self.weight = token_weight(model)  # once: a tied TT head is materialised here
        self.length = context_length(model)

    @torch.no_grad()
    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        score = self.monte_carlo if self.options.nll == "mc" else self.chain_rule
        results = []
        for context, continuation in tqdm(pairs, desc=f"log-likelihoods ({self.options.nll})", unit="request"):
            context, continuation = fit_pair(context, continuation, self.length)
            device = self.weight.device
            context, continuation = torch.tensor(context, device=device), torch.tensor(continuation, device=device)
            greedy = self.options.greedy and self.greedy_matches(context, continuation)
            results.append((score(context, continuation), greedy))
        return results

    def continuation_log_probs(self, rows: torch.Tensor, n_context: int) -> torch.Tensor:
        """log p over the real tokens at the continuation positions of rows (B, S): (B, S - n_context, V)."""
        if self.options.cfg > 0:
            unconditional = rows.clone()
            unconditional[:, :n_context] = self.mask
            rows = torch.cat([rows, unconditional])
        logits = F.linear(self.model.hidden_states(rows)[:, n_context:], self.weight).float()
        if self.options.cfg > 0:
            conditional, unconditional = logits.chunk(2)
            logits = unconditional + (1 + self.options.cfg) * (conditional - unconditional)
        return F.log_softmax(logits, dim=-1)

    def monte_carlo(self, context: torch.Tensor, continuation: torch.Tensor) -> float:
        options, n = self.options, len(continuation)
        generator = torch.Generator().manual_seed(request_seed(context, continuation, options.seed))
        levels = (torch.rand((), generator=generator, dtype=torch.float64)
                  + torch.arange(options.mc_num, dtype=torch.float64) / options.mc_num) % 1
        masked = torch.rand((options.mc_num, n), generator=generator, dtype=torch.float64) < levels[:, None]
        levels, masked = levels.to(continuation.device), masked.to(continuation.device)
        sequence = torch.cat([context, continuation])
        total = 0.0
        for start in range(0, options.mc_num, options.batch_size):
            rows_masked, t = masked[start:start + options.batch_size], levels[start:start + options.batch_size]
            if not rows_masked.any():  # nothing masked: this draw adds 0 and needs no forward
                continue
            rows = sequence.repeat(len(rows_masked), 1)
            rows[:, len(context):] = torch.where(rows_masked, self.mask, continuation)
            log_probs = self.continuation_log_probs(rows, len(context))
            picked = log_probs.gather(-1, continuation.expand(len(rows), n)[..., None]).squeeze(-1).double()
            total += float(torch.where(rows_masked, picked / t[:, None], 0.0).sum())
        return total / options.mc_num

    def chain_rule(self, context: torch.Tensor, continuation: torch.Tensor) -> float:
        n = len(continuation)
        positions = torch.arange(n, device=continuation.device)
        total = 0.0
        for start in range(0, n, self.options.batch_size):
            steps = positions[start:start + self.options.batch_size]  # row i predicts token i from tokens < i
            rows = torch.cat([context.expand(len(steps), -1),
                              torch.where(positions[None, :] >= steps[:, None], self.mask, continuation)], dim=1)
            log_probs = self.continuation_log_probs(rows, len(context))
            total += float(log_probs[torch.arange(len(steps)), steps, continuation[steps]].sum())
        return total

    def greedy_matches(self, context: torch.Tensor, continuation: torch.Tensor) -> bool:
        n = len(continuation)
        guess = torch.full_like(continuation, self.mask)
        for _ in range(n):
            log_probs = self.continuation_log_probs(torch.cat([context, guess])[None], len(context))[0]
            confidence, prediction = log_probs.max(-1)
            still_masked = guess == self.mask
            position = int(torch.where(still_masked, confidence, float("-inf")).argmax())
            guess[position] = prediction[position]
        return bool((guess == continuation).all())


def request_seed(context: torch.Tensor, continuation: torch.Tensor, seed: int) -> int:
    """A seed from the request's tokens, so its Monte Carlo masks do not depend on what was scored before it."""
    tokens = np.concatenate([context.cpu().numpy(), [-1], continuation.cpu().numpy()]).astype(np.int64)
    return zlib.crc32(tokens.tobytes(), seed)
