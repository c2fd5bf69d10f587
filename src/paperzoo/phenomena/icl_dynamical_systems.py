r"""Hierarchy-PDF: the next value's probability density, read from a digit-tokenised LM
(Liu, Boullé, Sarfati & Earls, "LLMs learn governing principles of dynamical systems, revealing an
in-context neural scaling law", arXiv:2402.00795).

A time series $x_1, \dots, x_n \in [0, 1)$ is written as fixed-width digit strings, one value per
number, separated by a separator token: with $P$ digits per value, ``37,52,`` for $x = 0.37, 0.52$.
At the position of the next value's first digit the LM's softmax restricted to the ten digit tokens,
renormalised, is a histogram of ten bins of width $1/10$. Appending a digit $d_1$ and reading the
softmax again splits bin $d_1$ into ten bins of width $1/100$, and so on: the density is a tree whose
node $v = d_1 \dots d_\ell$ holds the mass

$$ m(v) = \prod_{k=1}^{\ell} p_\theta(d_k \mid x_{1:n}, d_{1:k-1}), $$

and the leaves ($\ell = P$) are the bin probabilities of $\hat p(x_{n+1} \mid x_{1:n})$ at resolution
$10^{-P}$ (density $10^P m(v)$ on each bin). Refining every node costs $(10^P - 1)/9$ next-digit
distributions; a node that is not refined keeps its mass spread uniformly over its bin (the paper's
multi-resolution PDF).

The learned kernel is compared with the true transition kernel $p^*(\cdot \mid x_n)$, given as bin
probabilities at the same resolution, by (nats, sums over bins $i$)

- the Bhattacharyya distance $D_B(p^*, \hat p) = -\ln \sum_i \sqrt{p^*_i \hat p_i}$ (the paper's main loss),
- the KL divergence $D_{KL}(p^* \,\|\, \hat p) = \sum_i p^*_i \ln (p^*_i / \hat p_i)$ (truth first, as in the
  official code's ``KL_div``),
- the Jensen-Shannon divergence $\tfrac12 D_{KL}(p^* \| m) + \tfrac12 D_{KL}(\hat p \| m)$, $m = (p^* + \hat p)/2$.

The paper's in-context scaling law is a power law of these losses in the number of observed values
$n$ (fit it with `paperzoo.core.measures.power_law_fit`).

Which nodes are refined (`hierarchy_pdf` arguments):

- ``min_mass`` (paperzoo's rule, not the paper's): a node whose mass is below ``min_mass`` is not
  refined. 0 refines the full tree. Since a child never holds more than its parent, a whole subtree
  below the threshold costs nothing.
- ``observed`` (the official code's rule, ``recursive_refiner`` in ``models/ICL.py`` with
  ``mode="neighbor"``): given the observed next value $o = o_1 \dots o_P$, a node $v$ of $\ell$ digits is
  refined when it lies on the observed path ($v = o_{1:\ell}$), or when $\ell \le r$ (``refine_depth``)
  and its first digit is within one of $o_1$ (``neighbours=1``; ``neighbours=None`` is the code's
  ``mode="all"``, any first digit). So the observed value's neighbourhood is resolved finely and far bins
  stay coarse, which suits the unimodal kernels of the continuous systems it was written for. The
  paper's code has no mass threshold. Both rules can be combined (a node must pass both); the root
  is always read.

Deviations from the official code:

- The official code reads the observed path from one forward pass over the whole series (free for
  every position at once) and each off-path node with one forward pass that reuses the prefix's KV
  cache. Here every node is a row ``prefix + digits`` of the same length as its level's others, and
  each level is one batched forward (chunked by ``batch_size``) without a cache: the same numbers,
  more compute per query, and it works on any model whose forward takes ``input_ids`` and returns
  ``.logits``. `HierarchyPDF.queries` counts the next-digit distributions read (one per refined node,
  the observed path included: the official code's number of forward calls, plus the path it gets free).
- The losses are computed on the fine grid of $10^P$ bins, a coarse bin's mass spread uniformly over
  its fine bins; the official code discretises the truth onto the PDF's own multi-resolution bins
  instead (equal when every node is refined, and by Cauchy-Schwarz never larger otherwise).
- The paper writes values with a decimal point after rescaling (LLaMA-2 tokenises each digit); any
  fixed-width format works here, since the digits and the separator are given as token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BASE = 10  # digits per position: each refinement splits a bin in ten


@dataclass(frozen=True)
class DigitFormat:
    """How a series is written for the LM: `digits` (P) digits per value, then the separator.

    `digit_ids` are the token ids of "0" .. "9"; `bos_id`, when given, opens the prompt. A value is an
    integer code c in [0, 10^P), the bin [c 10^-P, (c + 1) 10^-P) of [0, 1) (`codes` rounds down).
    """

    digit_ids: tuple[int, ...]
    separator_id: int
    digits: int
    bos_id: int | None = None

    def __post_init__(self):
        if len(self.digit_ids) != BASE or len(set(self.digit_ids)) != BASE:
            raise ValueError(f"digit_ids must be ten distinct token ids, got {self.digit_ids!r}")
        if self.separator_id in self.digit_ids or self.digits < 1:
            raise ValueError("the separator must not be a digit token, and digits must be at least 1")

    @property
    def bins(self) -> int:
        return BASE**self.digits

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Values in [0, 1) -> their bin codes floor(x 10^P)."""
        return (torch.as_tensor(x, dtype=torch.float64) * self.bins).floor().long().clamp(0, self.bins - 1)

    def digits_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [...] -> their P digits [..., P], most significant first."""
        powers = BASE ** torch.arange(self.digits - 1, -1, -1)
        return torch.as_tensor(codes, dtype=torch.long)[..., None] // powers % BASE

    def encode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, n] -> token ids [B, (bos) + n (P + 1)]: ``d_1 .. d_P sep`` per value, ending on a separator,
        so the prompt stops where the next value's first digit is predicted."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        table = torch.tensor(self.digit_ids)
        tokens = table[self.digits_of(codes)]  # [B, n, P]
        sep = torch.full((*codes.shape, 1), self.separator_id)
        out = torch.cat([tokens, sep], dim=-1).flatten(-2)
        if self.bos_id is not None:
            out = torch.cat([torch.full((*codes.shape[:-1], 1), self.bos_id), out], dim=-1)
        return out


@dataclass
class HierarchyPDF:
    probs: torch.Tensor  # [B, 10^P] float64 bin probabilities of the next value on [0, 1), resolution 10^-P
    queries: int  # next-digit distributions read (refined nodes of the digit tree, over the batch)
    forward_passes: int  # batched model calls
    refined: list[torch.Tensor]  # per level l: [B, 10^l] bool, the nodes that were refined

    @property
    def density(self) -> torch.Tensor:
        """The piecewise-uniform density on [0, 1): probability over bin width."""
        return self.probs * self.probs.shape[-1]


def full_tree_queries(digits: int) -> int:
    """Next-digit distributions the full tree reads per prompt: 1 + 10 + ... + 10^(P-1)."""
    return (BASE**digits - 1) // (BASE - 1)


@torch.no_grad()
def next_digit_probs(model, rows: torch.Tensor, digit_ids: Sequence[int],
                     batch_size: int = 256) -> tuple[torch.Tensor, int]:
    """softmax over the ten digit tokens of the LM's last-position logits, for rows [R, L]; (probs [R, 10], calls)."""
    out, calls = [], 0
    for i in range(0, len(rows), batch_size):
        logits = model(input_ids=rows[i:i + batch_size]).logits[:, -1, list(digit_ids)].float()
        out.append(logits.softmax(-1))  # the paper restricts the softmax to the digit tokens
        calls += 1
    return (torch.cat(out) if out else torch.zeros(0, BASE)), calls


