"""2408.12578: the typed language (parser, type checker, task rows) and the bipartite percolation model."""

import math

import numpy as np
import pytest
import torch

from paperzoo.core.tasks import TypedLanguage, TypedLanguageTask
from paperzoo.phenomena import percolation_emergence as pe

LANG = TypedLanguage(entities=12, properties=24, classes=3, max_clauses=3, held_out=0.25, seed=0)


def _rows(task, n=3000, seed=0):
    batch = task.sample(n, seed)
    return batch, task.sentences(batch.tokens)


@pytest.mark.parametrize("split", ["train", "held_out", "all"])
def test_every_sample_parses_and_type_checks(split):
    task = TypedLanguageTask(LANG, mix=(1, 1, 1), split=split)
    batch, sentences = _rows(task)
    pool = set({"train": LANG.split_pairs[0], "held_out": LANG.split_pairs[1], "all": LANG.valid_pairs}[split])
    assert batch.tokens.shape == (3000, task.length) and int(batch.tokens.max()) < task.vocab_size
    counts = set()
    for row, sentence in zip(batch.tokens.tolist(), sentences):
        clauses = LANG.parse(sentence)
        assert clauses is not None, row
        assert all(LANG.type_check(clauses)) and set(clauses) <= pool
        assert len({LANG.entity_class(e) for e, _ in clauses}) == len(clauses)  # distinct classes per clause
        counts.add(len(clauses))
        task_id = row[0] - LANG.task_token(0)
        ops = row[1:row.index(LANG.OUT)]
        words = sentence[: sentence.index(LANG.EOS)]
        if task_id == 0:
            assert ops == []
        elif task_id == 1:
            assert sorted(ops) == sorted(words)  # the bag is the sentence, shuffled
        else:
            assert ops and set(ops) <= {t for pair in clauses for t in pair} and len(set(ops)) == len(ops)
        tail = sentence[sentence.index(LANG.EOS) + 1:]
        assert all(t == LANG.PAD for t in tail)
    assert counts == {1, 2, 3}


def test_parser_and_type_checker_reject_what_they_should():
    E, IS, AND, EOS = LANG.entities, LANG.IS, LANG.AND, LANG.EOS
    k0 = E  # property token of class 0
    assert LANG.parse([0, IS, k0, EOS]) == [(0, k0)]
    assert LANG.parse([0, IS, k0, AND, 1, IS, k0 + 1, EOS, 5, 5]) == [(0, k0), (1, k0 + 1)]
    for bad in ([0, IS, k0], [0, k0, EOS], [IS, 0, k0, EOS], [0, IS, k0, AND, EOS], [0, IS, 1, EOS],
                [k0, IS, 0, EOS], [0, IS, k0, 1, IS, k0, EOS], [0, IS, k0, k0, 1, IS, k0 + 1, EOS],
                [0, IS, k0, AND] * 3 + [0, IS, k0, EOS]):
        assert LANG.parse(bad) is None, bad
    assert LANG.type_check([(0, k0), (0, k0 + 1), (1, k0 + 1), (3, k0 + 3)]) == [True, False, True, True]


def test_held_out_pairs_are_disjoint_and_training_graph_stays_connected():
    train, held = LANG.split_pairs
    assert not set(train) & set(held) and set(train) | set(held) == set(LANG.valid_pairs)
    assert len(LANG.valid_pairs) == LANG.entities * LANG.properties // LANG.classes
    assert 0.1 < len(held) / len(LANG.valid_pairs) < 0.4
    for c in range(LANG.classes):  # every node of the class reached from one of its entities
        pairs = [p for p in train if LANG.entity_class(p[0]) == c]
        nodes = {t for p in pairs for t in p}
        reached, frontier = {pairs[0][0]}, [pairs[0][0]]
        while frontier:
            x = frontier.pop()
            for a, b in pairs:
                for u, v in ((a, b), (b, a)):
                    if u == x and v not in reached:
                        reached.add(v)
                        frontier.append(v)
        assert reached == nodes


def test_determined_scoring_scores_exactly_the_tokens_the_bag_and_types_fix():
    task = TypedLanguageTask(LANG, mix=(0, 1, 0), split="all", min_clauses=3, scoring="determined")
    batch, _ = _rows(task, n=300)
    for row, scored in zip(batch.tokens.tolist(), batch.scored.tolist()):
        out = row.index(LANG.OUT)
        bag = row[1:out]
        for t in range(out + 1, len(row)):
            if row[t] == LANG.PAD:
                assert not scored[t]
                continue
            remaining = list(bag)
            for used in row[out + 1:t]:
                if used in remaining:
                    remaining.remove(used)
            if LANG.is_entity(row[t]):
                fixed = len({x for x in remaining if LANG.is_entity(x)}) == 1
            elif LANG.is_property(row[t]):
                fixed = [LANG.valid(row[t - 2], k) for k in remaining if LANG.is_property(k)].count(True) == 1
            else:
                fixed = True  # 'is', 'and', '<eos>': the grammar fixes them
            assert scored[t] == fixed, (row, t)


