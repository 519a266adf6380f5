"""Tensor-train ("HTT") input embedding: the vocab x d_model table as a product of three small cores.

The seed's 1.5B recipe compresses its embedding this way. A token id t < V is written in mixed radix as
(i1, i2, i3) over the vocabulary factors v1 x v2 x v3 >= V (padded up; ids V..v1 v2 v3 - 1 are never looked
up), and a column index of d_model = d1 d2 d3 as (j1, j2, j3). Then

    table[t, (j1, j2, j3)] = sum over a, b < R of  G1[i1, j1, a] G2[i2, a, j2, b] G3[i3, b, j3]

with cores G1 (v1, d1, R), G2 (v2, R, d2, R), G3 (v3, R, d3): v1 d1 R + v2 d2 R^2 + v3 d3 R parameters instead
of V d. The cores are indexed by their vocabulary digit first, so a lookup gathers whole slices. The factor
with the middle core is the smallest of each triple, because that core costs R^2 per entry.

A lookup gathers each token's core slices and contracts them (batched matmuls): the V x d table is never
built. With more tokens than pairs (i1, i2), as in training, the first two cores are contracted once for every
pair, a (v1 v2, d1 d2, R) tensor (R / (v3 d3) of the table's size), and each token gathers its pair's slice:
v1 v2 d1 d2 R^2 multiply-adds once instead of d1 d2 R^2 per token, and a per-token intermediate of d1 d2 R
values instead of G2's R d2 R. With fewer tokens (decoding), each token contracts its own three slices.
`full_table()` builds the table, for a tied output head (once per step), for export and for tests.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 1-D index, through F.embedding: its backward (a dense scatter-add) ran 1.6x faster on
    the CPU than advanced indexing's index_put."""
    return F.embedding(index, table.flatten(1)).view(-1, *table.shape[1:])


def vocab_factors(vocab_size: int) -> tuple[int, int, int]:
    """Three factors, a or a - 1 for a = the cube root rounded up, whose product is the smallest such product
    >= vocab_size: the padding is under 1 / (a - 1) of the vocabulary (32000 -> 32 x 32 x 32, 2.4%; 4096 -> 16^3,
    none)."""
    a = 1
    while a ** 3 < vocab_size:
        a += 1
    low = max(a - 1, 1)
    for triple in ((a, low, low), (a, low, a), (a, a, a)):  # the smallest factor goes to the middle core
        if math.prod(triple) >= vocab_size:
            return triple
    raise AssertionError("unreachable: a^3 >= vocab_size")


