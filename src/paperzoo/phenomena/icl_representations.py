r"""ICLR: In-Context Learning of Representations (Park, Lee, Lubana, Yang, Okawa, Nishi, Wattenberg & Tanaka,
arXiv:2501.00070).

Put familiar tokens (apple, bird, ...) on the nodes of a graph whose edges ignore their meaning (a 4x4 grid,
a ring), one token per node, and prompt a model with random walks on it. Read each node's mean hidden state
at each layer as the context grows: past a critical context length the representations reorganise to mirror
the graph, and the model's next-node predictions follow its edges. The paper measures the reorganisation by
the Dirichlet energy of the node representations $x_i$ on the graph's adjacency $A$ (Sec. 4, Eq. 1),

$$E_G(X) = \sum_{i,j} A_{ij}\, \lVert x_i - x_j \rVert^2 = 2\,\mathrm{tr}(X^\top L X), \qquad L = D - A,$$

which is small when neighbours sit close, and by the principal components of the $x_i$, which come to match
the spectral embedding of the graph (the Laplacian's low eigenvectors; the minimisers of $E_G$ at fixed
variance, Sec. 4).

What is implemented, on any HF causal LM through ``output_hidden_states`` (no hooks, no edited model code):

- `grid_graph`, `ring_graph`, `random_walks`, `walk_prompts`: the graphs, the walks (every step moves along
  an edge, uniformly among the current node's neighbours; backtracking allowed, as in the paper) and the
  prompts (one token per node, an optional BOS first).
- `node_means`: node $i$'s representation at context length $t$ and layer $\ell$ is the mean of the hidden
  states at the positions holding node $i$ among the last $N_w$ walk steps before $t$ (steps
  $[t - N_w, t)$; the paper's window is $N_w = 50$), pooled over the prompts given (the paper averages
  over several walks with the same token assignment).
- `dirichlet_energy`: $E_G$ as written above, summed over ordered pairs, so a unit Laplacian eigenvector
  $u_k$ (one-dimensional $X$) has $E_G = 2\lambda_k$.
- `normalized_dirichlet_energy`: $E_G$ is zero for collapsed representations, so it is read relative to
  their spread: the mean squared distance across edges over the mean squared distance across all pairs,

  $$\rho(X) = \frac{E_G(X) / \sum_{ij} A_{ij}}{\sum_{i,j} \lVert x_i - x_j \rVert^2 / (n(n-1))}
           = \frac{n - 1}{2 \sum_{ij} A_{ij}} \cdot \frac{E_G(X)}{\sum_i \lVert x_i - \bar x \rVert^2},$$

  i.e. $E_G$ over the total variance of the node means, scaled so that a placement unrelated to the
  graph has $\rho = 1$ in expectation; its floor is $\rho = \lambda_2 (n-1) / \sum_{ij} A_{ij}$, reached by
  the spectral embedding.
- `pc_laplacian_alignment`: the subspace overlap $\frac1k \lVert P^\top U \rVert_F^2$ between the
  top-$k$ principal-component scores of the node means ($P$, orthonormal columns) and the Laplacian's
  eigenvectors $u_2 .. u_{k+1}$ ($U$): the mean squared cosine of the principal angles, i.e. the mean squared
  canonical correlation between the two $k$-dimensional embeddings. 1 when the top PCs span the spectral
  embedding; $k/(n-1)$ expected for a random subspace.
- `valid_next_probability` (`valid_next_mass` from given logits): the paper's accuracy, the probability
  the model puts on the valid next nodes (the current node's neighbours).
- `in_context_representations`: all of the above, per layer and per context length, for a set of walks.

Deviations and choices:

- The paper plots $E_G$ of the node means; how it normalises is not stated in a form we could check, and an
  unnormalised energy can fall merely because representations shrink. We report $\rho$ (scale-free, and the
  same up to a constant factor as $E_G$ over the total variance of the node means) and keep $E_G$ beside it.
- The PC-Laplacian alignment is our number for what the paper shows as PCA pictures (Figs. 1-3) and argues
  spectrally (Sec. 4); the paper gives no score. A Laplacian whose eigenvalue $\lambda_{k+1}$ equals
  $\lambda_{k+2}$ has no unique $k$-dimensional low subspace and is refused.
- Nodes absent from the window get no mean; the energy and the alignment are then taken on the subgraph
  of the nodes present (the paper's long contexts visit every node, so the case does not arise there).
- Hidden state $\ell$ is ``hidden_states[ell]`` of HF (0: the embeddings; for Llama the last one has the
  final norm applied), where the paper reads the residual stream of Llama-3.1-8B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def grid_graph(rows: int, cols: int) -> torch.Tensor:
    """Adjacency [n, n] of a rows x cols square grid (node r * cols + c), the paper's grid (Fig. 1: 4 x 4)."""
    n = rows * cols
    A = torch.zeros(n, n)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            if c + 1 < cols:
                A[i, i + 1] = A[i + 1, i] = 1
            if r + 1 < rows:
                A[i, i + cols] = A[i + cols, i] = 1
    return A


