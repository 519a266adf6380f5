"""Phase 8 (linear attention on phase 7's blocks): it trains, is causal, decodes with a fixed-size state exactly as
a full recompute does, resumes exactly, chats, refuses bad keys in one line; its Triton path matches the PyTorch one.
"""

import os

import torch

if not torch.cuda.is_available():  # as tests/test_linear_attention.py: before kernels.linear_attention is imported
    os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.config import ConfigError  # noqa: E402
from engine.sampling import SamplingSettings  # noqa: E402
from engine.train import Trainer  # noqa: E402
from phases import load_config  # noqa: E402
from phases.phase8 import build_model, generate  # noqa: E402
from phases.phase8.model import (GatedLinearAttention, LinearTransformer, RecurrentState,  # noqa: E402
                                 sliding_window_attention)
from tests.resume_check import assert_resume_is_exact  # noqa: E402

ROOT = __file__.rsplit("/tests/", 1)[0]
# n_seq 80 crosses a 64-position chunk; window 8 cuts it into several blocks
TINY = ["phase=phase8", "vocab_size=97", "d_model=64", "n_heads=4", "n_layers=4", "n_seq=80", "ffn_dim=96"]
VARIANTS = {"pure": [], "conv": ["short_conv=4"], "hybrid": ["hybrid_every=2"],
            "window": ["hybrid_every=2", "sliding_window=8", "short_conv=4"]}


def tiny(*extra) -> LinearTransformer:
    torch.manual_seed(0)
    return build_model(load_config(None, TINY + list(extra)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_future_tokens_do_not_change_past_logits(variant):
    model = tiny(*VARIANTS[variant]).eval()
    x = torch.randint(0, 97, (2, 80))
    changed = x.clone()
    changed[:, 70:] = torch.randint(0, 97, (2, 10))
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :70], b[:, :70])
    assert not torch.allclose(a[:, 70:], b[:, 70:])


