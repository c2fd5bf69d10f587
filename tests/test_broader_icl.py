"""The forms of in-context learning as sequences, and the context-benefit measure (2412.03782)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from paperzoo.core.tasks import TaskModelConfig
from paperzoo.phenomena.broader_icl import (CONTENT, FORMS, PAD, SEPARATOR, TASKS_PER_SEQUENCE, ContextForms,
                                            context_benefit, token_losses, window_means)


@pytest.fixture(scope="module")
def drawn():
    return ContextForms().sample_with_meta(6 * 40, seed=3)


def _rows(drawn, name):
    batch, meta = drawn
    rows = meta.form == FORMS.index(name)
    return batch.tokens[rows], meta.informative[rows], meta.task[rows]


def test_sampling_is_deterministic_and_marks_each_form():
    a, _ = ContextForms().sample_with_meta(12, seed=5)
    b, _ = ContextForms().sample_with_meta(12, seed=5)
    assert torch.equal(a.tokens, b.tokens)
    assert a.tokens[:, 0].tolist() == [CONTENT + i % len(FORMS) for i in range(12)]
    assert not a.scored[:, 0].any() and torch.equal(a.scored[:, 1:], a.tokens[:, 1:] != PAD)


def test_key_value_binds_each_key_to_one_value_per_sequence(drawn):
    tokens, informative, _ = _rows(drawn, "key_value")
    for x in tokens:
        body = x[1:].view(-1, 2)
        bound = {}
        for k, v in body.tolist():
            assert bound.setdefault(k, v) == v and k < 32 <= v < CONTENT
        assert len(bound) <= 4
    assert informative[:, 2::2].all() and not informative[:, 1::2].any()


def test_meta_icl_tasks_share_one_label_set_with_fresh_bijections(drawn):
    tokens, informative, task = _rows(drawn, "tasks")
    for x, t in zip(tokens, task):
        label_sets = []
        for j in range(TASKS_PER_SEQUENCE):
            at = (t == j).nonzero().flatten()
            pairs = {(int(x[i - 1]), int(x[i])) for i in at}
            keys = {k for k, _ in pairs}
            assert len(pairs) == len(keys)  # a function of the key within the task
            assert len({v for _, v in pairs}) == len(pairs)  # injective: a bijection onto the label set
            label_sets.append({v for _, v in pairs})
        union = set().union(*label_sets)
        assert len(union) <= 4  # one label set of four serves every task
    assert (tokens == SEPARATOR).sum(1).eq(TASKS_PER_SEQUENCE).all()


def test_series_follow_pattern_plus_trend(drawn):
    tokens, _, _ = _rows(drawn, "series")
    for x in tokens[:, 1:]:
        x = x.long()
        ok = False
        for period in (2, 3, 4):
            for slope in (0, 1):
                t = torch.arange(len(x))
                detrended = (x - slope * t) % CONTENT
                if torch.equal(detrended[period:], detrended[:-period]):
                    ok = True
        assert ok


def test_names_come_from_three_per_sequence(drawn):
    tokens, informative, _ = _rows(drawn, "names")
    for x, info in zip(tokens, informative):
        names = set(x[info].tolist())
        assert names <= set(range(48, 64)) and len(names) <= 3
        assert (x[1:][~info[1:]] < 48).all()


def test_token_losses_match_the_models_own_loss():
    torch.manual_seed(0)
    model = TaskModelConfig(16, 1, 2).build(ContextForms().vocab_size, 97)
    batch = ContextForms().sample(6, seed=1)
    losses = token_losses(model, batch.tokens)
    assert torch.isnan(losses[:, 0]).all()
    expected = model(input_ids=batch.tokens, labels=batch.tokens).loss
    assert torch.allclose(losses[:, 1:].mean(), expected, atol=1e-5)


class _Oracle(torch.nn.Module):
    """Reads a key-value sequence: a key seen before predicts its value surely; anything else is uniform."""

    def forward(self, input_ids):
        n, T = input_ids.shape
        logits = torch.zeros(n, T, PAD + 1)
        for i in range(n):
            bound = {}
            for t in range(2, T, 2):
                bound[int(input_ids[i, t - 1])] = int(input_ids[i, t])
            for t in range(1, T, 2):  # position t holds a key; it predicts the value at t + 1
                k = int(input_ids[i, t])
                first = next(s for s in range(1, T, 2) if int(input_ids[i, s]) == k)
                if first < t:
                    logits[i, t, bound[k]] = 30.0
        return SimpleNamespace(logits=logits)


def test_context_benefit_is_positive_when_context_tells_the_answer(drawn):
    tokens, informative, _ = _rows(drawn, "key_value")
    interval, per_sequence = context_benefit(_Oracle().eval(), tokens, informative, slice(1, 25), slice(73, 97))
    assert interval.low > 1.0  # early values are often first presentations (log 72 nats); late ones never are
    assert per_sequence.shape == (len(tokens),)


def test_context_benefit_is_zero_for_a_context_blind_model(drawn):
    tokens, informative, _ = _rows(drawn, "key_value")
    losses = torch.full(tokens.shape, 2.0)  # the same loss everywhere: nothing learned from context
    interval, b = context_benefit(None, tokens, informative, slice(1, 25), slice(73, 97), losses=losses)
    assert np.allclose(b, 0.0) and interval.low == interval.high == 0.0


def test_window_means_average_only_chosen_positions():
    losses = torch.tensor([[9.0, 1.0, 3.0, 100.0], [9.0, 5.0, 7.0, 100.0]])
    chosen = torch.tensor([[False, True, True, False], [False, False, True, True]])
    assert window_means(losses, chosen, slice(0, 3)).tolist() == [2.0, 7.0]
    assert np.isnan(window_means(losses, chosen & False, slice(0, 3))).all()
