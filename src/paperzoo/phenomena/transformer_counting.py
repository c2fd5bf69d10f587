"""When Can Transformers Count to n? (Yehudai, Kaplan, Dar, Rassin, Ghandeharioun, Geva, Globerson; arXiv:2407.15160).

**The question.** Query count (QC): given x_1 .. x_n over a vocabulary of m tokens, how often
does the last token x_n occur? Most frequent element (MFE): which token occurs most often?
The paper shows a phase transition governed by the embedding dimension d against the
vocabulary size m: with d >= m one attention layer keeps exact counts; with d < m the token
embeddings cannot be orthogonal, their interference forces weights that grow with n, and
exact counting becomes numerically unstable and, in practice, unlearnable; MFE needs
d = Omega(m) (a communication-complexity lower bound).

**The two one-layer constructions, hand-set here** (plain tensors, so the arithmetic is visible):

- *Histogram* (`histogram_count`). The query attends uniformly to all n tokens; with values
  the token embeddings u_x, the attention output is o = (1/n) sum_j u_{x_j}, and

      n <o, u_q> = c + sum_{j: x_j != q} <u_{x_j}, u_q>,

  exact when the u are orthonormal (possible iff d >= m). Below that, the error per
  foreign token is an inner product of two distinct embeddings, and the largest such
  inner product (the coherence mu) of any m unit vectors in R^d is at least the Welch bound

      mu >= sqrt((m - d) / (d (m - 1)))                (`welch_bound`),

  met with equality by an equiangular tight frame.

- *CountAttend* (`count_attend`). A BOS token at position 0 and the c copies of the query
  get the same score beta, other tokens beta <u_x, u_q> < beta; as beta grows the
  attention on BOS tends to w = 1/(c + 1), and BOS's value (a dedicated coordinate) carries
  w to the output. An MLP inverts it: c = 1/w - 1 (`inverse_mlp`). It works for d < m
  too, but only with beta large against 1/(1 - mu) log n (weights that grow with n), and
  the MLP needs about one ReLU per count it must tell apart (n of them), the paper's
  "neurons must grow with the context length".

**Deviations.** The constructions are written as functions of the embeddings rather than as
weights of an HF model; `inverse_mlp` reads w exactly at the n + 1 possible values 1/(c+1)
with n ReLUs (piecewise-linear interpolation), one way to realise the paper's f(w) = 1/w.
The experiment (`paperzoo.experiments.phenomena.transformer_counting`) trains one-layer
models over a grid of d around m; `paperzoo.core.tasks.QueryCount` and `MostFrequent` draw
the sequences.
"""

from __future__ import annotations

import math

import torch


def welch_bound(m: int, d: int) -> float:
    """The least possible coherence max_{i != j} |<u_i, u_j>| of m unit vectors in R^d (0 when d >= m)."""
    if m < 2 or d < 1:
        raise ValueError(f"need m >= 2 and d >= 1, got m={m}, d={d}")
    return math.sqrt((m - d) / (d * (m - 1))) if d < m else 0.0


def coherence(U: torch.Tensor) -> float:
    """max_{i != j} |<u_i, u_j>| of the rows of U [m, d] after normalising them."""
    U = torch.nn.functional.normalize(U.double(), dim=1)
    G = (U @ U.T).abs()
    G.fill_diagonal_(0.0)
    return G.max().item()


def histogram_count(x: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """[B] float: n <o, u_q> with o the uniform attention average of the embeddings U[x] and q = x[:, -1].

    x [B, n] token ids, U [m, d] the embeddings. Exact counts when U's rows are orthonormal.
    """
    n = x.shape[1]
    o = U[x].double().mean(dim=1)  # [B, d]: uniform attention over the n positions, values u_x
    return n * (o * U[x[:, -1]].double()).sum(-1)


def count_attend(x: torch.Tensor, U: torch.Tensor, beta: float) -> torch.Tensor:
    """[B] float: the attention weight on a BOS token when the query x_n attends with scores beta <u_x, u_q>.

    BOS (position 0) gets score beta, like an exact match. As beta grows the weight tends
    to 1/(c + 1), c the count of the query; BOS's value is 1 in its own coordinate, so this
    weight is what the attention layer outputs there.
    """
    U = torch.nn.functional.normalize(U.double(), dim=1)
    scores = beta * (U[x] * U[x[:, -1]][:, None, :]).sum(-1)  # [B, n]
    scores = torch.cat([torch.full((len(x), 1), float(beta), dtype=scores.dtype), scores], dim=1)
    return torch.softmax(scores, dim=1)[:, 0]


def inverse_mlp(n: int) -> torch.nn.Sequential:
    """A one-hidden-layer ReLU MLP with n hidden units mapping w = 1/(c + 1) to c, exactly for c = 1 .. n.

    Piecewise-linear interpolation of f(w) = 1/w - 1 through its n + 1 knots w_c = 1/(c+1),
    c = 0 .. n, read from the largest w down: one ReLU per slope change.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    knots = [1.0 / (c + 1) for c in range(n + 1)]  # decreasing: w_0 = 1, ..., w_n = 1/(n+1)
    # f(w) = sum_k a_k relu(t_k - w) + f(1): slope changes at the knots t_k = w_k, k = 0 .. n-1
    slopes = [-(c_next - c) / (knots[c] - knots[c_next]) for c, c_next in zip(range(n), range(1, n + 1))]
    hidden = torch.nn.Linear(1, n, dtype=torch.float64)
    out = torch.nn.Linear(n, 1, dtype=torch.float64)
    with torch.no_grad():
        hidden.weight.copy_(-torch.ones(n, 1))
        hidden.bias.copy_(torch.tensor(knots[:n]))
        changes = [-slopes[0]] + [-(slopes[k] - slopes[k - 1]) for k in range(1, n)]
        out.weight.copy_(torch.tensor(changes)[None, :])
        out.bias.zero_()
    return torch.nn.Sequential(hidden, torch.nn.ReLU(), out)
