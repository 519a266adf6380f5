"""Our checkpoints as an lm-evaluation-harness model, registered as `engine`:
lm_eval --model engine --model_args checkpoint=checkpoints/phase7_test,batch_size=32 --tasks hellaswag
(`make eval` is engine/evaluate.py). Importing this module needs lm_eval; nothing else in the engine does.

The checkpoint, tokenizer and device come as for chat (bf16 on CUDA); scoring comes from the phase
(Phase.scorer, engine/likelihood.py); generate_until is the phase's own cached decoding, greedy.
"""

import dataclasses
import sys

import lm_eval.models  # noqa: F401  lm-eval loads its own models only while its registry is empty: before ours
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.chat import Chat
from engine.likelihood import CausalScorer, context_length, parse_options
from engine.sampling import SamplingSettings
from phases import all_phases

DEFAULT_GENERATION = 256  # new tokens when a task sets no max_gen_toks, as lm-eval's hf model


def own_options(scorer_class, phase: str, options: dict) -> dict[str, str]:
    """The options for this phase's scorer. One that only another phase's scorer takes (mc_num on a phase 7
    run of a folder that also holds mdm runs) is left out with a note; one no scorer takes stays, to be refused."""
    own = {f.name for f in dataclasses.fields(scorer_class.options_class)}
    elsewhere = {f.name for p in all_phases() for f in dataclasses.fields((p.scorer or CausalScorer).options_class)}
    ignored = [key for key in options if key not in own and key in elsewhere]
    if ignored:
        print(f"note: {', '.join(ignored)} ignored: {phase} takes {', '.join(sorted(own))}", file=sys.stderr)
    return {key: str(value) for key, value in options.items() if key not in ignored}


@register_model("engine")
class CheckpointLM(TemplateLM):
    def __init__(self, checkpoint: str, device: str = "auto", **options):
        super().__init__()
        self.path = ckpt.resolve_checkpoint(str(checkpoint))
        self.loaded = Chat(self.path, device)  # model, tokenizer, device and phase, as chat loads them
        self.model, self.tokenizer, self.phase = self.loaded.model, self.loaded.tokenizer, self.loaded.phase
        scorer_class = self.phase.scorer or CausalScorer
        self.options = parse_options(scorer_class.options_class, own_options(scorer_class, self.phase.name, options))
        self.scorer = scorer_class(self.model, self.options)
        self.max_length = context_length(self.model)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else 0

    @property
    def tokenizer_name(self) -> str:
        return str(self.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Plain tokens, no special ones: the way the training data was tokenized."""
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([(context, continuation) for _, context, continuation in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood (perplexity tasks): windows of max_length tokens, each scored given
        the one before (lm-eval's disjoint rolling windows), all windows of all texts through the scorer."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_likelihood, _) in zip(owners, self.scorer.loglikelihood(windows)):
            totals[owner] += log_likelihood
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy completions by the phase's own decoding (KV cache, recurrent state or unmasking steps), cut at
        the first stop string; the prompt keeps its tail when it does not fit."""
        completions = []
        for context, gen_kwargs in tqdm([req.args for req in requests], desc="generating", disable=disable_tqdm):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(gen_kwargs.get("max_gen_toks", DEFAULT_GENERATION))
            settings = SamplingSettings(temperature=0, max_new_tokens=budget, eos_id=self.tokenizer.eos_token_id)
            text = self.loaded.complete(context, settings)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            completions.append(text)
        return completions
