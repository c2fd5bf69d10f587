"""Chain of thought on group words: the chain is the model's own, the answer-only model is read after the last element."""

import pytest
import torch

from paperzoo.core.tasks import GroupWordProblem, TaskModelConfig, TaskTraining, group
from paperzoo.phenomena.cot_serial_problems import answer_right, chain_right, cot_gap


class ChainStub(torch.nn.Module):
    """Writes the next state from its *written* last state and the last element; wrong once at step `slip`."""

    def __init__(self, G, slip: int | None = None):
        super().__init__()
        self.G, self.slip = G, slip

    def forward(self, input_ids):
        G = self.G
        n, T = input_ids.shape
        logits = torch.zeros(n, T, 2 * G.order + 1)
        step = (T + 1) // 2  # the input ends with element g_step
        for i, row in enumerate(input_ids.tolist()):
            state = row[-1] if step == 1 else G.product(row[-2] - G.order, row[-1])
            if step == self.slip:
                state = (state + 1) % G.order
            logits[i, -1, G.order + state] = 1.0
        return type("Out", (), {"logits": logits})


class AnswerStub(torch.nn.Module):
    """After <start> g_1 .. g_l, predicts the product g_1 .. g_l at the last position only."""

    def __init__(self, G):
        super().__init__()
        self.G = G

    def forward(self, input_ids):
        G = self.G
        logits = torch.zeros(*input_ids.shape, 2 * G.order + 1)
        for i, row in enumerate(input_ids.tolist()):
            assert row[0] == 2 * G.order  # the start token the answer format trains with
            state = row[1]
            for g in row[2:]:
                state = G.product(state, g)
            logits[i, -1, G.order + state] = 1.0
        return type("Out", (), {"logits": logits})


def _words(G, n=8, L=6, seed=0):
    return torch.randint(0, G.order, (n, L), generator=torch.Generator().manual_seed(seed))


def test_a_right_chain_is_right_at_every_length():
    G = group("S5")
    assert chain_right(ChainStub(G), G, _words(G)).all()


def test_a_slip_in_the_models_own_chain_carries_forward():
    G = group("S5")
    right = chain_right(ChainStub(G, slip=3), G, _words(G))
    assert right[:, :2].all() and not right[:, 2:].any()  # teacher forcing would repair lengths 4-6


def test_the_answer_only_model_is_read_after_the_last_element():
    G = group("A5")
    words = _words(G, L=5, seed=1)
    assert answer_right(AnswerStub(G), G, words).all()
    train_format = GroupWordProblem("A5", 5, "answer").sample(4, seed=0).tokens
    assert train_format[:, 0].eq(2 * G.order).all()  # the start token matches the training format


def test_cot_gap_tests_every_model_on_the_same_words(tmp_path, monkeypatch):
    monkeypatch.setenv("PAPERZOO_HOME", str(tmp_path))
    r = cot_gap(TaskModelConfig(hidden_size=16, num_layers=1, num_heads=2), "Z3", 4, [2, 4],
                TaskTraining(steps=5, batch_size=8), seed=0, n_test=16)
    assert r.chain.shape == (16, 4) and set(r.answer) == {2, 4} and r.answer[2].shape == (16,)
    assert set(r.train_seconds) == {"chain", "answer@2", "answer@4"}
    with pytest.raises(ValueError, match="length"):
        cot_gap(TaskModelConfig(hidden_size=16), "Z3", 4, [5], TaskTraining(steps=1), seed=0)


# ---------------------------------------------------------------------------------------------
# The answer-only curriculum and the experiment's verdict

from paperzoo.experiments.phenomena import cot_serial_problems as experiment  # noqa: E402
from paperzoo.phenomena.cot_serial_problems import CotGap, IdentityPaddedWords  # noqa: E402


def test_padded_words_keep_the_answer_format_and_answer_the_product_of_their_factors():
    task = IdentityPaddedWords("S5", 6)
    plain = GroupWordProblem("S5", 6, "answer")
    batch = task.sample(3000, seed=1)
    assert batch.tokens.shape == (3000, plain.length) and task.vocab_size == plain.vocab_size
    assert batch.tokens[:, 0].eq(plain.start).all() and batch.scored[:, -1].all() and batch.scored.sum() == 3000
    words = batch.tokens[:, 1:-1]
    assert torch.equal(batch.tokens[:, -1], plain.prefix_products(words)[:, -1] + 120)
    factors = words.ne(0).sum(dim=1)  # non-identity positions: k of them, less the rare identity draws
    counts = torch.bincount(factors, minlength=7)
    assert counts[0] < 15 and counts[1] > 300 and counts[6] > 300  # from one factor up to full words
    assert all(abs(c - 500) < 120 for c in counts[1:].tolist())  # k uniform over 1..6


