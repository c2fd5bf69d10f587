r"""Efficiently Learning at Test-Time: Active Fine-Tuning of LLMs (Hübotter, Bongni, Hakimi, Krause;
arXiv:2410.08020). The method is SIFT ("Selects Informative data for Fine-Tuning").

Test-time fine-tuning takes a prompt $x^\star$, retrieves a few examples from a large pool, takes one
gradient step on each with a copy of the model, and then answers (or scores) the prompt with the
fine-tuned copy. The usual retriever is nearest neighbours (NN): the $k$ pool examples with the highest
cosine similarity to the prompt. NN only looks at relevance, so a pool with near-duplicates gives it
the same information $k$ times. SIFT chooses the examples greedily so that a kernel surrogate's
*uncertainty about the prompt* falls as fast as possible. An example that repeats what has already
been chosen barely lowers that uncertainty, so SIFT selects for relevance and diversity together.

**Surrogate.** Embeddings $\phi(x) \in \mathbb R^d$ are unit-normalised, and the kernel is their inner
product, $k(x, x') = \phi(x)^\top \phi(x')$. After the examples $X_n = \{x_1, \dots, x_n\}$ have been
chosen, the posterior variance of the prompt's response under the surrogate
(a Gaussian process with noise variance $\lambda'$) is

$$ \sigma_n^2(x^\star) = k(x^\star, x^\star) - k_{X_n}(x^\star)^\top (K_{X_n} + \lambda' I_n)^{-1}
   k_{X_n}(x^\star) $$

(paper, §3), and SIFT picks $x_{n+1} = \arg\min_{x \in \mathcal D} \sigma^2_{X_n \cup \{x\}}(x^\star)$.

**Efficient update** (what this module implements). Conditioning on one more noisy observation is a
rank-one Schur-complement update of the covariance. Write $k_n(a, b)$ for the posterior covariance after
$n$ selections ($k_0 = k$). Then

$$ k_{n+1}(a, b) = k_n(a, b) - \frac{k_n(a, x_{n+1})\, k_n(x_{n+1}, b)}{k_n(x_{n+1}, x_{n+1}) + \lambda'}, $$

so adding a candidate $x$ lowers the prompt's variance by exactly

$$ \sigma_n^2(x^\star) - \sigma^2_{X_n \cup \{x\}}(x^\star) = \frac{k_n(x^\star, x)^2}{k_n(x, x) + \lambda'} . $$

The greedy step is the argmax of this gain. We never form the $N \times N$ kernel matrix: with
$\ell_m(a) = k_{m-1}(a, x_m) / \sqrt{k_{m-1}(x_m, x_m) + \lambda'}$ (the columns of an incremental
Cholesky factor of $K_{X_n} + \lambda' I$, extended to every pool point and to the prompt),
$k_n(a, b) = k(a, b) - \sum_{m \le n} \ell_m(a)\ell_m(b)$. Each step costs $O(N(d + n))$ for a pool of
$N$ examples, and we keep only $k_n(x^\star, x)$ and $k_n(x, x)$ for every candidate.

**Limit $\lambda' \to \infty$.** Then $(K + \lambda' I)^{-1} \approx I / \lambda'$, the updates vanish, and
the gain of $x$ is $\approx k(x^\star, x)^2 / \lambda'$: SIFT orders the pool by squared (absolute) cosine
similarity, i.e. it becomes NN retrieval (the paper's remark that NN is the large-$\lambda'$ limit; the
official retriever likewise pre-selects by *absolute* inner product). As $\lambda' \to 0$ an exact duplicate of a
chosen example gains $k_n(x^\star,x)^2 \lambda'/((1+\lambda')(2+\lambda')) \to 0$ relative to its first pick,
so SIFT skips redundant examples.

**Test-time fine-tuning** (paper, §4): one gradient step per selected example, in the order of selection,
with Adam, on a copy of the model; the prompt is then scored with the copy (the paper reports bits per byte
on the Pile test prompts).

Implementation notes and deviations (checked against jonhue/activeft: ``activeft/sift.py``,
``activeft/acquisition_functions/vtl.py``):
- $\lambda' = 0.01$ is the official `Retriever` default (``lambda_=0.01``, passed as noise variance); the
  official VTL conditions the covariance matrix on each pick and scores
  $k(x^\star,x^\star) - k(x^\star,x)^2/(k(x,x)+\lambda')$, the same gain as above. We do the conditioning
  through the low-rank factor instead of updating a dense matrix.
- The official code may select the same pool index twice (a second step on it). We select without
  replacement, so that "redundancy" is only ever a *duplicate in the pool*, which is what the experiment
  inserts; a re-pick of index $i$ would have the same gain as picking its exact duplicate.
- Embeddings: the paper's main runs embed with a separate pre-trained text encoder (unit-normalised,
  as in Hardt & Sun's NN baseline). `embed` here uses the fine-tuned LM's own last-layer hidden states,
  mean-pooled over the tokens and unit-normalised, so the method needs nothing but the LM.
- Learning rate: the paper uses Adam with a small lr for billion-parameter models; here it is the
  caller's choice (the experiment chooses it on an oracle control: steps on the prompt's own text).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from paperzoo.decoding import Generation, count_forward_passes, cut_at_eos, prompt_ids

PAPER_LAMBDA = 0.01  # lambda' (official Retriever default)


def _positions(model) -> int | None:
    """The longest sequence the model has positions for, or None if its config does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_length(model, length: int, name: str) -> None:
    limit = _positions(model)
    if limit is not None and length > limit:
        raise ValueError(f"{name} has {length} tokens but the model has positions for at most {limit}")


