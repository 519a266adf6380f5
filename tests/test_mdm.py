"""The masked diffusion phase: forward process, the bound's scale, bidirectionality, sampler, eval, resume."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine.sampling import SamplingSettings
from engine.train import Trainer, TrainingError, steps_for_budget
from phases import load_config
from phases.mdm import (EVAL_LEVELS, build_model, corrupt, diffusion_loss, eval_diffusion_loss, generate,
                        noise_levels)

V = 97
MODEL = ["phase=mdm", f"vocab_size={V}", "d_model=64", "n_heads=4", "n_layers=2", "n_seq=40", "ffn_dim=96"]
RUN = ["phase=mdm", "data=dummy", "vocab_size=64", "n_seq=16", "d_model=32", "n_heads=2", "n_layers=2",
       "ffn_dim=64", "batch_size=2", "gradient_accumulation_steps=2", "warmup_steps=2", "log_every=1",
       "eval_every=3", "eval_batches=2", "save_every=3", "learning_rate=1e-2"]


def tiny(*extra):
    torch.manual_seed(0)
    return build_model(load_config(None, MODEL + list(extra))).eval()


CFG = load_config(None, MODEL)


class Predictor(nn.Module):
    """Stands in for the Transformer: logits 50 x one-hot of `answer` (the true tokens), or all zeros."""

    def __init__(self, vocab_size: int, answer: torch.Tensor | None):
        super().__init__()
        self.args = SimpleNamespace(vocab_size=vocab_size + 1)  # the mask token's id is the last
        self.answer = answer
        self.lm_head = nn.Linear(vocab_size + 1, vocab_size + 1, bias=False)
        self.lm_head.weight.data = torch.eye(vocab_size + 1)

    def output_weight(self):
        return self.lm_head.weight

    def hidden_states(self, noisy):
        if self.answer is None:
            return torch.zeros(*noisy.shape, self.args.vocab_size)
        return 50.0 * nn.functional.one_hot(self.answer, self.args.vocab_size).float()


def test_masking_rate_follows_t():
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (5, 20000))
    t = torch.tensor([0.001, 0.1, 0.4, 0.7, 1.0])
    noisy, masked = corrupt(tokens, t, V)
    torch.testing.assert_close(masked.float().mean(1), t, atol=0.01, rtol=0)
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], V))
    assert torch.equal(noisy[~masked], tokens[~masked])


def test_noise_levels_take_one_draw_per_stratum():
    torch.manual_seed(0)
    eps = 0.05
    t = noise_levels(8, eps, "cpu")
    assert ((t >= eps) & (t <= 1)).all()
    strata = ((t - eps) / (1 - eps) * 8).floor().long().sort().values
    assert torch.equal(strata, torch.arange(8))


def test_perfect_predictions_give_zero_loss_and_uniform_ones_log_vocab():
    torch.manual_seed(0)
    batch = torch.randint(0, V, (64, 513))
    perfect = Predictor(V, batch[:, :-1])
    assert diffusion_loss(perfect, batch, CFG).item() < 1e-6
    assert eval_diffusion_loss(perfect, batch, CFG).item() < 1e-6
    uniform = Predictor(V, None)
    assert diffusion_loss(uniform, batch, CFG).item() == pytest.approx(math.log(V), rel=0.05)
    assert eval_diffusion_loss(uniform, batch, CFG).item() == pytest.approx(math.log(V), rel=0.05)


def test_a_later_token_changes_earlier_logits():
    model = tiny()
    x = torch.randint(0, V, (2, 30))
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % V
    assert not torch.allclose(model(x)[:, 0], model(changed)[:, 0])
    assert model.embed_tokens.num_embeddings == V + 1  # the mask token has an embedding


def test_eval_loss_is_deterministic_and_leaves_the_global_rng_alone():
    model = tiny()
    batch = torch.randint(0, V, (3, 41))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = eval_diffusion_loss(model, batch, CFG)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert torch.equal(eval_diffusion_loss(model, batch, CFG), first)
    assert EVAL_LEVELS >= 8


def test_flops_budget_sets_max_steps(tmp_path):
    cfg = load_config(None, RUN + [f"out_dir={tmp_path}", "flops_budget=3e7"])
    trainer = Trainer(cfg)
    n = trainer.model.num_params()
    assert cfg.max_steps == int(3e7 // (6 * n * 2 * 2 * 16)) == steps_for_budget(cfg, n) > 1
    with pytest.raises(TrainingError, match="less than one step"):
        Trainer(load_config(None, RUN + [f"out_dir={tmp_path}", "flops_budget=1e3"]))


def recorded(model):
    """The model, with every input the sampler feeds it kept in `model.inputs`."""
    model.inputs, forward = [], model.hidden_states
    model.hidden_states = lambda x: (model.inputs.append(x.clone()), forward(x))[1]
    return model


def test_sampler_keeps_the_prompt_fills_every_mask_and_never_emits_it():
    model = recorded(tiny())
    with torch.no_grad():
        model.lm_head.weight[V] = 100 * model.lm_head.weight[:V].sum(0)  # the mask would win any softmax
    prompt = torch.randint(0, V, (1, 6))
    streamed = []
    torch.manual_seed(0)
    settings = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=20, steps=5)
    new = generate(model, prompt, settings, on_token=streamed.append)
    assert new.shape == (1, 20) and ((new >= 0) & (new < V)).all()
    assert torch.equal(torch.cat(streamed)[None], new)
    assert 1 <= len(model.inputs) <= 5 and all(torch.equal(x[:, :6], prompt) for x in model.inputs)
    assert (model.inputs[0][:, 6:] == V).all()  # the first step sees only masks after the prompt
    long_prompt = torch.randint(0, V, (1, 35))  # n_seq = 40: room for 5 new tokens
    assert generate(model, long_prompt, SamplingSettings(max_new_tokens=50, steps=100)).shape == (1, 5)


def test_sampler_stops_at_the_first_eos():
    model = tiny()
    settings = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=30, steps=8)
    prompt = torch.randint(0, V, (1, 4))
    torch.manual_seed(3)
    full = generate(model, prompt, settings)
    settings.eos_id = int(full[0, 10])
    cut = int((full[0] == settings.eos_id).nonzero()[0]) + 1
    torch.manual_seed(3)
    assert torch.equal(generate(model, prompt, settings), full[:, :cut])


def test_training_lowers_the_bound():
    """Rows of one repeated token: a masked position is told by any visible one, in either direction."""
    model = tiny().train()
    batch = torch.arange(8)[:, None].expand(8, 41) * 11
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = eval_diffusion_loss(model, batch, CFG).item()
    for _ in range(25):
        loss = diffusion_loss(model, batch, CFG)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_diffusion_loss(model, batch, CFG).item() < 0.25 * before


def test_fused_cross_entropy_false_gives_the_plain_loss_and_gradient(monkeypatch):
    """mdm honours fused_cross_entropy: false takes the full-logits path, with the same bound."""
    import phases.mdm

    fused_calls = []
    fused_loss = phases.mdm.linear_cross_entropy
    monkeypatch.setattr(phases.mdm, "linear_cross_entropy", lambda *a, **k: (fused_calls.append(1),
                                                                              fused_loss(*a, **k))[1])
    batch = torch.randint(0, V, (3, 41))
    results = []
    for fused in (True, False):
        fused_calls.clear()
        model = tiny(f"fused_cross_entropy={fused}").train()
        cfg = load_config(None, MODEL + [f"fused_cross_entropy={fused}"])
        torch.manual_seed(1)
        loss = diffusion_loss(model, batch, cfg)
        loss.backward()
        with torch.no_grad():
            results.append((loss, eval_diffusion_loss(model, batch, cfg), [p.grad for p in model.parameters()]))
        assert len(fused_calls) == (1 + EVAL_LEVELS if fused else 0)
    (fused_loss, fused_eval, fused_grads), (plain_loss, plain_eval, plain_grads) = results
    assert fused_loss > 0
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused_eval, plain_eval, rtol=1e-6, atol=0)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
