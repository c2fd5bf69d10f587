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
