"""The tensor-train embedding: the cores against the table they stand for."""

import pytest
import torch

from phases.phase7.tt_embedding import TTEmbedding, dim_factors, tt_param_count, vocab_factors


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
