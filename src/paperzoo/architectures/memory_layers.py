"""Memory Layers at Scale (Berges, Oguz et al., arXiv:2412.09764): a product-key memory as the feed-forward block.

A memory layer is a key-value look-up whose keys and values are trainable parameters.
A query q(x) is scored against N keys, only the k best are read, and their values are
mixed by a softmax of the scores. The paper replaces the FFN of a few layers of a dense
transformer with such a layer ("Memory+"), so a model gains millions of parameters for
the price of k value reads per token, and reports that it beats dense models with more
than twice the compute, and mixture-of-experts models at equal compute and parameters,
most on factual question answering (Sec. 4, Tables 1-2).

Product keys (Lample et al. 2019; the paper's Sec. 3.1). Scoring all N keys costs N d
per query; product keys make it 2 sqrt(N) d/2. The query is split in halves
q = [q^{(1)}; q^{(2)}] and two sets of sqrt(N) half-keys K^{(1)}, K^{(2)} define the N
full keys k_{ij} = [K^{(1)}_i; K^{(2)}_j] (slot index i sqrt(N) + j), so that

.. math::

    \\langle q, k_{ij} \\rangle = \\langle q^{(1)}, K^{(1)}_i \\rangle + \\langle q^{(2)}, K^{(2)}_j \\rangle.

The top k of all N sums lie among the k^2 pairs of each half's own top k (a pair with
i outside the top k of the first half is beaten by k pairs (i', j) with the same j), so

.. math::

    I = \\mathcal{T}_k\\big(\\{s^{(1)}_i + s^{(2)}_j : i \\in \\mathcal{T}_k(s^{(1)}), j \\in \\mathcal{T}_k(s^{(2)})\\}\\big),
    \\quad w = \\mathrm{softmax}(s_I), \\quad y = \\sum_{i \\in I} w_i V_i,

and the read y is a weighted ``nn.EmbeddingBag`` (mode "sum") over the value table V
[N, D]. Several query heads each pick their own k slots (with their own keys) from the
same values, and their reads are summed (the official code's ``mem_heads``).

Memory+ (the paper's Sec. 3.3, eq. for "swilu"): the read is gated by the input and
projected,

.. math::

    \\mathrm{output} = \\big(y \\odot \\mathrm{SiLU}(x^\\top W_1)\\big)^\\top W_2,

which is where the official code (facebookresearch/memory, ``HashingMemory.forward``:
``value_proj(output * silu(swilu_projection(input)))``) puts the gate: on the memory
read y, not on x. The query is a linear map of x with a bias and no normalisation
(the released ``QueryMLP`` without batch norm); `MemoryConfig.qk_norm` adds an RMS
normalisation of queries and half-keys, off by default (see deviations).

Shared pool (Sec. 3.3, "shared memory"): every memory layer of a model reads one value
table; each layer keeps its own query map, keys and W_1, W_2. `memory_ffn` returns a
factory for `paperzoo.core.blocks.swap(model, "ffn", ...)` whose layers share one table.

Parallel memory (Sec. 3.2). The look-up is simulated as the review describes it: the
slots are split over `shards` devices (shard s holds the rows i of K^{(1)} in its block,
with every j), each computes its own top k, and the S k candidates are merged by one
global top k. This is exact: each global winner is among its own shard's top k.

Deviations from the paper and its code:

- The official code shards the *value table by columns* (``ColwiseEmbeddingBag``: every
  device holds all N slots for a slice of the D embedding dimensions, with the index
  search replicated); the slot-sharded top-k merge here is the review's description and
  gives the same indices and output. Sharding is simulated on one device.
- Value learning rate: the official code trains the values with their own fixed rate
  (``value_fixed_lr`` 0.001); here every parameter shares the training loop's rate,
  since paperzoo's loop has one rate.
- Initialisation follows the official ``reset_parameters`` (keys uniform in
  +-k_dim^{-1/2}, values and W_1, W_2 normal with std D^{-1/2}, query Xavier-uniform).
- qk-norm: the paper discusses normalising queries and keys for stability at scale;
  the released memory layer has none, and I could not check the paper's exact wording
  here, so it is an option (`qk_norm`), off by default, not the reproduced default.
- No custom CUDA kernels, no gating scalar (``mem_gated``), no PEER variant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class MemoryConfig:
    """A product-key memory: N = `n_keys`^2 slots, `k` read per head, `heads` query heads, keys of `k_dim`."""

    n_keys: int = 32  # sqrt(N): half-keys per side and head
    k: int = 8  # slots read per head (the paper's k; 32 in the official default)
    heads: int = 2  # query heads summed into one read (4 in the official default)
    k_dim: int = 64  # query and full-key dimension; each half has k_dim / 2
    shards: int = 1  # simulated memory-parallel devices the slots are split over
    qk_norm: bool = False  # RMS-normalise queries and half-keys before scoring (not in the released code)

    def __post_init__(self):
        if self.k_dim % 2:
            raise ValueError(f"k_dim must be even (two halves), not {self.k_dim}")
        if not 1 <= self.k <= self.n_keys:
            raise ValueError(f"k must be in [1, n_keys={self.n_keys}], not {self.k}")
        if self.n_keys % self.shards:
            raise ValueError(f"shards ({self.shards}) must divide n_keys ({self.n_keys})")

    @property
    def slots(self) -> int:
        return self.n_keys ** 2


def product_key_topk(q: torch.Tensor, K1: torch.Tensor, K2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of <q, [K1_i; K2_j]> over every pair (i, j), per head: (scores, slot indices i * len(K2) + j).

    q [..., H, k_dim]; K1 [H, n1, k_dim/2]; K2 [H, n2, k_dim/2]. Returns [..., H, k] each,
    scores sorted high to low. Only the k^2 pairs of each half's own top k are summed.
    """
    q1, q2 = q.chunk(2, dim=-1)
    s1, i1 = torch.einsum("...hd,hnd->...hn", q1, K1).topk(min(k, K1.shape[1]), dim=-1)  # s^(1): [..., H, k1]
    s2, i2 = torch.einsum("...hd,hnd->...hn", q2, K2).topk(min(k, K2.shape[1]), dim=-1)  # s^(2): [..., H, k2]
    sums = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # s^(1)_i + s^(2)_j over the k1 x k2 pairs
    slots = (i1[..., :, None] * K2.shape[1] + i2[..., None, :]).flatten(-2)
    scores, best = sums.topk(k, dim=-1)
    return scores, slots.gather(-1, best)


