import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from paperzoo.experiments.phenomena.icl_dynamical_systems import (
    DigitMarkovChains, checks, count_estimates, exponent_interval, on_grid, preconditions)
from paperzoo.phenomena.icl_dynamical_systems import (
    DigitFormat, bhattacharyya_distance, full_tree_queries, hierarchy_pdf, js_divergence, kl_divergence)
from tiny_models import tiny

# Digits at non-contiguous token ids, so a method that reads the wrong logits is caught.
DIGIT_IDS = (20, 3, 11, 7, 15, 2, 9, 18, 5, 13)
SEP, BOS, VOCAB = 0, 1, 21


class StubLM(torch.nn.Module):
    """Next-digit logits = log of known conditionals of a target distribution q over 10^P bins.

    The prompt's second token picks the row of `q` [rows, 10^P]; the digits typed after the last
    separator (d_1 .. d_k) give p(d_{k+1} | d_1 .. d_k) = q(bins starting d_1 .. d_{k+1}) / q(bins
    starting d_1 .. d_k). Non-digit tokens get a large logit, which the digit softmax must ignore.
    """

    def __init__(self, q: torch.Tensor, digits: int):
        super().__init__()
        self.q, self.P = q.double(), digits
        self.digit_of = {t: d for d, t in enumerate(DIGIT_IDS)}

    def forward(self, input_ids):
        logits = torch.full((*input_ids.shape, VOCAB), -1e9)
        for i, row in enumerate(input_ids.tolist()):
            q = self.q[row[1]].reshape((10,) * self.P)
            last_sep = max(j for j, t in enumerate(row) if t == SEP)
            typed = tuple(self.digit_of[t] for t in row[last_sep + 1:])
            block = q[typed] if typed else q
            mass = block.reshape(10, -1).sum(-1)
            logits[i, -1] = 3.0  # separator and others: plenty of mass outside the digits
            logits[i, -1, list(DIGIT_IDS)] = torch.log(mass / mass.sum()).float()
        return SimpleNamespace(logits=logits)


def fmt(P):
    return DigitFormat(DIGIT_IDS, SEP, P, bos_id=BOS)


def prompts(rows):
    """One prompt per row of q: BOS, the row index, a separator (the stub reads q's row from the second token)."""
    return torch.tensor([[BOS, r, SEP] for r in rows])


def random_q(rows, bins, seed=0, alpha=0.5):
    return torch.from_numpy(np.random.default_rng(seed).dirichlet(np.full(bins, alpha), size=rows))


@pytest.mark.parametrize("P", [1, 2, 3])
def test_full_tree_recovers_the_stubs_exact_distribution(P):
    q = random_q(2, 10**P, seed=P)
    pdf = hierarchy_pdf(StubLM(q, P), prompts([0, 1]), fmt(P))
    assert torch.allclose(pdf.probs, q, atol=1e-6)
    assert pdf.queries == 2 * full_tree_queries(P) == 2 * sum(10**k for k in range(P))
    assert torch.allclose(pdf.density.sum(-1) / 10**P, torch.ones(2, dtype=torch.float64))


def test_full_tree_on_a_tiny_llama_is_the_product_of_digit_conditionals():
    model = tiny("llama")
    f = DigitFormat(tuple(range(40, 50)), 50, 2, bos_id=51)
    prefix = f.encode(torch.tensor([[12, 95, 37], [3, 3, 80]]))
    pdf = hierarchy_pdf(model, prefix, f, batch_size=7)  # chunked batches must not change anything
    assert torch.allclose(pdf.probs.sum(-1), torch.ones(2, dtype=torch.float64), atol=1e-5)
    digits = list(range(40, 50))
    for b in range(2):
        first = model(input_ids=prefix[b:b + 1]).logits[0, -1, digits].softmax(-1)
        second = model(input_ids=torch.cat([prefix[b], torch.tensor([43])])[None]).logits[0, -1, digits].softmax(-1)
        assert pdf.probs[b, 37].item() == pytest.approx((first[3] * second[7]).item(), rel=1e-4)