def ring_graph(n: int) -> torch.Tensor:
    """Adjacency [n, n] of a ring (cycle) of n >= 3 nodes, the paper's ring (Fig. 2)."""
    if n < 3:
        raise ValueError(f"a ring needs at least 3 nodes, got {n}")
    A = torch.zeros(n, n)
    i = torch.arange(n)
    A[i, (i + 1) % n] = A[(i + 1) % n, i] = 1
    return A


def laplacian(A: torch.Tensor) -> torch.Tensor:
    """L = D - A for a symmetric adjacency."""
    return torch.diag(A.sum(1)) - A


def random_walks(A: torch.Tensor, length: int, starts, generator: torch.Generator | None = None) -> torch.Tensor:
    """Node ids [k, length] of random walks from `starts` [k]: each step goes to a uniformly drawn neighbour.

    A [n, n] is one graph for every walk, or A [k, n, n] one graph per walk (padded with isolated nodes).
    A row of A is the step's distribution, so a directed adjacency gives a walk along its arcs.
    """
    starts = torch.as_tensor(starts, dtype=torch.long).reshape(-1)
    rows = (lambda nodes: A[nodes]) if A.ndim == 2 else (lambda nodes: A[torch.arange(len(nodes)), nodes])
    if (rows(starts).sum(-1) == 0).any():
        raise ValueError("a walk cannot start at a node without neighbours")
    walks = torch.empty(len(starts), length, dtype=torch.long)
    walks[:, 0] = starts
    for s in range(1, length):
        walks[:, s] = torch.multinomial(rows(walks[:, s - 1]), 1, generator=generator).squeeze(1)
    return walks


def walk_prompts(node_tokens, A: torch.Tensor, length: int, starts=None, bos_token_id: int | None = None,
                 generator: torch.Generator | None = None):
    """Random-walk prompts for a causal LM: (input_ids [k, S], nodes [k, S]), nodes -1 at the BOS.

    node_tokens [n]: the token of each node (for an LLM, a word that is one token, e.g. " apple"); one walk per
    start, by default one from every node, so that every node occurs from the first step on.
    """
    node_tokens = torch.as_tensor(node_tokens, dtype=torch.long)
    starts = torch.arange(len(A)) if starts is None else starts
    nodes = random_walks(A, length, starts, generator)
    input_ids = node_tokens[nodes]
    if bos_token_id is not None:
        input_ids = torch.cat([torch.full((len(nodes), 1), bos_token_id), input_ids], 1)
        nodes = torch.cat([torch.full((len(nodes), 1), -1), nodes], 1)
    return input_ids, nodes


def walk_steps(nodes: torch.Tensor) -> torch.Tensor:
    """[B, S]: which walk step each position holds (-1 where `nodes` is -1: a BOS or separator)."""
    is_node = nodes >= 0
    return torch.where(is_node, is_node.long().cumsum(1) - 1, torch.full_like(nodes, -1))


def node_means(hidden: torch.Tensor, nodes: torch.Tensor, n: int, t: int, window: int = 50):
    """Each node's mean hidden state over the walk steps [t - window, t), pooled over the batch.

    hidden [B, S, d]; nodes [B, S] node ids, -1 at positions that hold no node. Returns (means [n, d], present
    [n] bool); a node with no occurrence in the window gets zeros and present False.
    """
    step = walk_steps(nodes)
    in_window = (nodes >= 0) & (step >= t - window) & (step < t)
    onehot = torch.nn.functional.one_hot(nodes.clamp(min=0), n).to(hidden.dtype) * in_window[..., None]  # [B, S, n]
    counts = onehot.sum((0, 1))
    sums = torch.einsum("bsn,bsd->nd", onehot, hidden)
    return sums / counts.clamp(min=1)[:, None], counts > 0