def sharded_topk(q: torch.Tensor, K1: torch.Tensor, K2: torch.Tensor, k: int, shards: int):
    """`product_key_topk` with the slots split over `shards` devices: a top k per shard, then one global top k.

    Shard s holds the half-keys K1 rows [s n1/S, (s+1) n1/S) and all of K2, i.e. a contiguous
    block of slot indices; its local indices are offset into the global numbering before the merge.
    """
    rows = K1.shape[1] // shards
    scores, slots = [], []
    for s in range(shards):
        local_scores, local_slots = product_key_topk(q, K1[:, s * rows:(s + 1) * rows], K2, k)
        scores.append(local_scores)
        slots.append(local_slots + s * rows * K2.shape[1])
    scores, slots = torch.cat(scores, dim=-1), torch.cat(slots, dim=-1)  # S k candidates per head
    merged, best = scores.topk(k, dim=-1)
    return merged, slots.gather(-1, best)


def value_pool(config: MemoryConfig, hidden_size: int) -> nn.EmbeddingBag:
    """The value table V [N, D], read as a softmax-weighted sum of k rows per head."""
    values = nn.EmbeddingBag(config.slots, hidden_size, mode="sum")
    nn.init.normal_(values.weight, std=hidden_size ** -0.5)
    return values


class ProductKeyMemory(nn.Module):
    """Memory+ as an FFN: [B, T, D] -> [B, T, D], reading the (possibly shared) value table `values`."""

    def __init__(self, hidden_size: int, config: MemoryConfig, values: nn.EmbeddingBag | None = None):
        super().__init__()
        D, H = hidden_size, config.heads
        self.config = config
        self.query = nn.Linear(D, H * config.k_dim)  # q(x), one query per head
        nn.init.xavier_uniform_(self.query.weight)
        bound = config.k_dim ** -0.5
        self.keys = nn.Parameter(torch.empty(H, 2, config.n_keys, config.k_dim // 2).uniform_(-bound, bound))
        self.values = values if values is not None else value_pool(config, D)
        self.W1 = nn.Linear(D, D)  # the SiLU gate's projection ("swilu_projection")
        self.W2 = nn.Linear(D, D)  # the output projection ("value_proj")
        nn.init.normal_(self.W1.weight, std=D ** -0.5)
        nn.init.normal_(self.W2.weight, std=D ** -0.5)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and slot indices of the k best keys per head: [..., H, k] each."""
        c = self.config
        q = self.query(x).unflatten(-1, (c.heads, c.k_dim))  # [..., H, k_dim]
        K1, K2 = self.keys[:, 0], self.keys[:, 1]
        if c.qk_norm:
            q, K1, K2 = F.rms_norm(q, (c.k_dim,)), F.rms_norm(K1, (c.k_dim // 2,)), F.rms_norm(K2, (c.k_dim // 2,))
        if c.shards > 1:
            return sharded_topk(q, K1, K2, c.k, c.shards)
        return product_key_topk(q, K1, K2, c.k)

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """y = sum over heads and the k chosen slots of softmax(s_I)_i V_i: [..., D]."""
        scores, slots = self.lookup(x)
        w = F.softmax(scores.float(), dim=-1)  # w = softmax(s_I), per head
        flat = slots.flatten(-2).reshape(-1, self.config.heads * self.config.k)  # one bag of H k slots per token
        y = self.values(flat, per_sample_weights=w.flatten(-2).reshape(flat.shape).to(self.values.weight.dtype))
        return y.view(*x.shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.read(x)
        return self.W2(y.to(x.dtype) * F.silu(self.W1(x)))  # (y ⊙ SiLU(x W_1)) W_2


def memory_ffn(config: MemoryConfig) -> Callable[[object, int], ProductKeyMemory]:
    """A factory for ``swap(model, "ffn", memory_ffn(config), layers=[...])``: one shared value pool per call.

    Call it once per model: every memory layer the factory builds reads the same table
    (the paper's shared memory), created at the first layer with the model's hidden size.
    """
    pool: list[nn.EmbeddingBag] = []

    def factory(model_config, layer_idx: int) -> ProductKeyMemory:
        if not pool:
            pool.append(value_pool(config, model_config.hidden_size))
        return ProductKeyMemory(model_config.hidden_size, config, pool[0])

    return factory


def memory_read_flops(config: MemoryConfig, hidden_size: int) -> int:
    """Training FLOPs per token of the weighted value read (forward and backward: 3 x 2 H k D).

    torch's FLOP counter counts matrix products only; the EmbeddingBag gather-and-sum is
    not one, so budgets add this analytic count (the key scoring and projections are counted).
    """
    return 3 * 2 * config.heads * config.k * hidden_size
