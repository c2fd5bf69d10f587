"""The synthetic-task library: generators against Python and sympy, determinism, the checker, the trainer."""

import itertools
from collections import Counter

import pytest
import torch
from sympy.combinatorics import Permutation
from sympy.combinatorics.named_groups import AlternatingGroup, SymmetricGroup

from paperzoo.core import tasks


def test_query_count_answers_are_python_counts():
    task = tasks.QueryCount(m=5, n=12)
    batch = task.sample(200, seed=3)
    assert batch.tokens.shape == (200, task.length) and int(batch.tokens.max()) < task.vocab_size
    assert batch.tokens[:, 0].eq(task.bos).all()
    for row in batch.tokens.tolist():
        x, answer = row[1:-1], row[-1]
        assert answer - task.m == x.count(x[-1]) >= 1
    assert batch.scored.sum(1).eq(1).all() and batch.scored[:, -1].all()


def test_query_count_on_every_prefix_answers_the_running_count_and_ends_with_qc():
    task = tasks.QueryCount(m=4, n=10, every_position=True)
    batch = task.sample(200, seed=5)
    assert torch.equal(batch.tokens, tasks.QueryCount(m=4, n=10).sample(200, seed=5).tokens)  # same draws
    for row, target in zip(batch.tokens.tolist(), batch.targets.tolist()):
        x = row[1:-1]
        assert [t - task.m for t in target[2:]] == [x[: i + 1].count(x[i]) for i in range(len(x))]
        assert target[-1] == row[-1]  # the last prefix is the whole sequence: the paper's QC answer
    assert batch.scored[:, :2].eq(False).all() and batch.scored[:, 2:].all()


def test_most_frequent_has_a_unique_answer_equal_to_pythons():
    task = tasks.MostFrequent(m=6, n=10)
    batch = task.sample(300, seed=1)
    assert batch.tokens[:, 0].eq(task.bos).all()
    for row in batch.tokens.tolist():
        (top, c1), (_, c2) = Counter(row[1:-1]).most_common(2)
        assert c1 > c2 and row[-1] == top


def test_samples_are_deterministic_per_seed_and_differ_across_seeds():
    task = tasks.GroupWordProblem("A5", L=8)
    a, b, c = task.sample(16, seed=0), task.sample(16, seed=0), task.sample(16, seed=1)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_symmetric_and_alternating_tables_match_sympy(k):
    elements = sorted(itertools.permutations(range(k)))
    S = tasks.symmetric_group(k)
    assert S.order == SymmetricGroup(k).order() and not S.abelian
    for a, b in itertools.product(range(S.order), repeat=2):
        # our a * b applies b first, then a: sympy's Permutation(b) * Permutation(a)
        expected = (Permutation(list(elements[b])) * Permutation(list(elements[a]))).array_form
        assert list(elements[S.product(a, b)]) == expected
    A = tasks.alternating_group(k)
    even = sorted(tuple(p.array_form) for p in AlternatingGroup(k).generate())
    assert A.order == AlternatingGroup(k).order() and A.abelian == (k <= 3)
    assert all(A.product(a, b) in range(A.order) for a, b in itertools.product(range(A.order), repeat=2))
    assert sorted(p for p in elements if Permutation(list(p)).is_even) == even


def test_groups_of_the_paper_have_the_right_orders_and_laws():
    for name, order, abelian in [("S5", 120, False), ("A5", 60, False), ("A4xZ5", 60, False), ("Z60", 60, True)]:
        G = tasks.group(name)
        assert G.order == order and G.abelian == abelian
        assert all(G.product(0, g) == g == G.product(g, 0) for g in range(order))  # identity first
        assert all(sorted(row) == list(range(order)) for row in G.table)  # a Latin square: inverses exist
    with pytest.raises(ValueError, match="unknown group"):
        tasks.group("Q8")


def test_word_problem_states_are_prefix_products():
    task = tasks.GroupWordProblem("S5", L=6)
    G = task.group
    batch = task.sample(20, seed=2)
    assert batch.scored[:, 1::2].all() and not batch.scored[:, 0::2].any()
    for row in batch.tokens.tolist():
        state = None
        for g, s in zip(row[0::2], row[1::2]):
            state = g if state is None else G.product(state, g)
            assert s - G.order == state
    answer_only = tasks.GroupWordProblem("S5", L=6, format="answer").sample(20, seed=2)
    assert answer_only.tokens.shape == (20, 8) and torch.equal(answer_only.tokens[:, -1], batch.tokens[:, -1])
    assert torch.equal(answer_only.tokens[:, 1:-1], batch.tokens[:, 0::2])  # the same words, no states
    every = tasks.GroupWordProblem("S5", L=6, format="every-prefix").sample(20, seed=2)
    assert torch.equal(every.tokens[:, 1:-1], batch.tokens[:, 0::2]) and every.tokens.max() < 2 * G.order + 1
    assert not (every.tokens[:, 1:-1] >= G.order).any()  # no state is ever an input
    assert torch.equal(every.labels[:, 2:], batch.tokens[:, 1::2]) and (every.labels[:, :2] == -100).all()
    with pytest.raises(ValueError, match="format"):
        tasks.GroupWordProblem("S5", L=6, format="chain")


def test_checker_needs_every_scored_position():
    batch = tasks.GroupWordProblem("Z60", L=3).sample(4, seed=0)
    predictions = batch.tokens.clone()
    predictions[0, 0] += 1  # an unscored position: still right
    predictions[1, 3] += 1  # a scored one: wrong
    assert batch.correct(predictions).tolist() == [True, False, True, True]
    assert (batch.labels == -100).sum() == (~batch.scored).sum()