def _check_lam(lam) -> None:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam (lambda') must be a positive finite number, not {lam!r}")


# --------------------------------------------------------------------------- embeddings

@torch.no_grad()
def embed(model, ids: torch.Tensor, batch_size: int = 32, pooling: str = "mean") -> torch.Tensor:
    """Unit-normalised last-layer hidden states of token blocks: [N, T] -> [N, d].

    `pooling` is "mean" (over the tokens) or "last" (the final token's state).
    """
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"embed needs token ids of shape [N, T] with T > 0, not {tuple(ids.shape)}")
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', not {pooling!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, not {batch_size!r}")
    _check_length(model, ids.shape[1], "each sequence to embed")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        h = model(input_ids=ids[i:i + batch_size].to(device), output_hidden_states=True).hidden_states[-1].float()
        out.append(h.mean(1) if pooling == "mean" else h[:, -1])  # [b, d]
    model.train(was_training)
    return F.normalize(torch.cat(out), dim=-1).cpu()


# --------------------------------------------------------------------------- selection

def posterior_variance(phi_star: torch.Tensor, phi_X: torch.Tensor, lam: float) -> float:
    r"""$\sigma^2_X(x^\star) = k(x^\star,x^\star) - k_X^\top (K_X + \lambda I)^{-1} k_X$ by a direct solve.

    phi_star: [d]; phi_X: [n, d] (n may be 0). The reference for `sift_select`'s incremental update.
    """
    _check_lam(lam)
    if phi_star.dim() != 1 or phi_X.dim() != 2 or phi_X.shape[1] != phi_star.shape[0]:
        raise ValueError(f"need phi_star [d] and phi_X [n, d], got {tuple(phi_star.shape)} and {tuple(phi_X.shape)}")
    phi_star, phi_X = phi_star.double(), phi_X.double()
    prior = float(phi_star @ phi_star)
    if len(phi_X) == 0:
        return prior
    k_X = phi_X @ phi_star  # [n]
    K = phi_X @ phi_X.T + lam * torch.eye(len(phi_X), dtype=torch.float64)  # [n, n]
    return prior - float(k_X @ torch.linalg.solve(K, k_X))