def test_cot_gap_trains_answer_models_on_the_curriculum_and_the_chain_on_full_words(monkeypatch):
    import paperzoo.phenomena.cot_serial_problems as method
    from paperzoo.core.tasks import TaskModelConfig as C

    seen, steps = [], []

    def fake_train(task, config, training, seed=0):
        seen.append(task)
        steps.append(training.steps)
        return C(hidden_size=8).build(task.vocab_size, task.length), {"seconds": 0.0}

    monkeypatch.setattr(method, "train_on_task", fake_train)
    method.cot_gap(C(hidden_size=8), "Z3", 4, [2, 4], TaskTraining(steps=1), n_test=4, curriculum=True,
                   chain_training=TaskTraining(steps=2))
    assert seen[0] == GroupWordProblem("Z3", 4, "cot") and steps == [2, 1, 1]
    assert seen[1:] == [IdentityPaddedWords("Z3", 2), IdentityPaddedWords("Z3", 4)]
    seen.clear()
    method.cot_gap(C(hidden_size=8), "Z3", 4, [2], TaskTraining(steps=1), n_test=4)
    assert seen[1] == GroupWordProblem("Z3", 2, "answer")


def _gap(name, chain_rate, answer_rate, lengths=(4, 8), n=400, seed=0):
    """A CotGap whose chain steps are each right with `chain_rate` (a slip carries forward), each answer-only model
    right with `answer_rate[length]`."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    chain = (torch.rand(n, L, generator=g) < chain_rate).cumprod(dim=1).bool()
    answer = {length: torch.rand(n, generator=g) < answer_rate[length] for length in lengths}
    return CotGap(name, chain, answer, {})


def _verdict(s5_answer, z7_answer, s5_chain=1.0, z7_chain=1.0):
    m = experiment.summarise({"S5": _gap("S5", s5_chain, s5_answer, seed=1),
                              "Z7": _gap("Z7", z7_chain, z7_answer, seed=2)}, [4, 8])
    return experiment.CLAIM.preconditions(m), experiment.CLAIM.checks(m)


def test_the_papers_picture_passes_every_check():
    pre, checks = _verdict({4: 0.05, 8: 0.0}, {4: 1.0, 8: 0.9})
    assert all(v is True for v in pre.values()) and all(v is True for v in checks.values()), (pre, checks)


def test_answer_only_solving_s5_fails_the_claim():
    pre, checks = _verdict({4: 1.0, 8: 1.0}, {4: 1.0, 8: 0.9})
    assert all(v is True for v in pre.values())
    near_chance, cot_beats, gains_more = list(checks.values())[1:]
    assert near_chance is False and cot_beats is False and gains_more is False


def test_cot_beats_answer_only_is_false_on_a_tie_and_undecided_on_noise():
    same = torch.ones(50).numpy()
    assert experiment.cot_beats(same, same) is False
    assert experiment.cot_beats(same, 0 * same) is True
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(40, generator=g) < 0.5).float().numpy(), (torch.rand(40, generator=g) < 0.5).float().numpy()
    assert experiment.cot_beats(a, b) is None


def test_a_chain_that_breaks_down_fails_the_ninety_percent_check():
    _, checks = _verdict({4: 0.0, 8: 0.0}, {4: 1.0, 8: 0.9}, s5_chain=0.97)  # 0.97 a step: 0.78 after 8 steps
    assert list(checks.values())[0] is False


def test_a_control_that_does_not_learn_is_a_failed_precondition_not_a_negative():
    pre, _ = _verdict({4: 0.0, 8: 0.0}, {4: 1.0, 8: 1 / 7})
    assert list(pre.values())[0] is False
    pre, _ = _verdict({4: 0.0, 8: 0.0}, {4: 1.0, 8: 0.9}, z7_chain=0.9)
    assert list(pre.values())[1] is False