@torch.no_grad()
def hierarchy_pdf(model, prefix: torch.Tensor, fmt: DigitFormat, min_mass: float = 0.0,
                  observed: torch.Tensor | None = None, refine_depth: int | None = None,
                  neighbours: int | None = 1, batch_size: int = 256) -> HierarchyPDF:
    """The next value's density after each prompt in `prefix` [B, L] (each ending on a separator).

    Level by level, every node allowed by the refinement rules (see the module docstring) is one row
    ``prefix + its digits``, all of a level in one batched forward; a node not refined spreads its
    mass uniformly over its ten children, and none of them is refined.
    `observed` [B] (codes of the observed next values) switches on the official locality rule, with
    `refine_depth` r (default P - 1: the neighbourhood is resolved fully) and `neighbours`.
    """
    model.eval()
    prefix = torch.as_tensor(prefix, dtype=torch.long)
    if prefix.ndim != 2:
        raise ValueError(f"prefix must be [batch, length], got shape {tuple(prefix.shape)}")
    if min_mass < 0 or min_mass > 1:
        raise ValueError(f"min_mass must lie in [0, 1], got {min_mass}")
    P, B = fmt.digits, len(prefix)
    r = P - 1 if refine_depth is None else refine_depth
    o = None if observed is None else fmt.digits_of(torch.as_tensor(observed).reshape(B))  # [B, P]
    table = torch.tensor(fmt.digit_ids)
    mass = torch.ones(B, 1, dtype=torch.float64)  # m(v) for the nodes of the current level
    is_open = torch.ones(B, 1, dtype=torch.bool)  # not inside a bin already kept uniform
    queries = passes = 0
    refined = []
    for level in range(P):
        nodes = torch.arange(BASE**level)  # node v of `level` digits, as the integer d_1 .. d_level
        refine = is_open & (mass >= min_mass) if level else is_open.clone()
        if o is not None and level:
            on_path = nodes[None, :] == (o[:, :level] * BASE ** torch.arange(level - 1, -1, -1)).sum(-1, keepdim=True)
            first = nodes // BASE ** (level - 1)  # v's first digit
            near = (first[None, :] - o[:, :1]).abs() <= (BASE if neighbours is None else neighbours)
            refine &= on_path | (near & (level <= r))
        b, v = refine.nonzero(as_tuple=True)
        children = (mass / BASE)[:, :, None].expand(B, BASE**level, BASE).clone()  # uniform unless refined
        if len(b):
            branch = table[fmt.digits_of(v)[:, P - level:]] if level else torch.zeros(len(b), 0, dtype=torch.long)
            probs, calls = next_digit_probs(model, torch.cat([prefix[b], branch], dim=1), fmt.digit_ids, batch_size)
            children[b, v] = mass[b, v, None] * probs.double()
            queries, passes = queries + len(b), passes + calls
        refined.append(refine)
        mass = children.reshape(B, BASE ** (level + 1))
        is_open = refine[:, :, None].expand(B, BASE**level, BASE).reshape(B, -1)
    return HierarchyPDF(mass, queries, passes, refined)


def bhattacharyya_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""$D_B = -\ln \sum_i \sqrt{p_i q_i}$ over the last dimension (bin probabilities)."""
    return -torch.log(torch.sqrt(p.double() * q.double()).sum(-1).clamp_min(1e-300))


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""$D_{KL}(p \| q) = \sum_i p_i \ln(p_i / q_i)$ over the last dimension; bins with $p_i = 0$ add nothing."""
    p, q = p.double(), q.double()
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""$\tfrac12 D_{KL}(p \| m) + \tfrac12 D_{KL}(q \| m)$, $m = (p + q) / 2$; at most $\ln 2$."""
    m = (p.double() + q.double()) / 2
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


LOSSES = {"bhattacharyya": bhattacharyya_distance, "kl": kl_divergence, "jsd": js_divergence}