def dirichlet_energy(X: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """E_G(X) = sum_{i,j} A_ij ||x_i - x_j||^2 (ordered pairs): the paper's Eq. 1. X [n, d] or [n]."""
    X = X.reshape(len(X), -1)
    return (A.to(X.dtype) * torch.cdist(X, X).pow(2)).sum()


def normalized_dirichlet_energy(X: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """rho = mean squared distance over edges / mean squared distance over all pairs: 1 for a placement unrelated
    to the graph, lambda_2 (n - 1) / sum(A) for the spectral embedding (see the module docstring)."""
    X = X.reshape(len(X), -1)
    n = len(X)
    total_variance = (X - X.mean(0)).pow(2).sum()
    return (n - 1) / (2 * A.sum().to(X.dtype)) * dirichlet_energy(X, A) / total_variance


def spectral_embedding(A: torch.Tensor, k: int = 2) -> torch.Tensor:
    """The Laplacian's eigenvectors u_2 .. u_{k+1} [n, k] (the minimisers of E_G at unit variance).

    Refused when lambda_{k+1} = lambda_{k+2}: the k-dimensional low subspace is then not unique.
    """
    lam, U = torch.linalg.eigh(laplacian(A).double())
    if k + 1 < len(lam) and math.isclose(float(lam[k]), float(lam[k + 1]), abs_tol=1e-6):
        raise ValueError(f"lambda_{k + 1} = lambda_{k + 2} = {float(lam[k]):.4f}: the graph's {k} lowest "
                         "non-trivial eigenvectors are not unique; choose another k")
    return U[:, 1:k + 1]


def pc_laplacian_alignment(X: torch.Tensor, A: torch.Tensor, k: int = 2) -> float:
    """(1/k) ||P^T U||_F^2: overlap of the top-k principal-component scores of X with the Laplacian's u_2..u_{k+1}."""
    X = X.reshape(len(X), -1).double()
    centred = X - X.mean(0)
    P = torch.linalg.svd(centred, full_matrices=False).U[:, :k]  # orthonormal PC scores, [n, k]
    U = spectral_embedding(A, k)
    return float((P.T @ U).pow(2).sum() / k)


def valid_next_mass(logits: torch.Tensor, nodes: torch.Tensor, A: torch.Tensor,
                    node_tokens: torch.Tensor) -> torch.Tensor:
    """[B, S - 1]: at each position holding a node, the probability (from `logits` [B, S, V]) of the tokens of that
    node's neighbours as the next token: the paper's accuracy. NaN at positions that hold no node.

    node_tokens [n] or [B, n]: the token of each node (per row when every walk has its own assignment).
    """
    probs = logits[:, :-1].float().softmax(-1)  # [B, S-1, V]
    tokens = node_tokens.expand(len(logits), -1) if node_tokens.ndim == 1 else node_tokens
    on_nodes = probs.gather(2, tokens[:, None, :].expand(-1, probs.shape[1], -1))  # [B, S-1, n]
    here = nodes[:, :-1]
    mass = (on_nodes * A[here.clamp(min=0)]).sum(-1)  # A[node]: the valid next nodes
    return mass.masked_fill(here < 0, float("nan"))


@torch.no_grad()
def valid_next_probability(model, input_ids: torch.Tensor, nodes: torch.Tensor, A: torch.Tensor,
                           node_tokens: torch.Tensor) -> torch.Tensor:
    """`valid_next_mass` of the model's own next-token distribution on `input_ids` [B, S]."""
    return valid_next_mass(model(input_ids=input_ids).logits, nodes, A, node_tokens)


@dataclass
class InContextRepresentations:
    """Per layer (hidden_states index) and context length: the energies, the alignment, and the accuracy."""

    lengths: list[int]
    energy: list[list[float]]  # [layer][length] E_G of the node means
    rho: list[list[float]]  # [layer][length] normalized_dirichlet_energy
    alignment: list[list[float]]  # [layer][length] pc_laplacian_alignment
    accuracy: list[float]  # [length] mean valid-next probability after t walk steps (predicting step t + 1)
    nodes_present: list[int]  # [length] how many nodes the window held


@torch.no_grad()
def in_context_representations(model, input_ids: torch.Tensor, nodes: torch.Tensor, A: torch.Tensor,
                               node_tokens: torch.Tensor, lengths, window: int = 50,
                               k: int = 2) -> InContextRepresentations:
    """Run `model` once on walks (input_ids [B, S], nodes [B, S] with -1 where no node) and read, for every
    layer and every context length t in `lengths`, the node means over the walk steps [t - window, t)."""
    model.eval()
    out = model(input_ids=input_ids, output_hidden_states=True)
    hidden = [h.float() for h in out.hidden_states]
    accuracy = valid_next_mass(out.logits, nodes, A, node_tokens)
    step = walk_steps(nodes)[:, :-1]
    energy, rho, alignment = ([[] for _ in hidden] for _ in range(3))
    acc, present_count = [], []
    for t in lengths:
        at = accuracy[step == t - 1]  # the prediction made after t walk steps
        acc.append(float(at.nanmean()))
        for layer, h in enumerate(hidden):
            X, present = node_means(h, nodes, len(A), t, window)
            sub = A[present][:, present]
            energy[layer].append(float(dirichlet_energy(X[present], sub)))
            rho[layer].append(float(normalized_dirichlet_energy(X[present], sub)))
            alignment[layer].append(pc_laplacian_alignment(X[present], sub, k) if bool(present.all()) else math.nan)
        present_count.append(int(present.sum()))
    return InContextRepresentations(list(lengths), energy, rho, alignment, acc, present_count)