@dataclass
class Selection:
    indices: list[int]  # pool indices in the order chosen
    variances: list[float] = field(default_factory=list)  # sigma_n^2(x*) after each pick (n = 1..k)
    prior_variance: float = 0.0  # sigma_0^2(x*) = k(x*, x*)


def sift_select(phi_star: torch.Tensor, phi: torch.Tensor, k: int, lam: float = PAPER_LAMBDA) -> Selection:
    """Greedy SIFT: k pool indices, each minimising the prompt's posterior variance given the earlier ones.

    phi_star: [d] prompt embedding; phi: [N, d] pool embeddings (both as given: normalise beforehand for
    the paper's cosine kernel). Exact ties go to the lowest index.
    """
    _check(phi_star, phi, k)
    _check_lam(lam)
    phi_star, phi = phi_star.double(), phi.double()
    c = phi @ phi_star  # [N] k_n(x*, x)
    v = (phi * phi).sum(-1)  # [N] k_n(x, x)
    var_star = float(phi_star @ phi_star)  # sigma_n^2(x*)
    L = torch.zeros(len(phi), 0, dtype=torch.float64)  # [N, n] l_m(x) for every pool point
    L_star = torch.zeros(0, dtype=torch.float64)  # [n] l_m(x*)
    chosen = torch.zeros(len(phi), dtype=torch.bool)
    out = Selection([], [], var_star)
    for _ in range(k):
        gain = c.square() / (v + lam)  # variance reduction of x* from adding x
        gain[chosen] = -math.inf
        j = int(torch.argmax(gain))
        # k_n(., x_j) for the pool and the prompt: the prior column minus the factor's contribution
        col = phi @ phi[j] - L @ L[j]  # [N]
        col_star = float(phi_star @ phi[j] - L_star @ L[j])
        scale = math.sqrt(float(v[j]) + lam)
        l_new, l_star = col / scale, col_star / scale
        c = c - l_new * l_star
        v = v - l_new.square()
        var_star -= l_star ** 2
        L = torch.cat([L, l_new[:, None]], 1)
        L_star = torch.cat([L_star, torch.tensor([l_star], dtype=torch.float64)])
        chosen[j] = True
        out.indices.append(j)
        out.variances.append(var_star)
    return out


def nearest_neighbours(phi_star: torch.Tensor, phi: torch.Tensor, k: int) -> list[int]:
    """The NN baseline: the k pool indices with the highest cosine similarity to the prompt."""
    _check(phi_star, phi, k)
    cos = F.normalize(phi.double(), dim=-1) @ F.normalize(phi_star.double(), dim=0)
    return torch.sort(-cos, stable=True).indices[:k].tolist()