def test_pruning_keeps_each_bins_mass_spreads_it_uniformly_and_saves_queries():
    q = torch.zeros(1, 100, dtype=torch.float64)
    q[0, [31, 37, 72, 75, 79]] = torch.tensor([0.3, 0.2, 0.25, 0.15, 0.095], dtype=torch.float64)
    q[0, 50:60] = 0.0005  # first digit 5: 0.5% of the mass, under the threshold
    q[0, 0] = 0.005  # first digit 0: 0.5%
    q += 1e-7  # every bin possible, so the full tree's conditionals are defined
    q /= q.sum()
    full = hierarchy_pdf(StubLM(q, 2), prompts([0]), fmt(2))
    pruned = hierarchy_pdf(StubLM(q, 2), prompts([0]), fmt(2), min_mass=0.01)
    assert full.queries == 11 and pruned.queries == 1 + 2  # the root, and first digits 3 and 7
    coarse = lambda p: p.reshape(-1, 10, 10).sum(-1)
    assert torch.allclose(coarse(pruned.probs), coarse(q), atol=1e-6)  # mass stays in its bin
    assert torch.allclose(pruned.probs[0, 30:40], q[0, 30:40], atol=1e-6)  # refined bins are exact
    assert torch.allclose(pruned.probs[0, 0:10], (q[0, :10].sum() / 10).expand(10), atol=1e-7)
    assert [r.sum().item() for r in pruned.refined] == [1, 2]


def test_the_official_locality_rule_refines_the_observed_path_and_its_neighbours():
    q = random_q(1, 1000, seed=4)
    stub, f = StubLM(q, 3), fmt(3)
    shallow = hierarchy_pdf(stub, prompts([0]), f, observed=torch.tensor([374]), refine_depth=1)
    # root; first digits 2, 3, 4; then only the observed path 37 (level 2 > refine_depth)
    assert [r.nonzero()[:, 1].tolist() for r in shallow.refined] == [[0], [2, 3, 4], [37]]
    assert shallow.queries == 5
    assert torch.allclose(shallow.probs[0, 370:380], q[0, 370:380], atol=1e-6)  # the path is exact
    assert torch.allclose(shallow.probs[0, 200:300].reshape(10, 10).sum(-1),
                          q[0, 200:300].reshape(10, 10).sum(-1), atol=1e-6)  # a neighbour: exact to 0.01
    assert torch.allclose(shallow.probs[0, 500:600], (q[0, 500:600].sum() / 100).expand(100), atol=1e-7)
    deep = hierarchy_pdf(stub, prompts([0]), f, observed=torch.tensor([374]))  # refine_depth P - 1: neighbours in full
    assert deep.queries == 1 + 3 + 30
    assert torch.allclose(deep.probs[0, 200:500], q[0, 200:500], atol=1e-6)
    every = hierarchy_pdf(stub, prompts([0]), f, observed=torch.tensor([374]), neighbours=None)  # the code's "all"
    assert every.queries == full_tree_queries(3) and torch.allclose(every.probs, q, atol=1e-6)
    edge = hierarchy_pdf(stub, prompts([0]), f, observed=torch.tensor([905]), refine_depth=1)
    assert edge.refined[1].nonzero()[:, 1].tolist() == [8, 9]  # no digit 10


def test_format_writes_fixed_width_digits_and_separators():
    f = DigitFormat(tuple(range(10)), 10, 2, bos_id=11)
    assert f.encode(torch.tensor([[37, 5]])).tolist() == [[11, 3, 7, 10, 0, 5, 10]]
    assert f.codes(torch.tensor([0.0, 0.374, 0.999, 0.05])).tolist() == [0, 37, 99, 5]
    with pytest.raises(ValueError):
        DigitFormat(tuple(range(9)), 10, 2)
    with pytest.raises(ValueError):
        DigitFormat(tuple(range(10)), 3, 2)


def test_losses_on_hand_set_distributions():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    assert bhattacharyya_distance(p, q).item() == pytest.approx(math.log(2) / 2)  # -ln(2 sqrt(1/8))
    assert kl_divergence(p, q).item() == pytest.approx(math.log(2))
    assert kl_divergence(q, p).item() == math.inf  # truth first: mass where the prediction has none
    assert js_divergence(p, q).item() == pytest.approx(0.75 * math.log(4 / 3))
    assert bhattacharyya_distance(p, p).item() == pytest.approx(0, abs=1e-12) and kl_divergence(p, p).item() == 0
    assert js_divergence(torch.tensor([1.0, 0]), torch.tensor([0, 1.0])).item() == pytest.approx(math.log(2))


