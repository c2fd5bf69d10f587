import math

import numpy as np
import pytest
import torch

from paperzoo.experiments.phenomena.icl_representations import (
    GraphWalkMetaTraining, checks, preconditions, random_regular_graph, within)
from paperzoo.core.margins import Interval
from paperzoo.core.measures import log_logistic_fit
from paperzoo.phenomena.icl_representations import (
    dirichlet_energy, grid_graph, in_context_representations, laplacian, node_means, normalized_dirichlet_energy,
    pc_laplacian_alignment, random_walks, ring_graph, spectral_embedding, valid_next_mass, walk_prompts, walk_steps)


@pytest.mark.parametrize("A", [grid_graph(4, 4), ring_graph(12), grid_graph(3, 5)])
def test_unit_laplacian_eigenvectors_have_energy_twice_their_eigenvalue(A):
    # E_G sums ordered pairs (the paper's Eq. 1), so x^T L x = lambda counts every edge twice
    lam, U = torch.linalg.eigh(laplacian(A).double())
    for k in range(len(A)):
        assert float(dirichlet_energy(U[:, k], A)) == pytest.approx(2 * float(lam[k]), abs=1e-9)


def test_energy_by_hand_on_a_path():
    A = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float)
    X = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])
    assert float(dirichlet_energy(X, A)) == pytest.approx(2 * (1 + 4))
    # rho = (E / sum A) / (mean squared distance over the n(n-1) ordered pairs) = (10/4) / (2 (1 + 4 + 5) / 6)
    assert float(normalized_dirichlet_energy(X, A)) == pytest.approx((10 / 4) / (20 / 6))


def test_spectral_placement_has_lower_energy_than_random_placement():
    A = grid_graph(4, 4)
    g = torch.Generator().manual_seed(0)
    spectral = spectral_embedding(A, 2) @ torch.randn(2, 32, dtype=torch.float64, generator=g)  # a rotated embedding
    floor = float(torch.linalg.eigvalsh(laplacian(A))[1] * 15 / A.sum())
    assert float(normalized_dirichlet_energy(spectral, A)) == pytest.approx(floor, rel=1e-6)
    random = [float(normalized_dirichlet_energy(torch.randn(16, 32, generator=g), A)) for _ in range(200)]
    assert min(random) > 2 * floor and np.mean(random) == pytest.approx(1.0, abs=0.05)  # 1: unrelated to the graph
    assert pc_laplacian_alignment(spectral, A) == pytest.approx(1.0)
    assert np.mean([pc_laplacian_alignment(torch.randn(16, 32, generator=g), A) for _ in range(200)]) < 0.3
    # scale-free: shrinking the representations does not lower rho (E_G itself falls by the square)
    X = torch.randn(16, 8, generator=g)
    assert float(normalized_dirichlet_energy(0.1 * X, A)) == pytest.approx(float(normalized_dirichlet_energy(X, A)))


def test_alignment_is_the_mean_squared_canonical_correlation_and_refuses_ambiguous_subspaces():
    A = ring_graph(12)
    U = spectral_embedding(A, 2)
    g = torch.Generator().manual_seed(1)
    X = U @ torch.randn(2, 6, dtype=torch.float64, generator=g) + 0.5 * torch.randn(12, 6, generator=g).double()
    X = X - X.mean(0)
    P = torch.linalg.svd(X, full_matrices=False).U[:, :2]
    cosines = torch.linalg.svdvals(P.T @ U)  # cosines of the principal angles
    assert pc_laplacian_alignment(X, A) == pytest.approx(float(cosines.pow(2).mean()))
    with pytest.raises(ValueError, match="not unique"):
        spectral_embedding(ring_graph(12), 1)  # u2 and u3 share an eigenvalue


@pytest.mark.parametrize("A", [grid_graph(4, 4), ring_graph(7), torch.roll(torch.eye(9), 1, dims=1)])
def test_walks_only_step_along_edges_and_reach_every_neighbour(A):
    walks = random_walks(A, 400, torch.arange(len(A)), torch.Generator().manual_seed(0))
    assert (walks[:, 0] == torch.arange(len(A))).all()
    steps = A[walks[:, :-1], walks[:, 1:]]
    assert (steps == 1).all()
    used = torch.zeros_like(A)
    used[walks[:, :-1].flatten(), walks[:, 1:].flatten()] = 1
    assert torch.equal(used, A)  # every arc is taken: uniform over neighbours, not a fixed choice


