"""Counting constructions: exact histograms when d >= m, the Welch bound below, CountAttend and its inverse MLP."""

import math

import pytest
import torch

from paperzoo.core.tasks import QueryCount
from paperzoo.phenomena.transformer_counting import (
    coherence, count_attend, histogram_count, inverse_mlp, welch_bound)


def _words(m=6, n=12, B=200, seed=0):
    x = QueryCount(m, n).sample(B, seed).tokens[:, 1:-1]  # drop BOS and the answer
    return x, (x == x[:, -1:]).sum(1)


def test_histogram_counts_exactly_with_orthonormal_embeddings():
    x, c = _words()
    U = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0][:6]  # 6 orthonormal rows in R^8
    assert torch.allclose(histogram_count(x, U), c.double(), atol=1e-9)


def test_below_m_every_embedding_interferes_at_least_by_the_welch_bound():
    m, d = 6, 3
    assert welch_bound(m, d) == pytest.approx(math.sqrt(3 / 15)) and welch_bound(m, m) == 0.0
    for seed in range(5):
        U = torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert coherence(U) >= welch_bound(m, d) - 1e-12
    mercedes = torch.tensor([[math.cos(a), math.sin(a)] for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)])
    assert coherence(mercedes) == pytest.approx(welch_bound(3, 2))  # an equiangular tight frame meets it
    x, c = _words(m=3, n=9)
    err = (histogram_count(x, mercedes.double()) - c).abs()
    foreign = 9 - c
    assert torch.allclose(err, foreign.double() * 0.5)  # each foreign token adds exactly -mu: the interference is the bound


def test_count_attend_puts_one_over_c_plus_one_on_bos_even_below_m():
    x, c = _words(m=3, n=9)
    mercedes = torch.tensor([[math.cos(a), math.sin(a)] for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)])
    w = count_attend(x, mercedes, beta=60.0)
    assert torch.allclose(w, 1.0 / (c + 1).double(), atol=1e-12)
    assert not torch.allclose(count_attend(x, mercedes, beta=1.0), 1.0 / (c + 1).double(), atol=1e-2)  # beta too small


def test_inverse_mlp_recovers_every_count_from_its_attention_weight():
    n = 12
    mlp = inverse_mlp(n)
    w = 1.0 / (torch.arange(0, n + 1, dtype=torch.float64) + 1)
    assert torch.allclose(mlp(w[:, None]).squeeze(1), torch.arange(0, n + 1, dtype=torch.float64), atol=1e-9)
    assert sum(p.numel() for p in mlp[0].parameters()) == 2 * n  # n hidden ReLUs: width grows with n


def test_counting_end_to_end_below_m():
    x, c = _words(m=3, n=9, seed=3)
    mercedes = torch.tensor([[math.cos(a), math.sin(a)] for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)])
    counts = inverse_mlp(9)(count_attend(x, mercedes, beta=60.0)[:, None]).squeeze(1)
    assert torch.equal(counts.round().long(), c)


# The experiment's predicate on hand-built grids ------------------------------------------------

from paperzoo.experiments.phenomena import transformer_counting as exp  # noqa: E402


def _grid(counting: dict[str, dict[int, int]]) -> dict:
    """A grid where, per task and m, every d >= the given threshold counts and every smaller d clearly does not."""
    grid = [{"task": task, "m": m, "d": d, "counts": d >= thresholds[m]}
            for task, thresholds in counting.items() for m in (8, 16, 32) for d in (m // 2, m, 2 * m)]
    return {"vocabularies": [8, 16, 32], "grid": grid}


def test_counting_predicate_reads_a_threshold_proportional_to_m():
    m = _grid({"QC": {8: 8, 16: 16, 32: 32}, "MFE": {8: 16, 16: 16, 32: 64}})
    assert all(exp.preconditions(m).values())
    assert exp.thresholds(m, "QC") == {8: 8, 16: 16, 32: 32}
    assert list(exp.checks(m).values()) == [True, True, True]


def test_counting_predicate_fails_when_one_d_serves_every_m_or_mfe_needs_less():
    flat = _grid({"QC": {8: 16, 16: 16, 32: 16}, "MFE": {8: 16, 16: 16, 32: 16}})  # d = 16 counts at m = 32
    below, slope, mfe = exp.checks(flat).values()
    assert below is False and slope is False and mfe is True
    steep = _grid({"QC": {8: 4, 16: 16, 32: 64}, "MFE": {8: 16, 16: 32, 32: 64}})  # slope 2: faster than m
    assert list(exp.checks(steep).values())[1] is False
    cheap_mfe = _grid({"QC": {8: 8, 16: 16, 32: 32}, "MFE": {8: 4, 16: 16, 32: 32}})
    assert list(exp.checks(cheap_mfe).values())[2] is False


def test_counting_predicate_is_undecided_on_a_straddling_interval_and_needs_the_top_of_the_grid():
    m = _grid({"QC": {8: 8, 16: 16, 32: 32}, "MFE": {8: 8, 16: 16, 32: 32}})
    next(c for c in m["grid"] if c["task"] == "QC" and c["m"] == 16 and c["d"] == 8)["counts"] = None
    assert list(exp.checks(m).values()) == [None, None, None]
    next(c for c in m["grid"] if c["task"] == "QC" and c["m"] == 32 and c["d"] == 16)["counts"] = True
    assert list(exp.checks(m).values())[0] is False  # one cell below m counts: decided, whatever the undecided one
    never = _grid({"QC": {8: 8, 16: 16, 32: 32}, "MFE": {8: 8, 16: 16, 32: 32}})
    next(c for c in never["grid"] if c["task"] == "QC" and c["m"] == 32 and c["d"] == 64)["counts"] = False
    assert list(exp.preconditions(never).values()) == [False]


def test_counts_reads_the_bootstrap_interval_against_the_bar():
    assert exp.counts([1.0] * 980 + [0.0] * 20) is True
    assert exp.counts([1.0] * 500 + [0.0] * 500) is False
    assert exp.counts([1.0] * 9 + [0.0] * 1) is None  # 90% of 10: the interval straddles the bar
    assert exp.loglog_slope([8, 16, 32], [8, 16, 32]) == pytest.approx(1.0)


def test_mfe_check_reads_bounds_when_an_mfe_cell_straddles_the_bar():
    m = _grid({"QC": {8: 8, 16: 16, 32: 32}, "MFE": {8: 16, 16: 32, 32: 64}})
    mfe8 = {c["d"]: c for c in m["grid"] if c["task"] == "MFE" and c["m"] == 8}
    mfe8[8]["counts"] = None  # d*_MFE(8) is 8 or 16: either way >= d*_QC(8) = 8
    assert list(exp.checks(m).values())[2] is True
    mfe8[8]["counts"], mfe8[4]["counts"] = True, None  # d*_MFE(8) is 4 or 8: undecided against 8
    assert list(exp.checks(m).values())[2] is None
    mfe8[4]["counts"] = True  # surely below
    assert list(exp.checks(m).values())[2] is False
    assert exp.counting_bounds([{"d": 4, "counts": False}, {"d": 8, "counts": False}]) == (None, None)
