"""A Percolation Model of Emergence (Lubana, Kawaguchi, Dick, Tanaka; arXiv:2408.12578, ICLR 2025).

**The idea.** The paper trains a small transformer (2 layers, 2 heads, width 128 in the official
config, ``config/conf.yaml`` of github.com/EkdeepSLubana/ConceptPercolation) on strings of a
formal language: a PCFG over parts of speech whose slots are filled with entities and their
properties, where only some entity-property pairs *type-check* (concept classes own their
properties). It sees three phases: the grammar is learned first with little task gain; then a
sudden rise on narrow tasks (unscrambling, conditional generation) once the type constraints
are learned; then generalisation to pairs it has not seen. The abstract's model of the sudden
rise: percolation on a bipartite graph between entities and properties. Each observed
(entity, property) pair is an edge; when enough edges are in, a giant connected component
forms, and every entity in it can be inferred to take every property in it, seen or not. The
point of emergence then shifts with the size of the graph, which the paper tests by varying the
number of properties |K| (the official README: ``data.n_descriptive_properties``, which the
official code turns into 40 x (that number - 10) property values).

**The equations implemented.** A random bipartite graph with n_E entities and n_K properties,
each of the n_E n_K possible edges present with probability p (bond percolation), has mean
degrees c_E = p n_K (an entity's properties) and c_K = p n_E (a property's entities). The
fractions S_E, S_K of entities and properties in the giant component solve

    S_E = 1 - exp(-c_E S_K),    S_K = 1 - exp(-c_K S_E)          (`giant_fraction`)

(the branching-process fixed point; alternating E -> K -> E steps have mean offspring c_E c_K),
and a non-zero solution exists iff c_E c_K > 1, that is above

    p_c = 1 / sqrt(n_E n_K),   i.e.  m_c = p_c n_E n_K = sqrt(n_E n_K) edges   (`critical_probability`,
                                                                                 `critical_edges`).

Pairs are met in data by uniform draws with replacement; after m draws, N (1 - exp(-m / N))
distinct edges of the N possible ones are in (`distinct_edges`), which is m for m << N, so the
amount of data at the threshold grows as sqrt(n_E n_K): at a fixed number of entities, as
|K|^(1/2). That square-root law is the prediction compared with training here
(`PREDICTED_EXPONENT`); it is our derivation of the threshold of the bipartite graph the
abstract names (the paper's own text was not readable in this session, so its section and
figure numbers are not quoted).

`giant_component_curve` simulates the process (Newman-Ziff: edges added in random order,
union-find), giving the giant component's fraction after every edge; its second-largest
component peaks at the finite-size threshold (`simulated_threshold`).

**Reading a transition off a learning curve.** `transition_point` fits a logistic in training
steps to an accuracy curve measured on fixed items (`paperzoo.core.measures.logistic_fit`) and
bootstraps the items: the midpoint (the transition step), the onset (where 10% of the rise is
done) and the sharpness (10%-90% span over the midpoint) each get an interval.
`scaling_exponent` fits t* = a |K|^b across |K| (`power_law_fit`) on every bootstrap
replicate, so the exponent b has an interval too.

**Deviations.** The language is `paperzoo.core.tasks.TypedLanguage`: one copula, one conjunction,
descriptive properties only (no relative verbs, objects, adjectives, adverbs or personal
identifiers of the official generator), classes that own disjoint property sets, and a share of
valid pairs held out of training. The percolation model here is the plain random bipartite
graph; the official code's structured priors over property values are not modelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from paperzoo.core.margins import Interval
from paperzoo.core.measures import Logistic, logistic_fit, power_law_fit

PREDICTED_EXPONENT = 0.5  # t* ~ sqrt(|E| |K|): exponent of |K| at a fixed number of entities


def critical_probability(n_e: int, n_k: int) -> float:
    """p_c = 1 / sqrt(n_E n_K): the edge probability at which a giant component appears."""
    if n_e < 1 or n_k < 1:
        raise ValueError(f"need at least one node on each side, got n_e={n_e}, n_k={n_k}")
    return 1.0 / math.sqrt(n_e * n_k)


def critical_edges(n_e: int, n_k: int) -> float:
    """m_c = p_c n_E n_K = sqrt(n_E n_K): the number of distinct edges at the threshold."""
    return critical_probability(n_e, n_k) * n_e * n_k


def distinct_edges(draws, n_e: int, n_k: int):
    """Expected distinct pairs after `draws` uniform draws with replacement among the n_E n_K pairs."""
    N = n_e * n_k
    return N * (1.0 - np.exp(-np.asarray(draws, dtype=float) / N))


def giant_fraction(p: float, n_e: int, n_k: int, iterations: int = 10000) -> tuple[float, float]:
    """(S_E, S_K): the shares of entities and of properties in the giant component at edge probability p.

    The fixed point of S_E = 1 - exp(-p n_K S_K), S_K = 1 - exp(-p n_E S_E), iterated from (1, 1), which
    converges to the largest solution (0 at or below the threshold).
    """
    c_e, c_k = p * n_k, p * n_e
    s_e = s_k = 1.0
    for _ in range(iterations):
        new_e = 1.0 - math.exp(-c_e * s_k)
        new_k = 1.0 - math.exp(-c_k * new_e)
        if abs(new_e - s_e) < 1e-12 and abs(new_k - s_k) < 1e-12:
            break
        s_e, s_k = new_e, new_k
    return s_e, s_k


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return int(root)

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return int(self.size[a])
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]
        return int(self.size[a])


@dataclass(frozen=True)
class PercolationCurve:
    """Component sizes after each edge of a random bipartite graph, added one at a time."""

    n_e: int
    n_k: int
    largest: np.ndarray  # [edges]: nodes in the largest component after edge i + 1
    second: np.ndarray  # [edges]: nodes in the second-largest component

    @property
    def edges(self) -> np.ndarray:
        return np.arange(1, len(self.largest) + 1)

    def fraction(self) -> np.ndarray:
        """The largest component's share of all n_E + n_K nodes."""
        return self.largest / (self.n_e + self.n_k)