def _check(phi_star: torch.Tensor, phi: torch.Tensor, k: int) -> None:
    if phi_star.dim() != 1 or phi.dim() != 2 or phi.shape[1] != phi_star.shape[0]:
        raise ValueError(f"need a prompt embedding [d] and pool embeddings [N, d], got "
                         f"{tuple(phi_star.shape)} and {tuple(phi.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(phi):
        raise ValueError(f"k must be an integer between 1 and the pool size {len(phi)}, not {k!r}")


# --------------------------------------------------------------------------- test-time fine-tuning

def sequence_nll(model, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood (nats) of one token sequence [T], in fp32."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"ids must be one sequence [T] of at least 2 tokens, not shape {tuple(ids.shape)}")
    _check_length(model, ids.numel(), "the sequence")
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
        return float(F.cross_entropy(logits, ids[1:], reduction="sum"))


@dataclass
class TestTimeFit:
    model: torch.nn.Module  # the fine-tuned copy (the original is untouched)
    nll: list[float]  # summed NLL (nats) of the target before any step, then after each step: len = k + 1
    tokens: int  # predicted positions of the target

    @property
    def loss_before(self) -> float:
        return self.nll[0] / self.tokens

    @property
    def loss_after(self) -> float:
        return self.nll[-1] / self.tokens


def test_time_finetune(model, examples: Sequence[torch.Tensor], target: torch.Tensor, lr: float,
                       optimizer: str = "adam") -> TestTimeFit:
    """One gradient step per example, in order, on a deep copy of `model`; the target's NLL after each.

    examples: token-id sequences [T_i] (each at least 2 tokens); target: [T] token ids scored before and
    after every step. optimizer: "adam" (the paper's) or "sgd".
    """
    if target.dim() != 1 or target.numel() < 2:
        raise ValueError("the target must be one sequence of at least 2 tokens")
    if any(e.dim() != 1 or e.numel() < 2 for e in examples):
        raise ValueError("every example must be one sequence of at least 2 tokens")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, not {lr!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', not {optimizer!r}")
    _check_length(model, max([target.numel(), *(e.numel() for e in examples)]), "the target or an example")
    tuned = copy.deepcopy(model)
    tuned.eval()  # no dropout: one deterministic step per example
    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    nll = [sequence_nll(tuned, target)]
    for ids in examples:
        opt.zero_grad(set_to_none=True)
        logits = tuned(input_ids=ids[None]).logits[0, :-1].float()
        F.cross_entropy(logits, ids[1:]).backward()
        opt.step()
        nll.append(sequence_nll(tuned, target))
    return TestTimeFit(tuned, nll, target.numel() - 1)


# --------------------------------------------------------------------------- the family interface

def sift_decode(model, tokenizer, prompt: str, pool: Sequence[str], k: int = 8, lam: float = PAPER_LAMBDA,
                lr: float = 1e-4, max_new_tokens: int = 64, pool_embeddings: torch.Tensor | None = None) -> Generation:
    """Select k pool texts for `prompt` with SIFT, fine-tune a copy on them (one step each), decode greedily.

    `pool_embeddings` ([N, d], from `embed`) can be passed to avoid re-embedding the pool for every prompt.
    """
    if len(pool) == 0:
        raise ValueError("pool (the fine-tuning texts) is empty")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, not {k!r}")
    _check_lam(lam)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, not {lr!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, not {max_new_tokens!r}")
    ids = prompt_ids(tokenizer, prompt)
    _check_length(model, ids.shape[1] + max_new_tokens, "the prompt plus max_new_tokens")
    pool_ids = [tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0] for t in pool]
    if any(len(x) < 2 for x in pool_ids):
        raise ValueError("every pool text must be at least 2 tokens long (one step predicts its next tokens)")
    for x in pool_ids:
        _check_length(model, len(x), "a pool text")
    if pool_embeddings is None:
        pool_embeddings = torch.cat([embed(model, x[None]) for x in pool_ids])
    elif pool_embeddings.dim() != 2 or pool_embeddings.shape[0] != len(pool):
        raise ValueError(f"pool_embeddings must be [len(pool) = {len(pool)}, d], not {tuple(pool_embeddings.shape)}")
    start = time.perf_counter()
    chosen = sift_select(embed(model, ids)[0], pool_embeddings, min(k, len(pool)), lam)
    fit = test_time_finetune(model, [pool_ids[i] for i in chosen.indices], ids[0], lr) if ids.shape[1] > 1 else None
    tuned = fit.model if fit is not None else model
    eos = tokenizer.eos_token_id
    with count_forward_passes(tuned) as passes, torch.no_grad():
        out = tuned.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    tokens = cut_at_eos(out[0, ids.shape[1]:].tolist(), eos)
    return Generation(tokens, tokenizer.decode(tokens), passes.count, time.perf_counter() - start,
                      {"selected": chosen.indices, "fine_tune_steps": len(chosen.indices), "posterior_variances": chosen.variances,
                       "prompt_loss_before": fit.loss_before if fit else None,
                       "prompt_loss_after": fit.loss_after if fit else None})
