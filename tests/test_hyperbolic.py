"""Hyperbolic attention (attention_geometry=hyperbolic): the math against float64 autograd and hand-computed
distances, the Triton kernel against its reference (interpreter on CPU: small odd sizes), the curvature schedule,
config checks, exact resume of a scheduled run with learned curvature, mdm, and the export's refusal."""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels.attention is first imported (see tests/test_kernels.py)

import pytest  # noqa: E402

from engine.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from engine.config import ConfigError  # noqa: E402
from kernels.hyperbolic import MAX_TANGENT_NORM, curvature_at, expmap0, hyperbolic_attention_reference  # noqa: E402
from phases import load_config  # noqa: E402
from phases.phase7 import build_model  # noqa: E402
from tests.resume_check import assert_resume_is_exact  # noqa: E402
from tests.test_train import TINY  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODEL = ["vocab_size=97", "d_model=64", "n_heads=4", "n_layers=2", "n_seq=40", "ffn_dim=96",
         "attention_geometry=hyperbolic"]


def on_hyperboloid(shape, curvature, spread=0.7):
    """Random float64 tangent vectors (..., heads, D) mapped by expmap0: (x_s, x0)."""
    return expmap0(spread * torch.randn(*shape, dtype=torch.float64), curvature)


def inputs(batch, seq, heads, kv_heads, head_dim, dtype=torch.float64, device="cpu"):
    """q_s, k_s, q0, k0, v, curvature, beta, all leaves that require grad."""
    torch.manual_seed(0)
    curvature = torch.rand(kv_heads, dtype=torch.float64) + 0.5
    q_s, q0 = on_hyperboloid((batch, seq, heads, head_dim), curvature.repeat_interleave(heads // kv_heads))
    k_s, k0 = on_hyperboloid((batch, seq, kv_heads, head_dim), curvature)
    v = torch.randn(batch, seq, kv_heads, head_dim, dtype=torch.float64)
    beta = torch.rand(heads, dtype=torch.float64) + 0.5
    leaves = [q_s.to(dtype), k_s.to(dtype), q0.float(), k0.float(), v.to(dtype), curvature.float(), beta.float()]
    if dtype == torch.float64:
        leaves[2:4], leaves[5:] = [q0, k0], [curvature, beta]
    return [t.detach().to(device).requires_grad_() for t in leaves]


# --- the math ------------------------------------------------------------------------------------------------

def test_expmap_lands_on_the_hyperboloid_at_the_tangent_norm_as_distance_from_the_origin():
    c = torch.tensor([0.3, 2.0], dtype=torch.float64)
    v = 0.5 * torch.randn(3, 5, 2, 8, dtype=torch.float64)
    x_s, x0 = expmap0(v, c)
    torch.testing.assert_close(c * (x0 ** 2 - (x_s ** 2).sum(-1)), torch.ones_like(x0))  # -c <x, x>_L = 1
    # the distance from the origin (1/sqrt(c), 0) is |v|: arcosh(sqrt(c) x0) / sqrt(c)
    torch.testing.assert_close(torch.acosh(c.sqrt() * x0) / c.sqrt(), v.norm(dim=-1))


def test_expmap_clips_the_tangent_norm_and_is_smooth_at_zero():
    c = torch.tensor([1.0], dtype=torch.float64)
    far = torch.zeros(1, 1, 4, dtype=torch.float64)
    far[..., 0] = 50.0
    _, x0 = expmap0(far, c)
    assert x0.item() == pytest.approx(math.cosh(MAX_TANGENT_NORM))
    zero = torch.zeros(1, 1, 4, dtype=torch.float64, requires_grad=True)
    x_s, _ = expmap0(zero, c)
    x_s.sum().backward()
    torch.testing.assert_close(zero.grad, torch.ones_like(zero))  # d exp0(v) / dv = I at v = 0


def test_scores_are_minus_beta_times_the_distance_computed_by_hand():
    q_s, k_s, q0, k0, v, c, beta = inputs(1, 3, 1, 1, 4)
    with torch.no_grad():
        probs = []
        for i in range(3):
            z = c * (q0[0, i, 0] * k0[0, :, 0] - k_s[0, :, 0] @ q_s[0, i, 0])
            distance = torch.log(z + torch.sqrt(z * z - 1)) / c.sqrt()
            probs.append((-beta * distance).softmax(0))
        expected = torch.stack(probs) @ v[0, :, 0]
        torch.testing.assert_close(hyperbolic_attention_reference(q_s, k_s, q0, k0, v, c, beta, causal=False)[0, :, 0],
                                   expected)


def test_small_curvature_tends_to_euclidean_distance_attention():
    """As c -> 0 the hyperboloid flattens: d_c(exp0 u, exp0 w) -> |u - w|."""
    torch.manual_seed(1)
    u, w = torch.randn(2, 1, 6, 1, 8, dtype=torch.float64)
    v = torch.randn(1, 6, 1, 8, dtype=torch.float64)
    c, beta = torch.tensor([1e-6], dtype=torch.float64), torch.tensor([1.3], dtype=torch.float64)
    (q_s, q0), (k_s, k0) = expmap0(u, c), expmap0(w, c)
    out = hyperbolic_attention_reference(q_s, k_s, q0, k0, v, c, beta, causal=True)
    scores = -beta * torch.cdist(u[0, :, 0], w[0, :, 0])
    scores = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(out[0, :, 0], scores.softmax(-1) @ v[0, :, 0], atol=1e-4, rtol=1e-4)


def test_reference_gradients_match_float64_finite_differences_through_the_expmap():
    torch.manual_seed(2)
    q, k = (0.6 * torch.randn(1, 5, 2, 4, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 5, 1, 4, dtype=torch.float64)
    c, beta = torch.tensor([0.7], dtype=torch.float64), torch.tensor([0.8, 1.6], dtype=torch.float64)
    k = k[:, :, :1]  # one kv head for two query heads

    def attend(q, k, v, c, beta):
        q_s, q0 = expmap0(q, c.repeat_interleave(2))
        k_s, k0 = expmap0(k, c)
        return hyperbolic_attention_reference(q_s, k_s, q0, k0, v, c, beta, causal=True)

    assert torch.autograd.gradcheck(attend, [t.requires_grad_() for t in (q, k, v, c, beta)])


def test_the_guard_keeps_gradients_finite_where_query_and_key_coincide():
    q_s, k_s, q0, k0, v, c, beta = inputs(1, 4, 1, 1, 4)
    out = hyperbolic_attention_reference(q_s, q_s, q0, q0, v, c, beta, causal=False)  # z = 1 on the diagonal
    out.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q_s, q0, v, c, beta))


# --- the kernel ----------------------------------------------------------------------------------------------

def kernel_or_skip():
    from kernels.attention import INTERPRETED, hyperbolic_flash_attention
    from kernels.support import runs_here
    if not runs_here(INTERPRETED):
        pytest.skip("kernels was imported before TRITON_INTERPRET=1 was set (see tests/test_kernels.py)")
    return hyperbolic_flash_attention


@pytest.mark.parametrize("dtype,batch,seq,heads,kv_heads,causal,tolerance", [
    (torch.float32, 1, 37, 2, 1, True, 2e-5),  # grouped heads, a ragged last block, causal
    (torch.float32, 2, 21, 2, 2, False, 2e-5),  # bidirectional
    (torch.float16, 1, 19, 2, 2, True, 2e-2),
])
def test_kernel_matches_the_float64_reference_forward_and_every_gradient(dtype, batch, seq, heads, kv_heads,
                                                                         causal, tolerance):
    attend = kernel_or_skip()
    ours = inputs(batch, seq, heads, kv_heads, 16, dtype, DEVICE)
    reference = [t.detach().double().requires_grad_() for t in ours]
    out = attend(*ours, causal=causal)
    expected = hyperbolic_attention_reference(*reference, causal=causal)
    grad = torch.randn_like(expected)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    errors = {"out": (out.double() - expected).abs().max().item()}
    for name, a, b in zip(["q_s", "k_s", "q0", "k0", "v", "curvature", "beta"], ours, reference):
        errors[name] = ((a.grad.double() - b.grad).abs().max() / b.grad.abs().max().clamp_min(1)).item()
    assert max(errors.values()) < tolerance, errors


def test_custom_ops_pass_torch_library_opcheck():
    """Schema, fake (meta) versions and autograd registration agree with the real kernels."""
    kernel_or_skip()
    q_s, k_s, q0, k0, v, c, beta = (t.detach() for t in inputs(1, 9, 2, 1, 16, torch.float32, DEVICE))
    o, lse = torch.ops.kernels.hyperbolic_attention_forward(q_s, k_s, q0, k0, v, c, beta, True)
    torch.library.opcheck(torch.ops.kernels.hyperbolic_attention_forward,
                          (q_s.requires_grad_(), k_s, q0, k0, v, c.requires_grad_(), beta, True))
    torch.library.opcheck(torch.ops.kernels.hyperbolic_attention_backward,
                          (torch.randn_like(o), q_s.detach(), k_s, q0, k0, v, c.detach(), beta, o, lse, True))


def test_kernel_refuses_mismatched_geometry():
    attend = kernel_or_skip()
    q_s, k_s, q0, k0, v, c, beta = inputs(1, 5, 2, 1, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="one value per kv head"):
        attend(q_s, k_s, q0, k0, v, beta, beta)


# --- schedule, config, engine --------------------------------------------------------------------------------

def test_schedules_go_from_start_to_the_curvature_over_the_warmup_then_stay():
    assert [curvature_at(s, "constant", 0.1, 1.0, 10) for s in (0, 5, 20)] == [1.0, 1.0, 1.0]
    assert [curvature_at(s, "linear", 0.1, 1.0, 10) for s in (0, 5, 10, 20)] == pytest.approx([0.1, 0.55, 1.0, 1.0])
    cosine = [curvature_at(s, "cosine", 0.1, 1.0, 10) for s in range(12)]
    assert cosine[0] == pytest.approx(0.1) and cosine[5] == pytest.approx(0.55) and cosine[10:] == [1.0, 1.0]
    assert all(a < b for a, b in zip(cosine[:10], cosine[1:11]))
    assert cosine[1] - cosine[0] < curvature_at(1, "linear", 0.1, 1.0, 10) - 0.1  # cosine starts slower


@pytest.mark.parametrize("override,expected", [
    (["attention=sdpa"], "set attention=triton"),
    (["curvature=0"], "'curvature' must be > 0"),
    (["curvature_schedule=linear"], "needs curvature_warmup_steps > 0"),
    (["curvature_schedule=steep", "curvature_warmup_steps=5"], "curvature_schedule"),
    (["attention_geometry=spherical"], "attention_geometry"),
])
def test_bad_hyperbolic_settings_are_named(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, MODEL + override)


def test_a_scheduled_run_with_learned_curvature_resumes_exactly(tmp_path):
    from engine.train import Trainer

    schedule = ["attention_geometry=hyperbolic", "curvature_learned=true", "curvature_schedule=cosine",
                "curvature_start=0.2", "curvature=1.5", "curvature_warmup_steps=4"]
    trainers = {}

    def trainer_for(run, *more):
        trainers[run] = Trainer(load_config(None, TINY + [f"out_dir={tmp_path / run}", "max_steps=6", *schedule,
                                                          *more]))
        return trainers[run]

    a, _ = assert_resume_is_exact(trainer_for, tmp_path, "phase7")
    scales = [v for k, v in a["model"].items() if k.endswith("curvature_scale")]
    assert len(scales) == 2 and all(s.item() == 1.5 for s in scales)  # past the warm-up
    factors = [v for k, v in a["model"].items() if k.endswith("log_curvature")]
    assert factors and all(f.abs().max() > 0 for f in factors)  # learned


def test_mdm_runs_hyperbolic_blocks_bidirectionally():
    from phases.mdm import build_model as build_mdm

    torch.manual_seed(0)
    model = build_mdm(load_config(None, ["phase=mdm"] + MODEL))
    x = torch.randint(0, 97, (2, 9))
    model.hidden_states(x).sum().backward()
    assert not model.layers[0].self_attn.causal and model.layers[0].self_attn.log_beta.grad.abs().max() > 0
    last = model.hidden_states(x)[:, 0]
    x[:, -1] = (x[:, -1] + 1) % 97  # a later token changes an earlier position's state: no causal mask
    assert not torch.allclose(last, model.hidden_states(x)[:, 0])


@pytest.mark.parametrize("on_meta", [False, True])
def test_beta_and_the_learned_curvature_factor_start_at_one_and_c_at_the_configured_curvature(on_meta):
    """Built directly or on the meta device then init_weights (every run and rank, engine/init.py): the
    log-scales start at zero, not at a vector's default of one, and the curvature buffer holds `curvature`."""
    from engine.init import build_initialised
    from phases import get_phase

    cfg = load_config(None, MODEL + ["curvature=0.5", "curvature_learned=true"])
    model = build_initialised(get_phase("phase7"), cfg) if on_meta else build_model(cfg)
    attention = model.layers[1].self_attn
    assert torch.equal(attention.log_beta, torch.zeros(4)) and torch.equal(attention.log_curvature, torch.zeros(4))
    assert torch.equal(attention.curvature(), torch.full((4,), 0.5))


def test_cached_decoding_matches_the_full_forward():
    torch.manual_seed(0)
    model = build_model(load_config(None, MODEL)).eval()
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        full = model.hidden_states(x)
        cache = model.new_cache(1, 8)
        steps = [model.hidden_states(x[:, :5], cache=cache, start=0)[:, -1]]
        steps += [model.hidden_states(x[:, i:i + 1], cache=cache, start=i)[:, -1] for i in range(5, 8)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], atol=1e-5, rtol=1e-4)