def giant_component_curve(n_e: int, n_k: int, edges: int | None = None, seed: int = 0) -> PercolationCurve:
    """Add `edges` distinct entity-property edges (default all n_E n_K) in random order; track the components.

    Newman-Ziff: one union-find pass, so the whole curve costs about as much as one graph. The
    second-largest component is tracked exactly (component sizes are kept in a multiset).
    """
    N = n_e * n_k
    edges = N if edges is None else min(int(edges), N)
    order = np.random.default_rng(seed).permutation(N)[:edges]
    uf = _UnionFind(n_e + n_k)
    counts = {1: n_e + n_k}  # component size -> how many components have it
    largest, second = np.empty(edges, dtype=np.int64), np.empty(edges, dtype=np.int64)
    top = [1, 1]
    for i, edge in enumerate(order):
        a, b = int(edge // n_k), n_e + int(edge % n_k)
        ra, rb = uf.find(a), uf.find(b)
        if ra != rb:
            sa, sb = int(uf.size[ra]), int(uf.size[rb])
            for s in (sa, sb):
                counts[s] -= 1
                if not counts[s]:
                    del counts[s]
            merged = uf.union(ra, rb)
            counts[merged] = counts.get(merged, 0) + 1
            sizes = sorted(counts, reverse=True)[:2]
            runner_up = sizes[0] if counts[sizes[0]] > 1 else (sizes[1] if len(sizes) > 1 else 0)
            top = [sizes[0], runner_up]
        largest[i], second[i] = top
    return PercolationCurve(n_e, n_k, largest, second)


def simulated_threshold(curve: PercolationCurve) -> int:
    """The number of edges at which the second-largest component peaks: the finite-size threshold."""
    return int(curve.edges[int(np.argmax(curve.second))])


# ---------------------------------------------------------------------------------------------
# Transition points of learning curves


@dataclass(frozen=True)
class Transition:
    """A logistic fitted to an accuracy curve, with bootstrap intervals over the evaluation items."""

    fit: Logistic
    midpoint: Interval  # the transition step t*
    onset: Interval  # where 10% of the rise is done: midpoint - ln(9) width
    sharpness: Interval  # (t_90 - t_10) / t*
    replicates: np.ndarray  # [R] bootstrap midpoints (NaN where a fit failed)

    def as_dict(self) -> dict:
        return {"midpoint": self.midpoint.as_dict(), "onset": self.onset.as_dict(),
                "sharpness": self.sharpness.as_dict(), "low": self.fit.low, "high": self.fit.high,
                "width": self.fit.width}


def _onset(fit: Logistic) -> float:
    return fit.midpoint - math.log(9) * abs(fit.width)


def _interval(point: float, values: np.ndarray, level: float = 0.95) -> Interval:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Interval(math.nan, point, math.nan)
    alpha = (1 - level) / 2
    return Interval(float(np.quantile(values, alpha)), float(point), float(np.quantile(values, 1 - alpha)))


def transition_point(steps: Sequence[float], correct: np.ndarray, resamples: int = 200, seed: int = 0) -> Transition:
    """Logistic fit of accuracy against training step, with a bootstrap over items.

    `correct` is [len(steps), items]: whether each fixed evaluation item was right at each step.
    Every replicate resamples the items (the same resample at every step) and refits.
    """
    steps = np.asarray(steps, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if correct.ndim != 2 or correct.shape[0] != steps.size:
        raise ValueError(f"correct must be [steps, items], got {correct.shape} for {steps.size} steps")
    fit = logistic_fit(steps, correct.mean(axis=1))
    rng = np.random.default_rng(seed)
    mids, onsets, sharp = (np.full(resamples, np.nan) for _ in range(3))
    for r in range(resamples):
        idx = rng.integers(0, correct.shape[1], correct.shape[1])
        try:
            f = logistic_fit(steps, correct[:, idx].mean(axis=1))
        except (RuntimeError, ValueError):
            continue
        mids[r], onsets[r], sharp[r] = f.midpoint, _onset(f), f.sharpness
    return Transition(fit, _interval(fit.midpoint, mids), _interval(_onset(fit), onsets),
                      _interval(fit.sharpness, sharp), mids)


def scaling_exponent(sizes: Sequence[float], replicates: Sequence[np.ndarray], points: Sequence[float]) -> Interval:
    """Exponent b of t* = a |K|^b: the fit on the point estimates, the interval over bootstrap replicates.

    `replicates[i]` holds bootstrap transition steps at size i (independent across sizes, so
    replicates are paired by index only for convenience); replicates with a failed fit are dropped.
    """
    b = power_law_fit(sizes, points).b
    reps = np.stack([np.asarray(r, dtype=float) for r in replicates], axis=1)  # [R, sizes]
    reps = reps[np.isfinite(reps).all(axis=1) & (reps > 0).all(axis=1)]
    bs = np.array([power_law_fit(sizes, row).b for row in reps]) if len(reps) else np.array([])
    return _interval(b, bs)