def cache_bytes(cache) -> int:
    return sum(layer.nbytes() for layer in cache if hasattr(layer, "nbytes"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_recurrent_decoding_equals_full_recompute(variant):
    model = tiny(*VARIANTS[variant]).eval()
    prompt = torch.randint(0, 97, (1, 9))
    decoded = generate(model, prompt, SamplingSettings(temperature=0, max_new_tokens=30))
    ids = prompt
    for _ in range(30):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(decoded, ids[:, 9:])
    # and the logits themselves, token by token through the caches
    cache = model.new_cache(1, 39)
    stepped = torch.cat([model(prompt, cache=cache)] + [model(ids[:, t:t + 1], cache=cache, start=t)
                                                          for t in range(9, 39)], dim=1)
    torch.testing.assert_close(stepped, model(ids[:, :39]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["pure", "window"])  # window: a windowed hybrid with a convolution
def test_decoding_memory_does_not_grow_and_runs_past_n_seq(variant):
    model = tiny(*VARIANTS[variant]).eval()
    model.extend_positions(100)
    cache = model.new_cache(1, 0)
    model(torch.randint(0, 97, (1, 12)), cache=cache)
    sizes = []
    for position in range(12, 100):  # n_seq is 80
        model(torch.randint(0, 97, (1, 1)), cache=cache, start=position)
        sizes.append(cache_bytes(cache))
    assert sizes[0] == sizes[-1] == max(sizes) and sizes[0] > 0
    out = generate(model, torch.randint(0, 97, (1, 60)), SamplingSettings(temperature=0, max_new_tokens=30))
    assert out.shape == (1, 30)  # 90 tokens, more than n_seq: not cut


def test_full_attention_hybrid_keeps_phase7_context_limit():
    model = tiny("hybrid_every=2").eval()
    out = generate(model, torch.randint(0, 97, (1, 50)), SamplingSettings(temperature=0, max_new_tokens=60))
    assert out.shape[1] <= 79


def test_sliding_window_attention_is_the_band_masked_attention():
    q, k, v = (torch.randn(2, 37, 3, 16) for _ in range(3))
    i = torch.arange(37)
    band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 8)
    full = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=band).transpose(1, 2)
    torch.testing.assert_close(sliding_window_attention(q, k, v, 8), full, atol=1e-5, rtol=1e-5)


def test_decay_starts_in_mamba2_range_and_survives_the_generic_init():
    model = tiny()
    mixer = model.layers[0].self_attn
    assert isinstance(mixer, GatedLinearAttention) and not torch.all(mixer.A_log == 1)
    per_token = torch.exp(mixer.log_decay(torch.zeros(1, 1, 4)))  # exp(-A dt) at x = 0
    assert torch.all(per_token >= torch.exp(torch.tensor(-1.6))) and torch.all(per_token <= 0.9991)
    assert isinstance(mixer.new_cache(2, 10_000, "cpu", torch.float32), RecurrentState)


def test_flops_per_token_counts_no_sequence_term_for_linear_layers():
    pure, hybrid, window = (tiny(*VARIANTS[v]) for v in ("pure", "hybrid", "window"))
    d, chunk, head = 64, 64, 16
    assert pure.flops_per_token(80) == 6 * pure.num_params() + 4 * 12 * d * (chunk + head)
    assert pure.flops_per_token(8000) == pure.flops_per_token(80)  # linear: nothing grows with S
    assert hybrid.flops_per_token(80) == 6 * hybrid.num_params() + 2 * 12 * d * (chunk + head) + 2 * 12 * d * 80
    assert window.flops_per_token(8000) == 6 * window.num_params() + 2 * 12 * d * (chunk + head) + 2 * 12 * d * 8


def test_training_lowers_the_loss(tmp_path, markov_data):
    cfg = load_config(None, TINY + [f"data={markov_data}", "vocab_size=64", "n_seq=32", "n_layers=2",
                                    "batch_size=8", "max_steps=40", "warmup_steps=4", "learning_rate=3e-3",
                                    "log_every=40", "eval_every=40", "eval_batches=2", f"out_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    first = trainer.evaluate()
    trainer.fit()
    assert first > 4.0 and trainer.best_val_loss < first - 1.5


SMALL = ["phase=phase8", "data=dummy", "vocab_size=64", "n_seq=16", "d_model=32", "n_heads=2", "n_layers=2",
         "ffn_dim=64", "hybrid_every=2", "sliding_window=4", "batch_size=2", "gradient_accumulation_steps=2",
         "warmup_steps=2", "log_every=1", "eval_every=3", "eval_batches=2", "save_every=3", "learning_rate=1e-2"]


def test_resume_is_exact(tmp_path):
    assert_resume_is_exact(lambda run, *extra: Trainer(load_config(None, SMALL + [
        f"out_dir={tmp_path / run}", "max_steps=6", *extra])), tmp_path, "phase8")


def test_chat_over_stdin_on_a_phase8_checkpoint(tmp_path):
    from tests.tiny_tokenizer import tiny_bpe

    tiny_bpe().save(str(tmp_path / "tokenizer.json"))
    Trainer(load_config(None, ["phase=phase8", "data=dummy", f"tokenizer={tmp_path / 'tokenizer.json'}",
                               "vocab_size=300", "n_seq=32", "d_model=32", "n_heads=2", "n_layers=2", "ffn_dim=64",
                               "batch_size=2", "max_steps=2", "eval_every=2", "eval_batches=1",
                               f"out_dir={tmp_path / 'run'}"])).fit()
    result = subprocess.run([sys.executable, "-m", "engine.chat", str(tmp_path / "run"), "max_new_tokens=40",
                             "temperature=0"], cwd=ROOT, input="to be\nthat is\n", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2 and "(phase8, step 2)" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("hybrid_every=-1", "config key 'hybrid_every' must be >= 0, got -1"),
    ("short_conv=-2", "config key 'short_conv' must be >= 0, got -2"),
    ("sliding_window=16", "sliding_window=16 applies to the softmax blocks of a hybrid"),
    ("linear_attention=cuda", "config key 'linear_attention' must be one of triton, torch; got 'cuda'"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, TINY + [override])


def test_a_config_error_is_one_line_from_make():
    result = subprocess.run(["make", "--no-print-directory", f"PYTHON={sys.executable}", "train-phase8-test",
                             "ARGS=hybrid_every=-1"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.splitlines()[0] == "error: config key 'hybrid_every' must be >= 0, got -1"


def test_phase7_keys_stay_phase7s_and_phase8_keys_name_their_phase():
    with pytest.raises(ConfigError, match="'hybrid_every' belongs to phase phase8"):
        load_config(None, ["phase=phase7", "hybrid_every=2"])


def test_triton_path_matches_the_torch_path():
    """The mixer through kernels/linear_attention.py (CUDA, or Triton's interpreter here) against the chunked
    PyTorch form: forward, and the gradients of every parameter including the decay's."""
    from kernels.linear_attention import INTERPRETED
    from kernels.support import runs_here

    if not runs_here(INTERPRETED):
        pytest.skip("kernels.linear_attention was imported before TRITON_INTERPRET=1 was set")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    args = tiny("d_model=32", "n_heads=2").args  # head size 16, which the kernels compile for
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        mixer = GatedLinearAttention(dataclasses.replace(args, linear_attention=backend)).to(device)
        x = torch.randn(2, 21, 32, device=device, generator=torch.Generator(device).manual_seed(2))
        out = mixer(x, None)
        out.square().sum().backward()
        results.append((out, {name: p.grad for name, p in mixer.named_parameters()}))
    (ref, ref_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert ref_grads["A_log"].abs().sum() > 0 and ref_grads["dt_bias"].abs().sum() > 0


@pytest.mark.parametrize("variant", ["pure", "window"])
def test_a_block_compiles_into_one_graph(variant):
    """As tests/test_phase7_model.py: engine.blocks compiles each block, and a graph break would split it."""
    model = tiny(*VARIANTS[variant], "n_layers=2", "n_seq=20")
    x, rope = torch.randn(2, 20, 64, requires_grad=True), (model.rope_cos, model.rope_sin)
    for block in model.layers:
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        eager_out, compiled_out = block(x, rope), compiled(x, rope)
        torch.testing.assert_close(compiled_out, eager_out)
        torch.testing.assert_close(torch.autograd.grad(compiled_out.square().sum(), x)[0],
                                   torch.autograd.grad(eager_out.square().sum(), x)[0])


def test_cpu_bench_fits_growth_exponents(capsys):
    from bench import phase8_vs_phase7

    assert phase8_vs_phase7.main(["--cpu", "--seqs", "64,128,256", "--repeats", "1", "--heads", "1",
                                  "--no-record"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| linear") or
            line.startswith("| softmax")]
    assert len(rows) == 3  # each with its fitted exponent (too noisy at these lengths to check its value)
    assert all(float(r.strip("| ").split("|")[-1]) == float(r.strip("| ").split("|")[-1]) for r in rows)
    assert phase8_vs_phase7.growth_exponent([1, 2, 4], [3, 12, 48]) == pytest.approx(2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_mixer_bench_without_cuda_is_a_one_line_error():
    result = subprocess.run([sys.executable, "-m", "bench.phase8_vs_phase7", "--mixer"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().startswith("error:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_crossover_is_where_phase8_stays_faster():
    from bench.phase8_vs_phase7 import crossover

    rows = {("phase7", 1): {"tok_per_s": 10}, ("phase8", 1): {"tok_per_s": 5},
            ("phase7", 2): {"tok_per_s": 8}, ("phase8", 2): {"tok_per_s": 9},
            ("phase7", 4): {"oom": True}, ("phase8", 4): {"tok_per_s": 8}}
    assert crossover([1, 2, 4], rows) == 2
    rows[("phase8", 2)] = {"tok_per_s": 7}
    assert crossover([1, 2, 4], rows) == 4
