"""Margins: when a measured difference between two arms is more than noise.

A check that compares two arms ("A beats B") must not pass on a difference the
set-up cannot resolve. paperzoo uses two kinds of evidence, and every experiment
uses these helpers rather than a bare ``a < b``:

- **within one seed**, a percentile bootstrap over the items both arms were
  measured on (problems, sequences, operand pairs): `paired_difference` gives an
  interval for mean(a - b), and `clearly_greater` passes only when that interval
  lies above zero (or above a stated minimum effect);
- **across seeds**, `seed_spread` summarises a metric over seeds, and
  `beyond_seed_spread` passes only when every seed's difference has the same sign
  and the mean difference exceeds the spread (max - min) of the differences.

The aggregate verdict over seeds (`paperzoo.core.experiment.aggregate`) also asks
every seed to pass a check, so a margin must hold per seed *and* agree across seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    low: float
    mean: float
    high: float

    def above(self, x: float = 0.0) -> bool:
        return self.low > x

    def below(self, x: float = 0.0) -> bool:
        return self.high < x

    def as_dict(self) -> dict:
        return {"low": self.low, "mean": self.mean, "high": self.high}


def decided(interval: Interval, at_least: float = 0.0) -> bool | None:
    """A three-way check on a difference: True when its interval clears zero and its mean reaches `at_least`
    (the effect size the paper reports); False when the whole interval lies below `at_least`; None (undecided)
    when it straddles."""
    if interval.low > 0 and interval.mean >= at_least:
        return True
    if interval.high < at_least:
        return False
    return None


def beats(a, b) -> bool | None:
    """Arm a beats arm b on paired items: `decided` on the paired bootstrap interval of mean(a - b)."""
    return decided(paired_difference(a, b))


def all_of(values) -> bool | None:
    """A three-way AND of checks: False if any is False, True if all are True, else None (undecided)."""
    values = list(values)
    if any(v is False for v in values):
        return False
    return True if all(v is True for v in values) else None


def _values(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"{name} is empty: a margin needs at least one measured item")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} holds non-finite values")
    return v


def bootstrap_mean(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Percentile-bootstrap interval for the mean of `values` (one value per item)."""
    v = _values(values, "values")
    if v.size == 1:
        return Interval(float(v[0]), float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return Interval(float(np.quantile(means, alpha)), float(v.mean()), float(np.quantile(means, 1 - alpha)))


def paired_difference(a, b, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Interval for mean(a_i - b_i), resampling items: a and b were measured on the same items."""
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired arms need the same items: {a.size} against {b.size}")
    return bootstrap_mean(a - b, level, resamples, seed)


def clearly_greater(a, b, min_effect: float = 0.0, **kw) -> bool:
    """True when mean(a - b) exceeds `min_effect` beyond the bootstrap interval over items."""
    return paired_difference(a, b, **kw).above(min_effect)


def unpaired_difference(a, b, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Interval for mean(a) - mean(b) when the arms were measured on different items."""
    a, b = _values(a, "a"), _values(b, "b")
    rng = np.random.default_rng(seed)
    da = a[rng.integers(0, a.size, size=(resamples, a.size))].mean(axis=1)
    db = b[rng.integers(0, b.size, size=(resamples, b.size))].mean(axis=1)
    d = da - db
    alpha = (1 - level) / 2
    return Interval(float(np.quantile(d, alpha)), float(a.mean() - b.mean()), float(np.quantile(d, 1 - alpha)))


def seed_spread(values) -> Interval:
    """(min, mean, max) of one metric over seeds."""
    v = _values(values, "values")
    return Interval(float(v.min()), float(v.mean()), float(v.max()))


def beyond_seed_spread(differences) -> bool:
    """Per-seed differences (a - b) show a > b: all positive, and their mean exceeds their spread."""
    d = _values(differences, "differences")
    return bool((d > 0).all() and (d.size == 1 or d.mean() > d.max() - d.min()))
