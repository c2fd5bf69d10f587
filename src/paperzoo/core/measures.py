"""What phenomena experiments read off a sweep: tables over seeds, thresholds, fits, in-context learning.

Learning-phenomena papers state their claims as a trend over a control (width, depth,
length, number of examples): where accuracy crosses a threshold, how a quantity scales,
how sharp a transition is, how loss falls with position in the context. This module holds
those readings once:

- `sweep(values, seeds, fn)` runs ``fn(value, seed) -> dict`` on a grid and returns a
  `SweepTable`; `SweepTable.interval(name, value)` is the bootstrap interval of a metric's
  mean over seeds, so a verdict reads an interval, never one seed;
- `crossing(x, y, tau)`: the first control value where a curve reaches tau (a "tau-crossing"),
  linearly interpolated between grid points;
- `power_law_fit(x, y)`: y = a x^b by least squares in log-log space;
- `logistic_fit(x, y)`: y = low + (high - low) / (1 + exp(-(x - midpoint) / width)), the midpoint
  kept inside the measured range;
- `log_logistic_fit(t, y, direction)`: the same in ln t for a fall or a rise over context
  length, with the midpoint kept between the second and the second-to-last lengths;
- `token_losses(model, tokens)`, `per_position_loss(model, tokens)` and `icl_score(losses, early, late)`: the in-context
  learning score of Olsson et al. (2022), the loss at a late position minus the loss at
  an early one (negative: the context helps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import curve_fit

from paperzoo.core.margins import Interval, bootstrap_mean


@dataclass
class SweepTable:
    """One row per (value, seed): the control's value, the seed, and the metrics `fn` returned."""

    rows: list[dict] = field(default_factory=list)

    @property
    def values(self) -> list:
        return list(dict.fromkeys(r["value"] for r in self.rows))

    def metric(self, name: str, value) -> np.ndarray:
        """The metric at one control value, one entry per seed."""
        return np.array([r["metrics"][name] for r in self.rows if r["value"] == value], dtype=float)

    def means(self, name: str) -> np.ndarray:
        return np.array([self.metric(name, v).mean() for v in self.values])

    def interval(self, name: str, value) -> Interval:
        """Bootstrap interval of the metric's mean over seeds at one control value."""
        return bootstrap_mean(self.metric(name, value))


def sweep(values: Iterable, seeds: Sequence[int], fn: Callable[[object, int], dict]) -> SweepTable:
    """Run ``fn(value, seed)`` for every value and seed (values outer, seeds inner); a `SweepTable`."""
    table = SweepTable()
    for value in values:
        for seed in seeds:
            metrics = fn(value, seed)
            if not isinstance(metrics, dict):
                raise TypeError(f"fn must return a dict of metrics, got {type(metrics).__name__}")
            table.rows.append({"value": value, "seed": seed, "metrics": metrics})
    return table


def crossing(x: Sequence[float], y: Sequence[float], tau: float) -> float | None:
    """The smallest x at which y first reaches `tau`, interpolated linearly between grid points; None if never.

    `x` must increase. If y already reaches tau at the first point, that point is returned.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError("x and y must be 1-D and of the same, non-zero length")
    if np.any(np.diff(x) <= 0):
        raise ValueError("x must increase")
    above = np.nonzero(y >= tau)[0]
    if above.size == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(x[0])
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    return float(x0 + (tau - y0) * (x1 - x0) / (y1 - y0))


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float  # the exponent
    r2: float  # in log-log space


def power_law_fit(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """y = a x^b: least squares of log y on log x (every x and y must be positive)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.size < 2:
        raise ValueError("a power law needs at least two (x, y) points of the same length")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("a power law is fitted in log space: every x and y must be positive")
    lx, ly = np.log(x), np.log(y)
    b, log_a = np.polyfit(lx, ly, 1)
    residual = ly - (log_a + b * lx)
    total = ((ly - ly.mean()) ** 2).sum()
    r2 = 1.0 - float((residual ** 2).sum() / total) if total > 0 else 1.0
    return PowerLaw(float(math.exp(log_a)), float(b), r2)


@dataclass(frozen=True)
class Logistic:
    low: float
    high: float
    midpoint: float
    width: float  # the scale of x over which the transition happens (10% to 90%: 4.39 widths)

    def __call__(self, x):
        return self.low + (self.high - self.low) / (1.0 + np.exp(-(np.asarray(x, dtype=float) - self.midpoint) / self.width))

    @property
    def sharpness(self) -> float:
        """10%-90% rise over the midpoint: small means a sharp transition relative to where it happens."""
        return 2 * math.log(9) * abs(self.width) / abs(self.midpoint) if self.midpoint else math.inf


