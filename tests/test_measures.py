"""Sweep tables, tau-crossings, power-law and logistic fits, per-position loss and the ICL score, on known answers."""

import math

import numpy as np
import pytest
import torch

from paperzoo.core import measures


def test_sweep_runs_every_value_and_seed_and_reads_intervals_over_seeds():
    calls = []
    table = measures.sweep([4, 8], [0, 1, 2], lambda v, s: calls.append((v, s)) or {"acc": v + s / 100})
    assert calls == [(4, 0), (4, 1), (4, 2), (8, 0), (8, 1), (8, 2)] and table.values == [4, 8]
    assert table.metric("acc", 8).tolist() == [8.0, 8.01, 8.02]
    assert np.allclose(table.means("acc"), [4.01, 8.01])
    iv = table.interval("acc", 4)
    assert iv.mean == pytest.approx(4.01) and iv.low <= iv.mean <= iv.high and iv.high - iv.low <= 0.02
    with pytest.raises(TypeError, match="dict"):
        measures.sweep([1], [0], lambda v, s: 0.5)


def test_crossing_interpolates_between_grid_points():
    x, y = [1, 2, 4, 8], [0.1, 0.5, 0.8, 0.95]
    assert measures.crossing(x, y, 0.9) == pytest.approx(4 + 0.1 * 4 / 0.15)
    assert measures.crossing(x, y, 0.5) == pytest.approx(2.0)
    assert measures.crossing(x, y, 0.05) == 1.0
    assert measures.crossing(x, y, 0.99) is None
    with pytest.raises(ValueError, match="increase"):
        measures.crossing([1, 1, 2], [0, 1, 1], 0.5)


def test_power_law_recovers_a_known_exponent():
    x = np.array([1, 2, 4, 8, 16, 32.0])
    fit = measures.power_law_fit(x, 3.0 * x ** -0.5)
    assert fit.a == pytest.approx(3.0) and fit.b == pytest.approx(-0.5) and fit.r2 == pytest.approx(1.0)
    noisy = measures.power_law_fit(x, 3.0 * x ** -0.5 * np.array([1.1, 0.9, 1.05, 0.95, 1.0, 1.02]))
    assert -0.6 < noisy.b < -0.4 and noisy.r2 < 1.0
    with pytest.raises(ValueError, match="positive"):
        measures.power_law_fit([1, 2], [0.0, 1.0])


def test_logistic_fit_recovers_a_known_transition_and_its_sharpness():
    truth = measures.Logistic(low=0.1, high=0.9, midpoint=50.0, width=3.0)
    x = np.linspace(0, 100, 41)
    fit = measures.logistic_fit(x, truth(x))
    assert fit.midpoint == pytest.approx(50.0, abs=1e-3) and fit.width == pytest.approx(3.0, abs=1e-3)
    assert fit.low == pytest.approx(0.1, abs=1e-4) and fit.high == pytest.approx(0.9, abs=1e-4)
    assert truth.sharpness == pytest.approx(2 * math.log(9) * 3 / 50)  # the 10%-90% rise, relative to the midpoint
    rise = np.interp([0.1 + 0.8 * 0.1, 0.1 + 0.8 * 0.9], truth(np.linspace(0, 100, 100001)), np.linspace(0, 100, 100001))
    assert (rise[1] - rise[0]) / 50 == pytest.approx(truth.sharpness, rel=1e-3)


class _Learner(torch.nn.Module):
    """Uniform over V before position k, then certain of the next token (tokens count up by one)."""

    def __init__(self, V: int, k: int):
        super().__init__()
        self.V, self.k = V, k

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.V)
        nxt = (input_ids + 1) % self.V
        logits[:, self.k:].scatter_(-1, nxt[:, self.k:, None], 50.0)
        return type("Out", (), {"logits": logits})


def test_per_position_loss_and_the_icl_score():
    V, T = 16, 10
    tokens = (torch.arange(T) + torch.randint(0, V, (5, 1))) % V
    losses = measures.per_position_loss(_Learner(V, k=4), tokens, batch_size=2)
    assert losses.shape == (T - 1,)
    assert np.allclose(losses[:4], math.log(V)) and np.allclose(losses[4:], 0.0, atol=1e-6)
    assert measures.icl_score(losses, early=1, late=8) == pytest.approx(-math.log(V), abs=1e-6)
    with pytest.raises(ValueError, match="early"):
        measures.icl_score(losses, early=5, late=2)


def test_logistic_fit_keeps_the_transition_inside_the_data_and_fits_falls():
    x = np.linspace(1, 10, 30)
    fall = measures.Logistic(low=0.9, high=0.1, midpoint=5.0, width=0.5)  # high < low: a fall
    fit = measures.logistic_fit(x, fall(x))
    assert fit.midpoint == pytest.approx(5.0, abs=1e-3) and fit.width > 0 and fit.high < fit.low
    relaxation = np.exp(-x / 3)  # a smooth fall: unbounded, the fit put its "midpoint" at -22 and read it as sharp
    fit = measures.logistic_fit(x, relaxation)
    assert x.min() <= fit.midpoint <= x.max() and fit.sharpness > 1