def test_batched_walks_follow_their_own_graph():
    A = torch.zeros(2, 16, 16)
    A[0] = grid_graph(4, 4)
    A[1, :12, :12] = ring_graph(12)
    walks = random_walks(A, 200, torch.tensor([5, 3]), torch.Generator().manual_seed(0))
    assert (A[0][walks[0, :-1], walks[0, 1:]] == 1).all() and (A[1][walks[1, :-1], walks[1, 1:]] == 1).all()
    assert walks[1].max() < 12


def test_node_means_average_the_right_positions():
    hidden = torch.arange(2 * 6, dtype=torch.float).reshape(2, 6, 1)  # hidden[b, s] = 6 b + s
    nodes = torch.tensor([[-1, 0, 1, 0, 2, 1], [-1, 1, 1, 2, 0, 0]])  # a BOS first: walk step = position - 1
    assert walk_steps(nodes).tolist() == [[-1, 0, 1, 2, 3, 4], [-1, 0, 1, 2, 3, 4]]
    # window of the last 3 steps before t = 5: steps 2, 3, 4, i.e. positions 3, 4, 5
    means, present = node_means(hidden, nodes, 4, t=5, window=3)
    assert present.tolist() == [True, True, True, False]
    assert means[:, 0].tolist() == pytest.approx([(3 + 10 + 11) / 3, 5, (4 + 9) / 2, 0])
    # t = 2 with a wide window: steps 0 and 1 only (the prefix before t)
    means, present = node_means(hidden, nodes, 4, t=2, window=50)
    assert present.tolist() == [True, True, False, False]
    assert means[:, 0].tolist()[:2] == pytest.approx([1, (2 + 7 + 8) / 3])


def test_valid_next_mass_by_hand():
    A = ring_graph(4)
    node_tokens = torch.tensor([10, 11, 12, 13])
    nodes = torch.tensor([[0, 1, 2]])
    logits = torch.full((1, 3, 16), -1e9)
    logits[0, 0, [11, 13, 12]] = torch.log(torch.tensor([0.5, 0.2, 0.3]))  # after node 0: 1 and 3 are valid
    logits[0, 1, [10, 12, 5]] = torch.log(torch.tensor([0.1, 0.1, 0.8]))  # after node 1: 0 and 2 are valid
    assert valid_next_mass(logits, nodes, A, node_tokens)[0].tolist() == pytest.approx([0.7, 0.2])