def test_losses_match_scipy_on_random_distributions():
    rng = np.random.default_rng(1)
    p, q = rng.dirichlet(np.ones(50), size=2)
    tp, tq = torch.from_numpy(p), torch.from_numpy(q)
    assert kl_divergence(tp, tq).item() == pytest.approx(entropy(p, q))
    assert js_divergence(tp, tq).item() == pytest.approx(jensenshannon(p, q) ** 2)
    assert bhattacharyya_distance(tp, tq).item() == pytest.approx(-np.log(np.sqrt(p * q).sum()))
    batch = bhattacharyya_distance(torch.stack([tp, tq]), torch.stack([tq, tp]))  # over the last dimension
    assert batch.shape == (2,) and batch[0].item() == pytest.approx(batch[1].item())


def test_exponent_interval_recovers_a_known_power_law():
    rng = np.random.default_rng(0)
    grid = np.array([2, 4, 8, 16, 32, 64])
    errors = 0.8 * grid[None, :] ** -0.7 * rng.lognormal(0, 0.3, size=(200, len(grid)))
    b = exponent_interval(errors, grid)
    assert b.low < -0.7 < b.high and b.high - b.low < 0.1
    flat = 0.3 * rng.lognormal(0, 0.3, size=(200, len(grid)))
    b0 = exponent_interval(flat, grid)
    assert b0.low < 0 < b0.high


def test_count_estimates_by_hand():
    x = torch.tensor([[0, 1, 0, 1, 0, 2, 0]])  # after n = 7: transitions out of state 0 went to 1, 1, 2
    bigram, unigram = count_estimates(x, 7, 3)
    assert bigram.tolist() == [[1 / 6, 3 / 6, 2 / 6]]  # add-one: counts (0, 2, 1) + 1
    assert unigram.tolist() == [[4 / 9, 3 / 9, 2 / 9]]  # targets 1 0 1 0 2 0: (3, 2, 1) + 1
    assert on_grid(bigram, (5, 37, 80), 100)[0, [5, 37, 80]].tolist() == bigram[0].tolist()


def test_markov_chains_follow_their_transition_matrices():
    task = DigitMarkovChains((5, 37, 80), steps=400, concentration=1.0)
    P, x = task.chains(64, seed=3)
    assert torch.allclose(P.sum(-1), torch.ones(64, 3, dtype=P.dtype))
    pairs = torch.zeros(3, 3)
    for b in range(64):
        counts = torch.zeros(3, 3).index_put_((x[b, :-1], x[b, 1:]), torch.ones(399), accumulate=True)
        pairs += counts / counts.sum(-1, keepdim=True).clamp_min(1) - P[b].float() * (counts.sum(-1, keepdim=True) > 0)
    assert pairs.abs().max() / 64 < 0.03  # empirical transition frequencies match P on average
    batch = task.sample(2, seed=3)
    assert batch.tokens.shape == (2, task.length) and batch.tokens[0, 0] == 11
    values = batch.tokens[:, 1:].view(2, -1, 3)
    assert (values[:, :, 2] == 10).all()
    assert set((10 * values[:, :, 0] + values[:, :, 1]).flatten().tolist()) <= {5, 37, 80}
    assert batch.scored.sum().item() == 2 * 2 * 400  # every digit, no separator or BOS


def test_checks_and_preconditions_by_hand():
    chains = 50
    model = np.full((chains, 3), 0.05) + np.linspace(0, 0.01, chains)[:, None]
    m = {"errors": {"model": {"bhattacharyya": model.tolist()},
                    "uniform": {"bhattacharyya": (model + 0.3).tolist()},
                    "unigram": {"bhattacharyya": (model + 0.1).tolist()}},
         "exponent": {"model": {"bhattacharyya": {"low": -0.9, "mean": -0.7, "high": -0.5}}}}
    assert all(v is True for v in preconditions(m).values()) and list(checks(m).values()) == [True]
    m["errors"]["unigram"]["bhattacharyya"] = (model - 0.01).tolist()  # the model only matches state frequencies
    assert list(preconditions(m).values()) == [True, False]
    m["exponent"]["model"]["bhattacharyya"] = {"low": -0.2, "mean": 0.1, "high": 0.3}
    assert list(checks(m).values()) == [None]
    m["exponent"]["model"]["bhattacharyya"] = {"low": 0.0, "mean": 0.1, "high": 0.3}
    assert list(checks(m).values()) == [False]