def dim_factors(d_model: int) -> tuple[int, int, int] | None:
    """d_model = d1 d2 d3 exactly, each >= 2, the most even such split (largest first, smallest in the middle),
    e.g. 2048 -> (16, 8, 16), 128 -> (8, 4, 4); None when d_model has fewer than three prime factors."""
    best = None
    for x in range(2, d_model + 1):
        if d_model % x:
            continue
        for y in range(x, d_model // x + 1):
            if (d_model // x) % y or d_model // x // y < y:
                continue
            z = d_model // x // y  # x <= y <= z
            if best is None or z / x < best[2] / best[0]:
                best = (x, y, z)
    if best is None:
        return None
    small, mid, large = best
    return large, small, mid


def max_rank(vocab: tuple[int, int, int], dims: tuple[int, int, int]) -> int:
    """The largest rank the three cores can use: the TT ranks of any table are at most min(v1 d1, v3 d3) (the
    sizes of the first and last unfoldings); a larger R adds parameters and no expressiveness."""
    return min(vocab[0] * dims[0], vocab[2] * dims[2])


def tt_shape(vocab_size: int, d_model: int, rank: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(vocab factors, d_model factors) for this table and rank; ValueError, saying what to change, when
    there is none."""
    dims = dim_factors(d_model)
    if dims is None:
        raise ValueError(f"embedding=tt splits d_model into three factors of at least 2; d_model={d_model} has "
                         "no such split (use a multiple of 8, e.g. 128 = 8 x 4 x 4), or embedding=dense")
    vocab = vocab_factors(vocab_size)
    if rank < 1:
        raise ValueError(f"embedding=tt needs tt_rank > 0 (e.g. 16 or 64); got {rank}")
    limit = max_rank(vocab, dims)
    if rank > limit:
        raise ValueError(f"tt_rank={rank} is more than this table can use: {vocab_size} x {d_model} factors as "
                         f"{' x '.join(map(str, vocab))} by {' x '.join(map(str, dims))}, whose TT ranks are at "
                         f"most {limit} (= min(v1 d1, v3 d3)); give tt_rank <= {limit}")
    return vocab, dims


def tt_param_count(vocab_size: int, d_model: int, rank: int) -> int:
    """v1 d1 R + v2 d2 R^2 + v3 d3 R."""
    (v1, v2, v3), (d1, d2, d3) = tt_shape(vocab_size, d_model, rank)
    return v1 * d1 * rank + v2 * d2 * rank ** 2 + v3 * d3 * rank


class TTEmbedding(nn.Module):
    """A drop-in for nn.Embedding(vocab_size, d_model): ids (...) -> (..., d_model), from three TT cores."""

    def __init__(self, vocab_size: int, d_model: int, rank: int, init_std: float = 0.02):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = vocab_size, d_model, rank
        self.vocab_factors, self.dim_factors = tt_shape(vocab_size, d_model, rank)
        (v1, v2, v3), (d1, d2, d3) = self.vocab_factors, self.dim_factors
        self.core1 = nn.Parameter(torch.empty(v1, d1, rank))
        self.core2 = nn.Parameter(torch.empty(v2, rank, d2, rank))
        self.core3 = nn.Parameter(torch.empty(v3, rank, d3))
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.02) -> None:
        """Each core N(0, s^2) with s = (std / R)^(1/3): an entry of the table is a sum of R^2 uncorrelated
        products of three such values, so its variance is R^2 s^6 = std^2, a dense N(0, std^2) table's."""
        for core in (self.core1, self.core2, self.core3):
            nn.init.normal_(core, std=self.core_std(std))

    def core_std(self, std: float) -> float:
        return (std / self.rank) ** (1 / 3)

    def digits(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, v2, v3 = self.vocab_factors
        return ids // (v2 * v3), (ids // v3) % v2, ids % v3

    def pairs(self) -> torch.Tensor:
        """G1 and G2 contracted for every pair (i1, i2): (v1 v2, d1 d2, R), row i1 v2 + i2."""
        (v1, v2, _), (d1, d2, _), R = self.vocab_factors, self.dim_factors, self.rank
        return torch.einsum("pja,qakb->pqjkb", self.core1, self.core2).reshape(v1 * v2, d1 * d2, R)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        (v1, v2, v3), (d1, d2, _), R = self.vocab_factors, self.dim_factors, self.rank
        flat = ids.reshape(-1)
        i1, i2, i3 = self.digits(flat)
        if flat.numel() > v1 * v2:  # then contracting every pair once costs less than once per token
            first_two = gather(self.pairs(), flat // v3)  # (N, d1 d2, R)
        else:
            first_two = torch.bmm(gather(self.core1, i1), gather(self.core2, i2).flatten(2)).view(-1, d1 * d2, R)
        return torch.bmm(first_two, gather(self.core3, i3)).view(*ids.shape, self.embedding_dim)

    def lookup_flops_per_token(self) -> int:
        """Training FLOPs of one token's lookup, at most (the per-token path; forward() takes the pairs' path
        when it is cheaper): 2 d1 d2 R (R + d3) forward, twice that backward. 3.9e6 at d 2048 = 16 x 8 x 16
        and R 64, under 0.1% of a 1.5B model's 6 N = 8.6e9."""
        (d1, d2, d3), R = self.dim_factors, self.rank
        return 3 * 2 * d1 * d2 * R * (R + d3)

    def full_table(self) -> torch.Tensor:
        """The (vocab_size, d_model) table the cores stand for (the padded ids' rows dropped)."""
        table = torch.einsum("pjb,rbl->prjl", self.pairs(), self.core3)  # (v1 v2, v3, d1 d2, d3)
        return table.reshape(-1, self.embedding_dim)[:self.num_embeddings]

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, vocab "
                f"{' x '.join(map(str, self.vocab_factors))}, d {' x '.join(map(str, self.dim_factors))}")