def test_walk_prompts_put_one_token_per_node_after_a_bos():
    A = grid_graph(3, 3)
    ids, nodes = walk_prompts(torch.arange(50, 59), A, 20, bos_token_id=1, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (9, 21) and (ids[:, 0] == 1).all() and (nodes[:, 0] == -1).all()
    assert torch.equal(ids[:, 1:], nodes[:, 1:] + 50)


class SmoothingModel(torch.nn.Module):
    """An "LM" whose hidden state 1 adds to a token's embedding the mean embedding of the tokens seen next to it so
    far in the walk: it reorganises into the graph as context grows (hidden state 0 is a random embedding)."""

    def __init__(self, A, node_tokens, vocab=32, d=24):
        super().__init__()
        self.A, self.node_of = A, {int(t): i for i, t in enumerate(node_tokens)}
        self.E = torch.randn(vocab, d, generator=torch.Generator().manual_seed(3))
        self.config = type("C", (), {"vocab_size": vocab})()

    def forward(self, input_ids, output_hidden_states=False):
        h0 = self.E[input_ids]
        h1 = torch.zeros_like(h0)
        for b, row in enumerate(input_ids.tolist()):
            for p in range(len(row)):
                seen = {row[q + d] for q in range(p) for d in (0, 1) if {row[q], row[q + 1]} & {row[p]}} - {row[p]}
                h1[b, p] = self.E[row[p]] + (torch.stack([self.E[t] for t in seen]).mean(0) if seen else 0)
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        return type("O", (), {"hidden_states": (h0, h1), "logits": logits})()


def test_in_context_representations_reads_layers_and_lengths():
    A = grid_graph(3, 3)
    node_tokens = torch.randperm(32, generator=torch.Generator().manual_seed(0))[:9]
    model = SmoothingModel(A, node_tokens)
    ids, nodes = walk_prompts(node_tokens, A, 60, generator=torch.Generator().manual_seed(1))
    r = in_context_representations(model, ids, nodes, A, node_tokens, [1, 4, 59], window=50)
    assert r.nodes_present == [9, 9, 9] and len(r.rho) == 2
    assert all(v == pytest.approx(r.rho[0][0]) for v in r.rho[0])  # the embeddings do not depend on context
    assert r.rho[1][0] == pytest.approx(r.rho[0][0])  # one step: nothing seen yet
    assert r.rho[1][-1] < 0.6 * r.rho[0][-1]  # the context-smoothed layer mirrors the graph
    assert r.alignment[1][-1] > r.alignment[0][-1]
    degree = A.sum(1)[nodes]  # uniform logits: the mass of the current node's neighbours is its degree / 32
    assert r.accuracy == pytest.approx([float(degree[:, t - 1].mean()) / 32 for t in (1, 4, 59)], rel=1e-5)


def test_meta_training_walks_use_a_fresh_assignment_on_a_real_graph():
    task = GraphWalkMetaTraining(length=64)
    batch = task.sample(40, seed=0)
    assert batch.tokens.shape == (40, 64) and batch.tokens.max() < 32
    assert not batch.scored[:, 0].any() and batch.scored[:, 1:].all()
    assert torch.equal(batch.tokens, task.sample(40, seed=0).tokens)
    A = random_regular_graph(12, torch.Generator().manual_seed(0))
    assert torch.equal(A, A.T) and (A.sum(1) == 3).all() and A.diagonal().sum() == 0


def test_log_logistic_fit_recovers_a_transition_and_refuses_to_call_a_smooth_fall_sharp():
    t = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 127.0])
    step = 1 - 0.7 / (1 + np.exp(-(np.log(t) - np.log(20)) / 0.15))
    fit = log_logistic_fit(t, step, -1)
    assert fit.midpoint == pytest.approx(20, rel=0.02) and fit.width == pytest.approx(0.15, rel=0.05)
    assert fit.after < fit.before and fit.sharpness == pytest.approx(2 * math.sinh(math.log(9) * 0.15), rel=0.05)
    assert fit.sharpness < 1
    assert log_logistic_fit(t, 1 - 0.1 * np.log(t), -1).sharpness > 3  # linear in ln t: no transition
    assert log_logistic_fit(t, np.exp(-t / 10), -1).sharpness > 1.5  # an exponential relaxation is not sharp
    assert log_logistic_fit(t, 1 - step, -1).width == 5.0  # a rise has no fall: the widest width
    assert log_logistic_fit(t, 1 - step, +1).midpoint == pytest.approx(20, rel=0.02)
    # a step between the first two lengths is not resolved: t = 1 (no context) is left out of the fit
    assert log_logistic_fit(t, np.where(t < 2, 1.0, 0.5), -1).width == 5.0


def _metrics(rho, acc, intervals):
    graph = {"lengths": [1, 2], "chance": 0.2, "rho_items": rho, "accuracy_items": acc}
    return {"graphs": {"grid": graph}, "intervals": {"grid": intervals}}


def test_checks_and_preconditions_by_hand():
    sharp = {"sharpness": {"low": 0.3, "mean": 0.5, "high": 0.8},
             "log_midpoint_ratio": {"low": -0.2, "mean": 0.0, "high": 0.3}}
    m = _metrics([[1.0, 0.5], [0.9, 0.4], [1.0, 0.45]], [[0.2, 0.9], [0.2, 0.8], [0.3, 0.85]], sharp)
    assert list(preconditions(m).values()) == [True]
    assert list(checks(m).values()) == [True, True, True]
    smooth = {"sharpness": {"low": 1.5, "mean": 3.0, "high": 6.0},
              "log_midpoint_ratio": {"low": 1.0, "mean": 1.5, "high": 2.0}}
    m = _metrics([[1.0, 1.1], [0.9, 1.2], [1.0, 1.3]], [[0.2, 0.5], [0.2, 0.55], [0.3, 0.5]], smooth)
    assert list(preconditions(m).values()) == [False]  # 0.5 is not above 3 x 0.2
    assert list(checks(m).values()) == [False, False, False]
    assert within(Interval(0.5, 1.0, 1.5), -math.inf, 1.0) is None