def test_export_refuses_a_hyperbolic_checkpoint_in_one_line(tmp_path):
    from phases.phase7.export import main as export

    cfg = load_config(None, MODEL)
    save_checkpoint(tmp_path / "model.pt", {"phase": "phase7", "config": cfg.to_dict(),
                                            "model": build_model(cfg).state_dict()})
    with pytest.raises(CheckpointError, match="no hyperbolic attention") as error:
        export([str(tmp_path / "model.pt"), str(tmp_path / "hf")])
    assert "\n" not in str(error.value) and not (tmp_path / "hf").exists()


def test_bench_reports_each_variant_against_euclidean_and_reuses_finished_runs(tmp_path, capsys):
    from bench import hyperbolic_attention

    argv = ["--steps", "2", "--seeds", "1", "--rounds", "1", "--steps-per-round", "1", "--no-record",
            "--runs", str(tmp_path), "--variants", "euclid,hlinear", *TINY]
    hyperbolic_attention.main(argv)
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r[1].strip() for r in rows[1:]] == ["euclidean", "hyperbolic, c linear 0.1 -> 1 over 100 steps"]
    assert rows[1][4].strip() == "+0.0000" and rows[1][6].strip() == "1.00x"
    hyperbolic_attention.main(argv)  # the finished runs are read, not trained again
    assert "continuing from" in capsys.readouterr().out


def test_phase8_refuses_hyperbolic_attention():
    with pytest.raises(ConfigError, match="phase 7 and mdm"):
        load_config(None, ["phase=phase8", *MODEL])