def logistic_fit(x: Sequence[float], y: Sequence[float]) -> Logistic:
    """Least-squares fit of y = low + (high - low) / (1 + exp(-(x - midpoint) / width)).

    The midpoint is kept inside the measured range and the width positive (a fall has high < low):
    unbounded, a smooth curve could be fitted by a transition far outside the data, whose small
    width over a distant midpoint would read as a sharp one.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.size < 4:
        raise ValueError("a logistic needs at least four (x, y) points of the same length")
    f = lambda t, low, high, mid, width: low + (high - low) / (1.0 + np.exp(-(t - mid) / width))
    span = float(x.max() - x.min()) or 1.0
    rising = np.corrcoef(x, y)[0, 1] >= 0 if np.ptp(y) > 0 else True
    start = [float(y.min()), float(y.max())] if rising else [float(y.max()), float(y.min())]
    start += [float(np.median(x)), span / 10]
    bounds = ([-np.inf, -np.inf, float(x.min()), span * 1e-6], [np.inf, np.inf, float(x.max()), np.inf])
    (low, high, mid, width), _ = curve_fit(f, x, y, p0=start, bounds=bounds, maxfev=20000)
    return Logistic(float(low), float(high), float(mid), float(width))


@dataclass(frozen=True)
class LogLogistic:
    before: float  # the level at short context
    after: float  # the level at long context
    midpoint: float  # t_c, in context steps
    width: float  # w, in ln(context)

    def __call__(self, t):
        rise = 1 / (1 + np.exp(-(np.log(t) - math.log(self.midpoint)) / self.width))
        return self.before + (self.after - self.before) * rise

    @property
    def sharpness(self) -> float:
        """10%-90% span in context length over the midpoint: (t_90 - t_10) / t_c = 2 sinh(ln(9) w)."""
        return 2 * math.sinh(math.log(9) * self.width)


def log_logistic_fit(t, y, direction: int) -> LogLogistic:
    """Least squares of y = before + (after - before) / (1 + exp(-(ln t - ln t_c) / w)) for a fall (direction -1,
    after <= before) or a rise (+1), on the context lengths t >= 2 (at t = 1 there is no context yet).

    The direction is the claim's (the energy falls, the accuracy rises); a curve that does not move that way
    gets no transition (the widest width). t_c is kept between the second and the second-to-last fitted
    lengths, so that the data resolve the transition on both sides (unbounded, a fit can place a step between
    two sampled lengths, or outside them, and call a smooth curve sharp; core's `logistic_fit` keeps its midpoint
    only inside the measured range, in x rather than ln t),
    and both levels stay within the data's range widened by its span.
    """
    if direction not in (-1, 1):
        raise ValueError(f"direction must be -1 (a fall) or +1 (a rise), got {direction!r}")
    t, y = np.asarray(t, dtype=float), np.asarray(y, dtype=float)
    x, y = np.log(t[t >= 2]), y[t >= 2]
    if len(x) < 5:
        raise ValueError("a transition needs at least five context lengths >= 2")
    f = lambda x, before, change, mid, w: before + direction * change / (1 + np.exp(-(x - mid) / w))
    raw_span = float(y.max() - y.min())
    span = raw_span or 1e-6
    bounds = ([float(y.min()) - span, 0.0, float(x[1]), 0.02],  # before, change, ln t_c, w
              [float(y.max()) + span, 3 * span, float(x[-2]), 5.0])
    start = np.clip([float(y[0]), span, float(np.median(x)), 0.5], bounds[0], bounds[1])
    try:
        (before, change, mid, w), _ = curve_fit(f, x, y, p0=start, bounds=bounds, maxfev=20000)
    except RuntimeError:  # no convergence: report the widest transition
        before, change, mid, w = float(y[0]), 0.0, float(np.median(x)), 5.0
    if raw_span == 0 or change <= 0.05 * raw_span:  # no transition the claimed way: its width means nothing, so report the widest
        w = 5.0
    return LogLogistic(float(before), float(before + direction * change), float(math.exp(mid)), float(w))


@torch.no_grad()
def token_losses(model, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[N, T - 1]: entry t - 1 is the next-token loss of token t of its row given tokens 0 .. t - 1."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(tokens), batch_size):
        x = tokens[i:i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none"))
    model.train(was_training)
    return torch.cat(out)


def per_position_loss(model, tokens: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """[T - 1]: the mean next-token loss at each position of `tokens` [N, T] (position t predicts token t + 1)."""
    return token_losses(model, tokens, batch_size).double().mean(0).numpy()


def icl_score(losses: Sequence[float], early: int, late: int) -> float:
    """Loss at position `late` minus loss at position `early` (Olsson et al. 2022 use 500 and 50); < 0: context helps."""
    losses = np.asarray(losses, dtype=float)
    if not 0 <= early < late < losses.size:
        raise ValueError(f"need 0 <= early < late < {losses.size}, got early={early}, late={late}")
    return float(losses[late] - losses[early])
