"""A phase written outside phases/, to show what adding one takes: a model, an objective, a sampler and a
config class with the phase's own key. Nothing in engine/ knows about it; a config names it by module path
(`phase: tests.toy_phase`). The model is a stack of residual MLPs over token embeddings: each position sees
only its own token, so it learns bigram statistics."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import Config, ConfigError
from engine.init import init_parameter
from engine.sampling import sample
from phases import Phase


@dataclass
class ToyConfig(Config):
    toy_width: int = 16  # the phase's own key: embedding and hidden width
    toy_layers: int = 2

    def check(self) -> None:
        super().check()
        if self.toy_width <= 0:
            raise ConfigError(f"toy_width must be > 0, got {self.toy_width}")


class ResidualMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.proj(x))


class Bigram(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.toy_width)
        self.layers = nn.ModuleList(ResidualMLP(cfg.toy_width) for _ in range(cfg.toy_layers))
        self.lm_head = nn.Linear(cfg.toy_width, cfg.vocab_size, bias=False)

    def init_weights(self, seed: int):
        """N(0, 0.02) matrices and zero biases, each parameter from its own generator, whole or sharded."""
        for name, p in self.named_parameters():
            init_parameter(p, name, seed, lambda tensor, generator: tensor.normal_(0, 0.02, generator=generator)
                           if tensor.ndim > 1 else tensor.zero_())

    def input_embedding(self):
        return self.embed

    def hidden_states(self, idx, cache=None, start=0):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, idx):
        return self.lm_head(self.hidden_states(idx))

    def output_weight(self):
        return self.lm_head.weight

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    def flops_per_token(self, n_seq: int) -> float:
        return 6 * self.num_params()

    def describe(self) -> str:
        return f"toy bigram, width {self.embed.embedding_dim}"


def loss(model: Bigram, batch: torch.Tensor, cfg: ToyConfig) -> torch.Tensor:
    return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def generate(model: Bigram, prompt: torch.Tensor, settings, on_token=None) -> torch.Tensor:
    ids = prompt
    for _ in range(settings.max_new_tokens):
        token = sample(model(ids[:, -1:])[:, -1], settings)
        if on_token is not None:
            on_token(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return ids[:, prompt.shape[1]:]


PHASE = Phase(name="toy", build_model=Bigram, loss=loss, generate=generate, config=ToyConfig,
              shape_keys=("vocab_size", "toy_width", "toy_layers"))