def test_a_tiny_model_learns_an_easy_task_and_the_cache_returns_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERZOO_HOME", str(tmp_path))
    task = tasks.GroupWordProblem("Z3", L=4)  # running sums mod 3, every state shown: chance is 1/81 per row
    config, training = tasks.TaskModelConfig(hidden_size=32, num_layers=2, num_heads=2), tasks.TaskTraining(steps=200, lr=1e-2)
    from paperzoo.core.models import substrate_used

    with substrate_used() as log:
        model, history = tasks.train_on_task(task, config, training, seed=0, eval_size=256)
    assert history["accuracy"] > 0.9 and log == []  # an experiment's own model is not shared substrate
    again, history2 = tasks.train_on_task(task, config, training, seed=0, eval_size=256)
    assert history2 == history and len(list((tmp_path / "task-models").iterdir())) == 1
    shuffled = tasks.TaskBatch(task.sample(256, seed=5).tokens, task.sample(256, seed=5).scored)
    shuffled.tokens[:, 1::2] = shuffled.tokens[torch.randperm(256), 1::2]  # states of other rows: wrong answers
    assert tasks.task_accuracy(model, shuffled) < 0.1


@pytest.mark.parametrize("cluster_size", [1, 2])
def test_label_map_episodes_follow_one_map_per_row_and_mark_what_is_predictable(cluster_size):
    from paperzoo.core.tasks import LabelMapEpisodes

    task = LabelMapEpisodes(items=6, labels=3, demos=12, cluster_size=cluster_size)
    batch = task.sample(64, seed=0)
    tokens, targets = batch.tokens, batch.expected
    assert tokens.shape == (64, task.length) and (tokens[:, 0] == task.bos).all()
    seen_any = False
    for row, target in zip(tokens.tolist(), targets.tolist()):
        label_of = {}
        for j in range(task.demos):
            x, pair, y = row[1 + 2 * j], row[2 + 2 * j], target[2 + 2 * j] - task.label_token(0)
            assert 0 <= x < task.items and pair == task.items + x * task.labels + y  # the pair token holds (x, y)
            assert label_of.setdefault(x // cluster_size, y) == y  # one label per cluster within a row
            seen = task.seen_before(torch.tensor([row]))[0, 2 + 2 * j].item()
            assert seen == (x // cluster_size in [row[1 + 2 * i] // cluster_size for i in range(j)])
            seen_any |= seen
    assert seen_any and batch.scored[:, 2::2].all() and not batch.scored[:, 1::2].any()
    # the map is fresh per row: the same item takes different labels across rows
    x0 = [{r[1 + 2 * j]: t[2 + 2 * j] for j in range(task.demos)}.get(0) for r, t in zip(tokens.tolist(), targets.tolist())]
    assert len({y for y in x0 if y is not None}) > 1


def test_label_noise_redraws_shown_labels_but_never_the_target():
    from paperzoo.core.tasks import LabelMapEpisodes

    task = LabelMapEpisodes(items=16, labels=4, demos=32, cluster_size=4, label_noise=0.4)
    batch = task.sample(512, seed=1)
    shown = (batch.tokens[:, 2::2] - task.items) % task.labels
    target = batch.expected[:, 2::2] - task.label_token(0)
    x = batch.tokens[:, 1::2]
    # the target is one label per cluster within a row (f's label), whatever was shown
    for row_x, row_t in zip(x.tolist()[:50], target.tolist()[:50]):
        per_cluster = {}
        assert all(per_cluster.setdefault(a // 4, t) == t for a, t in zip(row_x, row_t))
    agree = (shown == target).float().mean().item()
    assert abs(agree - (0.6 + 0.4 / 4)) < 0.02  # redrawn uniformly: right by chance a quarter of the time
    clean = LabelMapEpisodes(items=16, labels=4, demos=32, cluster_size=4).sample(512, seed=1)
    assert torch.equal((clean.tokens[:, 2::2] - 16) % 4, clean.expected[:, 2::2] - task.label_token(0))


def test_task_models_are_keyed_by_how_the_task_draws_its_sequences():
    import inspect

    from paperzoo.core.tasks import LabelMapEpisodes, task_source
    from paperzoo.experiments.phenomena.demo_position_bias import ChatICL

    assert inspect.getsource(LabelMapEpisodes.sample) in task_source(LabelMapEpisodes())  # the format is in the key
    nested = task_source(ChatICL())
    assert "class ChatICL" in nested and "class LabelMapEpisodes" in nested  # so is a dataclass field's format
    words = tasks.GroupWordProblem("Z3", L=4)
    before = task_source(words)
    words.group  # a cached property lands in vars(): the key must not move
    assert task_source(words) == before and "class Group(" not in before
    config, training = tasks.TaskModelConfig(8), tasks.TaskTraining(steps=1)
    path = tasks.task_model_path(words, config, training, 0)
    original = tasks.task_source
    try:
        tasks.task_source = lambda task: original(task) + "# the generator changed"
        assert tasks.task_model_path(words, config, training, 0) != path
    finally:
        tasks.task_source = original


def test_task_accuracy_reads_the_targets_where_the_answer_is_never_shown():
    from types import SimpleNamespace

    batch = tasks.GroupWordProblem("Z3", L=5, format="every-prefix").sample(64, seed=0)
    vocab = tasks.GroupWordProblem("Z3", L=5, format="every-prefix").vocab_size

    class Oracle(torch.nn.Module):  # predicts, at every position, the expected token of the next one
        def forward(self, input_ids):
            rows = {tuple(t.tolist()): e for t, e in zip(batch.tokens, batch.expected)}
            nxt = torch.stack([torch.cat([rows[tuple(t.tolist())][1:], torch.zeros(1, dtype=torch.long)])
                               for t in input_ids])
            return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, vocab).float())

    assert tasks.task_accuracy(Oracle(), batch, chunk=16) == 1.0
