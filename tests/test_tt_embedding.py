"""The tensor-train embedding (embedding=tt) and tied heads (tie_embeddings): the cores against the table they
stand for, the model's counts, config checks, checkpoints, resume, chat, mdm and the Hugging Face export."""

import subprocess
import sys

import pytest
import torch

from engine.checkpoint import CheckpointError, check_compatible, save_checkpoint
from engine.config import ConfigError
from engine.sampling import SamplingSettings
from phases import config_from_dict, load_config
from phases.phase7 import build_model, next_token_loss
from phases.phase7.tt_embedding import TTEmbedding, dim_factors, tt_param_count, vocab_factors
from tests.resume_check import assert_resume_is_exact
from tests.test_train import TINY, train

ROOT = __file__.rsplit("/tests/", 1)[0]
MODEL = ["vocab_size=97", "d_model=64", "n_heads=4", "n_layers=2", "n_seq=40", "ffn_dim=96"]


def tiny(*extra):
    torch.manual_seed(0)
    cfg = load_config(None, MODEL + list(extra))
    return build_model(cfg), cfg


# --- the cores ---------------------------------------------------------------------------------------------------

def test_factors_are_near_the_cube_root_with_the_smallest_in_the_middle():
    assert vocab_factors(32000) == (32, 32, 32) and vocab_factors(4096) == (16, 16, 16)
    assert vocab_factors(4097) == (17, 16, 16)  # mdm's extra mask id
    assert vocab_factors(97) == (5, 4, 5) and vocab_factors(2) == (2, 1, 1)
    assert dim_factors(2048) == (16, 8, 16) and dim_factors(128) == (8, 4, 4) and dim_factors(64) == (4, 4, 4)
    assert dim_factors(22) is None and dim_factors(8) == (2, 2, 2)
    for v in (2, 5, 97, 4095, 4096, 4097, 32000, 50257):
        factors = vocab_factors(v)
        assert v <= factors[0] * factors[1] * factors[2] and factors[1] == min(factors)


def test_lookup_is_the_full_tables_rows_in_float64():
    tt = TTEmbedding(97, 64, rank=5).double()  # vocab 5 x 4 x 5 = 100: ids 97..99 are padding
    table = tt.full_table()
    assert table.shape == (97, 64)
    few = torch.tensor([[0, 96, 3, 50], [96, 95, 1, 20]])  # fewer ids than the 20 pairs (i1, i2): per token
    many = torch.randint(0, 97, (3, 30))  # more: through the pairs' products
    for ids in (few, many, torch.arange(97)):
        torch.testing.assert_close(tt(ids), table[ids], rtol=1e-12, atol=1e-14)


def test_ids_map_one_to_one_onto_the_factor_grid_and_never_onto_padding():
    tt = TTEmbedding(97, 64, rank=2)
    i1, i2, i3 = tt.digits(torch.arange(97))
    (v1, v2, v3) = tt.vocab_factors
    cells = i1 * v2 * v3 + i2 * v3 + i3
    assert torch.equal(cells, torch.arange(97))  # distinct, in order, and all below the padded ids 97..99
    assert int(i1.max()) < v1 and int(i2.max()) < v2 and int(i3.max()) < v3