def test_samples_are_deterministic_per_seed():
    task = TypedLanguageTask(LANG, mix=(1, 1, 1))
    assert torch.equal(task.sample(50, 3).tokens, task.sample(50, 3).tokens)
    assert not torch.equal(task.sample(50, 3).tokens, task.sample(50, 4).tokens)


def test_threshold_formula():
    assert pe.critical_probability(100, 400) == pytest.approx(1 / 200)
    assert pe.critical_edges(100, 400) == pytest.approx(200)
    s_e, s_k = pe.giant_fraction(0.9 * pe.critical_probability(300, 3000), 300, 3000)
    assert s_e < 1e-6 and s_k < 1e-6  # no giant component below the threshold
    s_e, s_k = pe.giant_fraction(2 * pe.critical_probability(1000, 1000), 1000, 1000)
    assert s_e == pytest.approx(1 - math.exp(-2 * s_e), abs=1e-9) and s_e == pytest.approx(0.7968, abs=1e-3)


@pytest.mark.parametrize("n_e, n_k", [(1500, 1500), (300, 7500)])
def test_simulated_bipartite_graph_percolates_at_the_analytic_threshold(n_e, n_k):
    m_c = pe.critical_edges(n_e, n_k)
    nodes = n_e + n_k
    thresholds = []
    for seed in range(3):
        curve = pe.giant_component_curve(n_e, n_k, edges=int(3 * m_c), seed=seed)
        frac = curve.fraction()
        assert frac[int(0.5 * m_c) - 1] < 0.02  # below: only small components
        for mult in (2.0, 3.0):  # above: the giant component of the fixed point
            s_e, s_k = pe.giant_fraction(mult / math.sqrt(n_e * n_k), n_e, n_k)
            assert frac[int(mult * m_c) - 1] == pytest.approx((n_e * s_e + n_k * s_k) / nodes, abs=0.03)
        thresholds.append(pe.simulated_threshold(curve))
    assert 0.8 * m_c < np.median(thresholds) < 1.4 * m_c
    assert np.median(thresholds) < 0.5 * nodes or n_e == n_k  # not the one-part graph's n/2


def test_distinct_edges_matches_draws_with_replacement():
    rng = np.random.default_rng(0)
    draws = rng.integers(0, 40 * 50, size=3000)
    seen = len(set(draws.tolist()))
    assert seen == pytest.approx(pe.distinct_edges(3000, 40, 50), rel=0.03)


def _fake_curve(midpoint, width, steps, items=400, seed=0):
    rng = np.random.default_rng(seed)
    p = 0.1 + 0.9 / (1 + np.exp(-(steps - midpoint) / width))
    return rng.random((len(steps), items)) < p[:, None]


def test_transition_point_recovers_the_midpoint_with_an_interval():
    steps = np.arange(50, 2001, 50)
    t = pe.transition_point(steps, _fake_curve(800, 60, steps), resamples=100)
    assert t.midpoint.low < 800 < t.midpoint.high and t.midpoint.high - t.midpoint.low < 100
    assert t.sharpness.high < 0.5  # 10%-90% in 4.39 widths = 264 steps over 800
    smooth = pe.transition_point(steps, _fake_curve(1000, 500, steps), resamples=100)
    assert smooth.sharpness.low > 1.0


def test_scaling_exponent_recovers_a_square_root_law():
    steps = np.arange(25, 4001, 25)
    ks = [16, 64, 256]
    ts = [pe.transition_point(steps, _fake_curve(60 * math.sqrt(k), 20, steps, seed=k), resamples=100) for k in ks]
    b = pe.scaling_exponent(ks, [t.replicates for t in ts], [t.fit.midpoint for t in ts])
    assert b.low < pe.PREDICTED_EXPONENT < b.high and b.high - b.low < 0.15
    assert b.mean == pytest.approx(pe.PREDICTED_EXPONENT, abs=0.05)


def test_task_checker_accepts_the_data_and_rejects_wrong_answers():
    batch, sentences = _rows(TypedLanguageTask(LANG, mix=(1, 1, 1)), n=600)
    E, IS, AND, EOS = LANG.entities, LANG.IS, LANG.AND, LANG.EOS
    for row, sentence in zip(batch.tokens.tolist(), sentences):
        task, ops = row[0] - LANG.task_token(0), row[1:row.index(LANG.OUT)]
        assert LANG.solves(task, ops, sentence)
        clauses = LANG.parse(sentence)
        if len(clauses) >= 2 and task == 1:  # swapping two properties across classes breaks the types
            (e1, k1), (e2, k2) = clauses[:2]
            swapped = [e1, IS, k2, AND, e2, IS, k1] + sentence[7:]
            assert not LANG.solves(task, ops, swapped)
            reordered = [e2, IS, k2, AND, e1, IS, k1] + sentence[7:]  # another right order of the same bag
            assert LANG.solves(task, ops, reordered)
    assert not LANG.solves(1, [0, IS, E], [3, IS, E + 3, EOS])  # valid sentence, but not the bag's
    assert not LANG.solves(2, [0], [3, IS, E + 3, EOS])  # misses the condition
    assert LANG.solves(0, [], [3, IS, E + 3, EOS]) and not LANG.solves(0, [], [3, IS, E + 1, EOS])