@pytest.mark.parametrize("n_ids", [6, 33])  # per token / through the pairs' products (20 pairs)
def test_gradients_reach_every_core_as_through_the_full_table(n_ids):
    tt = TTEmbedding(97, 64, rank=5).double()
    ids = torch.randint(0, 97, (3, n_ids // 3))
    upstream = torch.randn(3, n_ids // 3, 64, dtype=torch.float64)
    (tt(ids) * upstream).sum().backward()
    lookup = [p.grad.clone() for p in tt.parameters()]
    tt.zero_grad()
    (tt.full_table()[ids] * upstream).sum().backward()
    for got, expected in zip(lookup, [p.grad for p in tt.parameters()]):
        assert expected.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rank", [4, 16, 64])
def test_init_gives_the_table_the_dense_init_std(rank):
    torch.manual_seed(0)
    table = TTEmbedding(4096, 128, rank, init_std=0.02).full_table()
    assert table.mean().abs() < 0.002
    assert table.std().item() == pytest.approx(0.02, rel=0.12)
    assert table.norm(dim=1).mean().item() == pytest.approx(0.02 * 128 ** 0.5, rel=0.15)  # rows, as dense


def test_parameter_count_is_v1_d1_r_plus_v2_d2_r2_plus_v3_d3_r():
    tt = TTEmbedding(4096, 128, 16)  # 16^3 by 8 x 4 x 4
    assert sum(p.numel() for p in tt.parameters()) == tt_param_count(4096, 128, 16) == (
        16 * 8 * 16 + 16 * 4 * 16 ** 2 + 16 * 4 * 16)
    # The seed's table, 32000 x 2048 = 65.5M dense: 32^3 by 16 x 8 x 16
    assert tt_param_count(32000, 2048, 16) == 512 * 16 + 256 * 16 ** 2 + 512 * 16 == 81_920
    assert tt_param_count(32000, 2048, 64) == 1_114_112


# --- config ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    (["embedding=tt"], "needs tt_rank > 0"),
    (["tt_rank=8"], "tt_rank=8 is for embedding=tt"),
    (["embedding=tt", "tt_rank=8", "d_model=22", "n_heads=1"], "d_model=22 has no such split"),
    (["embedding=tt", "tt_rank=21"], r"tt_rank=21 is more than this table can use.*at most 20"),
    (["embedding=ttt", "tt_rank=8"], "'embedding' must be one of dense, tt"),
])
def test_impossible_tt_settings_are_named(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, MODEL + override)


def test_checkpoints_refuse_the_other_embedding_and_old_ones_load_as_dense_untied(tmp_path):
    dense_model, dense_cfg = tiny()
    saved = dense_cfg.to_dict()
    for key in ("embedding", "tt_rank", "tie_embeddings"):  # a checkpoint from before these keys
        del saved[key]
    old = {"phase": "phase7", "config": saved, "model": dense_model.state_dict()}
    restored = config_from_dict(saved)
    assert (restored.embedding, restored.tt_rank, restored.tie_embeddings) == ("dense", 0, False)
    check_compatible(old, dense_cfg, "old.pt")
    build_model(restored).load_state_dict(old["model"])
    _, tt_cfg = tiny("embedding=tt", "tt_rank=4")
    with pytest.raises(CheckpointError, match=r"another model shape: embedding=dense \(config: tt\), "
                                              r"tt_rank=0 \(config: 4\)"):
        check_compatible(old, tt_cfg, "old.pt")
    _, tied_cfg = tiny("tie_embeddings=true")
    with pytest.raises(CheckpointError, match=r"tie_embeddings=False \(config: True\)"):
        check_compatible(old, tied_cfg, "old.pt")


# --- the model -----------------------------------------------------------------------------------------------------

def test_counts_leave_out_the_input_embedding_and_count_a_tied_head_once():
    dense, _ = tiny()
    blocks_and_norm = sum(p.numel() for n, p in dense.named_parameters() if not n.startswith(("embed", "lm_head")))
    table, cores = 97 * 64, tt_param_count(97, 64, 4)
    for extra, total, n in [((), blocks_and_norm + 2 * table, blocks_and_norm + table),
                            (("tie_embeddings=true",), blocks_and_norm + table, blocks_and_norm + table),
                            (("embedding=tt", "tt_rank=4"), blocks_and_norm + cores + table, blocks_and_norm + table),
                            (("embedding=tt", "tt_rank=4", "tie_embeddings=true"), blocks_and_norm + cores,
                             blocks_and_norm + table)]:
        model, _ = tiny(*extra)
        assert (model.num_params(exclude_embedding=False), model.num_params()) == (total, n), extra
    tt, _ = tiny("embedding=tt", "tt_rank=4")
    (d1, d2, d3), r = tt.embed_tokens.dim_factors, 4
    assert tt.flops_per_token(40) == dense.flops_per_token(40) + 6 * d1 * d2 * r * (r + d3)
    assert "embedding tt rank 4" in tt.describe() and "tied output head" in tiny("tie_embeddings=true")[0].describe()


@pytest.mark.parametrize("extra", [("tie_embeddings=true",), ("embedding=tt", "tt_rank=4", "tie_embeddings=true")])
def test_a_tied_head_is_the_embeddings_table_and_trains_through_it(extra):
    model, cfg = tiny(*extra)
    assert model.lm_head is None and not any(k.startswith("lm_head") for k in model.state_dict())
    embed = model.embed_tokens
    table = embed.weight if cfg.embedding == "dense" else embed.full_table()
    torch.testing.assert_close(model.output_weight(), table)
    batch = torch.randint(0, 97, (2, 21))

    def embedding_grads(fused: bool) -> list[torch.Tensor]:
        model.zero_grad()
        next_token_loss(model, batch, load_config(None, MODEL + list(extra) + [f"fused_cross_entropy={fused}"])
                        ).backward()
        return [p.grad.clone() for p in embed.parameters()]

    fused, plain = embedding_grads(True), embedding_grads(False)  # the fused loss's weight gradient arrives too
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    model.zero_grad()
    (model.hidden_states(batch) * torch.randn(2, 21, 64)).sum().backward()  # the input side alone differs
    assert all(not torch.allclose(a, p.grad) for a, p in zip(fused, embed.parameters()))


def test_mdm_with_a_tied_tt_embedding_samples_without_the_mask_token():
    from phases.mdm import build_model as build_mdm
    from phases.mdm import generate

    torch.manual_seed(0)
    model = build_mdm(load_config(None, ["phase=mdm"] + MODEL + ["embedding=tt", "tt_rank=4",
                                                                "tie_embeddings=true"])).eval()
    assert model.embed_tokens.num_embeddings == 98 and model.output_weight().shape == (98, 64)
    out = generate(model, torch.randint(0, 97, (1, 5)), SamplingSettings(max_new_tokens=12, steps=4))
    assert out.shape == (1, 12) and int(out.max()) < 97


# --- engine: resume, chat, export --------------------------------------------------------------------------------

@pytest.mark.parametrize("phase, extra", [("phase7", ("embedding=tt", "tt_rank=4")),
                                          ("mdm", ("embedding=tt", "tt_rank=4", "tie_embeddings=true"))])
def test_a_tt_run_resumes_exactly(tmp_path, phase, extra):
    from engine.train import Trainer

    a, _ = assert_resume_is_exact(lambda run, *more: Trainer(load_config(None, TINY + [
        f"out_dir={tmp_path / run}", "max_steps=6", f"phase={phase}", *extra, *more])), tmp_path, phase)
    assert "embed_tokens.core2" in a["model"]
    assert ("lm_head.weight" in a["model"]) == ("tie_embeddings=true" not in extra)


def test_memory_mode_updates_tied_tt_cores_once_per_step(tmp_path):
    """The in-backward optimizer's hook fires once per parameter per backward, though the cores serve twice."""
    trainer = train(tmp_path, "max_steps=2", "memory_mode=true", "embedding=tt", "tt_rank=4", "tie_embeddings=true")
    assert trainer.step == 2 and all(r["loss"] == r["loss"] for r in trainer.log)


def test_chat_loads_a_tied_tt_checkpoint(tmp_path):
    from tests.tiny_tokenizer import tiny_bpe

    tiny_bpe().save(str(tmp_path / "tokenizer.json"))
    train(tmp_path, f"tokenizer={tmp_path / 'tokenizer.json'}", "vocab_size=300", "max_steps=2",
          "embedding=tt", "tt_rank=4", "tie_embeddings=true")
    result = subprocess.run([sys.executable, "-m", "engine.chat", str(tmp_path / "run"), "temperature=0",
                             "max_new_tokens=6"], cwd=ROOT, input="to be\nthat is\n", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2 and "phase7_best.pt" in result.stderr


@pytest.mark.parametrize("extra", [("embedding=tt", "tt_rank=4"), ("tie_embeddings=true",),
                                   ("embedding=tt", "tt_rank=4", "tie_embeddings=true")])
def test_export_expands_a_tt_embedding_with_the_same_logits(tmp_path, capsys, extra):
    from transformers import LlamaForCausalLM

    from phases.phase7.export import main as export

    model, cfg = tiny("n_kv_heads=2", *extra)
    save_checkpoint(tmp_path / "model.pt", {"phase": "phase7", "config": cfg.to_dict(), "model": model.state_dict()})
    export([str(tmp_path / "model.pt"), str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert ("TT embedding (rank 4) was expanded to a dense 97 x 64 embed_tokens" in out) == (cfg.embedding == "tt")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    x = torch.randint(0, 97, (2, 25))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), hf(x).logits, atol=2e-5, rtol=1e-4)


def test_bench_reports_each_variant_against_dense(capsys):
    from bench import tt_embedding

    tt_embedding.main(["--steps", "2", "--rounds", "1", "--steps-per-round", "1", "--no-record", "data=dummy",
                       "vocab_size=4096", "n_seq=16", "d_model=128", "n_heads=4", "n_layers=1", "ffn_dim=64",
                       "batch_size=2", "log_every=1", "eval_batches=1", "warmup_steps=1"])
    out = capsys.readouterr().out
    measured, recipe = ({cells[0]: cells[1:] for line in table.splitlines() if line.startswith("| ")
                         for cells in [[c.strip() for c in line.strip("|").split("|")]]}
                        for table in out[out.index("| variant"):].split("\n\n")[:2])
    assert {name for name, _ in tt_embedding.VARIANTS.values()} <= set(measured)
    assert measured["dense"][1] == "+0.0000" and measured["dense"][6] == "1.00x"
    assert measured["tt rank 16"][3] == f"{16 * 8 * 16 + 16 * 4 * 16 ** 2 + 16 * 4 * 16:,}"  # input embedding
    assert measured["dense"][3] == f"{4096 * 128:,}" and measured["tt rank 64, tied head"][4] == measured["dense"][4]
    assert recipe["tt rank 64"][0] == "1.11M"  # the 1.5B recipe's 32000 x 2048 table at rank 64
