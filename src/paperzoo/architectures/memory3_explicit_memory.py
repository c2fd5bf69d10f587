"""Memory3: Language Modeling with Explicit Memory (Yang et al., arXiv:2407.01178).

Explicit memory is a third store of knowledge beside the weights (implicit memory) and
the context key-values (working memory). Every reference of a knowledge base (a short
text) is *written* once, by one forward pass of the model itself, into the attention
keys and values it produces in the memory layers; only a few tokens per head are kept.
While the model reads a text, it retrieves the references most similar to the current
chunk and its memory layers attend to their stored key-values as if those tokens stood
before the text. Reading a memory costs a handful of attended positions, fewer than the
raw reference would cost in a RAG prompt, and the paper reports that its 2.4B Memory3
beats larger LMs and RAG models while decoding faster than RAG (abstract; Sec. 1, Sec. 7).

Writing (sparsification). A reference r of n <= 128 tokens is run through the model;
in a memory layer l, head h receives the attention matrix A^{l,h} (causal, n x n) and
keeps the tokens that receive the most attention,

.. math::

    s^{l,h}_j = \\sum_{i \\ge j} A^{l,h}_{ij}, \\qquad
    \\mathcal{K}^{l,h}_r = \\mathrm{top}_{8}(s^{l,h}),
    \\qquad M^{l,h}_r = \\big(K^{l,h}_{\\mathcal{K}}, V^{l,h}_{\\mathcal{K}}\\big),

with a key-value head's score summed over the query heads that share it (grouped-query
attention). Keys are stored after the rotary embedding; the reference is encoded at
positions -n..-1, so that it sits immediately before a text whose positions start at 0.

Reading. For a chunk of text, the m = 5 references whose embeddings are nearest the
chunk's (cosine) are retrieved and, in every memory layer, their memories are prepended
to the chunk's own key-values; every token attends to every memory token,

.. math::

    \\mathrm{Attn}(q_t) = \\mathrm{softmax}\\Big(\\frac{q_t [K_{mem}; K_{\\le t}]^\\top}{\\sqrt{d}}\\Big)
    [V_{mem}; V_{\\le t}], \\qquad K_{mem} = [M_{r_1}; \\dots; M_{r_m}].

Retrieval is refreshed every 64 tokens (`generate`): the new memories serve the
tokens that follow, while earlier tokens keep the key-values they were computed with.
The reading is `memory3_attention`, a function registered in transformers' attention
registry (`paperzoo.core.blocks.swap(model, "attention_fn", memory3_attention)`), so any
HF causal LM that calls its attention through that registry gains explicit memory; the
memory is attached per attention module (`attached`), and with none attached the
function is HF's eager attention, step for step, so memory off gives the base logits.

Two-stage training (the paper's Sec. 5): a warm-up without memory, then continual training
with each training row reading the memories of the references retrieved for it
(`train_with_memory`); memories are re-written by the current weights every few steps,
without gradient through the writing.

Compression: `quantize` replaces every stored key and value vector by its k-means centroid
(scikit-learn), per layer, a stand-in for the paper's vector quantisation of memories.

Constants. Confirmed by source: references of at most 128 tokens, 5 references per
retrieval, retrieval every 64 tokens, and the claim (abstract: "better performance than
much larger LLMs as well as RAG models, and maintains higher decoding speed than RAG") --
the three numbers from a third-party re-implementation found with the code search
(``memory_length=128``, ``num_memory_chunks=5``, ``memory_update_interval=64``), not from
official code, which was not found (no IAAR-Shanghai/Memory3 repository in the index).
Not confirmed against a primary source (taken from the issue and the review): 8 tokens kept per head,
"most attended" as the attention received summed over the reference's queries (the
accumulated-attention score of heavy-hitter methods; the paper may normalise it
differently), and which layers are memory layers (the paper's model uses a part of them; here a
parameter, default every layer).

Deviations from the paper:

- Retrieval embedding: any function of the token ids (`retrieve` takes embeddings); the
  module offers the mean final hidden state of a (frozen) model (`mean_hidden_state`), and
  the experiment uses a bag-of-tokens vector, where the paper uses a separate embedding
  model (BGE-M3) and a FAISS index; retrieval here is exact cosine top-m.
- References do not see each other: each is encoded alone, all at positions -n..-1 (the
  issue's choice; how the paper places memory positions was not confirmed).
- No gradient through writing (memories are detached); the paper's filtering of references
  that overlap the training chunk is not needed on the synthetic task and not implemented.
- `train_with_memory` takes rows no longer than one retrieval chunk (one retrieval per row);
  per-chunk memories inside one long training row are not implemented (`generate` does
  refresh them every chunk at inference).
- Quantisation is plain k-means over whole vectors, not the paper's product quantisation.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from paperzoo.core.models import decoder_layers


@dataclass(frozen=True)
class Memory3Config:
    memory_layers: tuple[int, ...] | None = None  # None: every layer reads (and stores) memory
    tokens_per_head: int = 8  # tokens kept per key-value head per reference (the paper's 8)
    references: int = 5  # references retrieved per chunk (the paper's 5)
    chunk: int = 64  # retrieval is refreshed every `chunk` tokens (the paper's 64)
    reference_length: int = 128  # longest reference (the paper's 128)

    def layers(self, model: nn.Module) -> list[int]:
        n = len(decoder_layers(model)[1])
        return list(range(n)) if self.memory_layers is None else list(self.memory_layers)


@dataclass
class Reading:
    """Memory key-values for one attention module: keys, values [B, H_kv, M, d]."""

    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class Recording:
    """Filled by an encoding pass: the module's keys, values [B, H_kv, n, d] and attention [B, H, n, n]."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    attention: torch.Tensor | None = None


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, d] -> [B, H_kv * groups, S, d], each key-value head serving its query group (HF's repeat_kv)."""
    if groups == 1:
        return x
    B, H, S, d = x.shape
    return x[:, :, None].expand(B, H, groups, S, d).reshape(B, H * groups, S, d)


def memory3_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention that prepends the memory attached to `module` (if any) to its keys and values.

    query [B, H, T, d]; key, value [B, H_kv, S, d]; attention_mask additive [B, 1, T, S] (swap
    registers an explicit mask). Returns ([B, T, H, d], attention weights [B, H, T, M + S]).
    """
    memory = getattr(module, "explicit_memory", None)
    groups = query.shape[1] // key.shape[1]
    if isinstance(memory, Reading):
        if memory.keys.shape[0] != query.shape[0]:
            raise ValueError(f"memory for {memory.keys.shape[0]} rows attached to a batch of {query.shape[0]}")
        key = torch.cat([memory.keys.to(key.dtype), key], dim=2)  # [K_mem; K_text]
        value = torch.cat([memory.values.to(value.dtype), value], dim=2)
        if attention_mask is not None:  # every text token may attend to every memory token
            open_ = attention_mask.new_zeros(*attention_mask.shape[:-1], memory.keys.shape[2])
            attention_mask = torch.cat([open_, attention_mask], dim=-1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, _repeat_heads(key, groups).transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if isinstance(memory, Recording):
        memory.keys, memory.values, memory.attention = key, value, weights
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, _repeat_heads(value, groups))
    return out.transpose(1, 2).contiguous(), weights


def install(model: nn.Module) -> nn.Module:
    """Make `memory3_attention` the model's attention (in place); with no memory attached it is eager attention."""
    from paperzoo.core.blocks import swap

    return swap(model, "attention_fn", memory3_attention)


def _attention_modules(model: nn.Module, layers: Sequence[int]) -> list[nn.Module]:
    _, blocks = decoder_layers(model)
    return [blocks[i].self_attn for i in layers]


@contextlib.contextmanager
def _set(modules: Sequence[nn.Module], states: Sequence):
    for m, s in zip(modules, states):
        m.explicit_memory = s
    try:
        yield states
    finally:
        for m in modules:
            m.explicit_memory = None


@dataclass
class MemoryBank:
    """Written memories of N references, per memory layer l: keys, values [N, H_kv, k, d] and the kept token
    indices [N, H_kv, k]; and each reference's unit-norm retrieval embedding [N, E]."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    kept: dict[int, torch.Tensor]
    embeddings: torch.Tensor | None = None

    def __len__(self) -> int:
        return next(iter(self.keys.values())).shape[0]

    def tokens_per_layer(self, references: int) -> int:
        """Memory positions each head of a memory layer attends to when `references` are attached."""
        return references * next(iter(self.keys.values())).shape[2]


def most_attended(attention: torch.Tensor, kv_heads: int, k: int) -> torch.Tensor:
    """Indices [B, H_kv, k] of the k tokens receiving the most attention, s_j = sum_i A_ij per key-value head.

    attention [B, H, n, n] (rows: queries). Query heads sharing a key-value head add their scores.
    """
    B, H, n, _ = attention.shape
    received = attention.float().sum(dim=-2)  # s_j: attention token j receives over the reference's queries
    received = received.view(B, kv_heads, H // kv_heads, n).sum(dim=2)
    return received.topk(min(k, n), dim=-1).indices.sort(dim=-1).values  # kept in text order


@torch.no_grad()
def write_memories(model: nn.Module, references: torch.Tensor, config: Memory3Config) -> MemoryBank:
    """One forward pass per reference (rows of `references` [N, n], n <= reference_length, one length):
    the top `tokens_per_head` key-values of every head of every memory layer."""
    N, n = references.shape
    if n > config.reference_length:
        raise ValueError(f"references of {n} tokens exceed reference_length={config.reference_length}")
    layers = config.layers(model)
    modules = _attention_modules(model, layers)
    was_training = model.training
    model.eval()
    with _set(modules, [Recording() for _ in modules]) as records:
        # positions -n..-1: the reference ends right before a text that starts at position 0
        model(input_ids=references, position_ids=torch.arange(-n, 0).expand(N, n))
    model.train(was_training)
    keys, values, kept = {}, {}, {}
    for layer, record in zip(layers, records):
        idx = most_attended(record.attention, record.keys.shape[1], config.tokens_per_head)
        gather = idx[..., None].expand(*idx.shape, record.keys.shape[-1])
        keys[layer], values[layer] = record.keys.gather(2, gather), record.values.gather(2, gather)
        kept[layer] = idx
    return MemoryBank(keys, values, kept)


@torch.no_grad()
def mean_hidden_state(model: nn.Module, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Unit-norm mean of the final hidden state over each row of `ids` [N, n]: the retrieval embedding [N, D]."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(ids), chunk):
        h = model(input_ids=ids[i:i + chunk], output_hidden_states=True).hidden_states[-1]
        out.append(F.normalize(h.float().mean(dim=1), dim=-1))
    model.train(was_training)
    return torch.cat(out)


def retrieve(bank_embeddings: torch.Tensor, queries: torch.Tensor, m: int) -> torch.Tensor:
    """Indices [B, m] of the m references with the largest cosine similarity to each query embedding [B, E]."""
    similarity = F.normalize(queries, dim=-1) @ F.normalize(bank_embeddings, dim=-1).T
    return similarity.topk(min(m, bank_embeddings.shape[0]), dim=-1).indices


def attached(model: nn.Module, bank: MemoryBank, index: torch.Tensor):
    """Context: the memories of references `index` [B, m] attached to every memory layer, row by row."""
    layers = sorted(bank.keys)
    states = []
    for layer in layers:
        K, V = bank.keys[layer][index], bank.values[layer][index]  # [B, m, H_kv, k, d]
        states.append(Reading(K.transpose(1, 2).flatten(2, 3), V.transpose(1, 2).flatten(2, 3)))  # [B, H_kv, m k, d]
    return _set(_attention_modules(model, layers), states)


@torch.no_grad()
def generate(model: nn.Module, bank: MemoryBank, prompt: torch.Tensor, max_new_tokens: int,
             config: Memory3Config, embed: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Greedy decoding with explicit memory, re-retrieved from the last `chunk` tokens every `chunk` tokens.

    prompt [B, T]. Returns the tokens [B, T + max_new_tokens] and statistics: the references
    retrieved at each refresh and the key-value positions each generated token attended to
    per memory layer (its context plus the attached memory).
    """
    model.eval()
    ids, cache, stats = prompt, None, {"retrieved": [], "attended_positions": []}
    pending = ids  # tokens not yet run through the model
    for step in range(max_new_tokens):
        if step % config.chunk == 0:  # refresh: the new memories serve the tokens from here on
            index = retrieve(bank.embeddings, embed(ids[:, -config.chunk:]), config.references)
            stats["retrieved"].append(index)
        with attached(model, bank, index):
            out = model(input_ids=pending, cache=cache, use_cache=True)
        cache = out.past_key_values
        stats["attended_positions"].append(ids.shape[1] + bank.tokens_per_layer(index.shape[1]))
        pending = out.logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, pending], dim=1)
    return ids, stats


def train_with_memory(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, retrieved: torch.Tensor,
                      references: torch.Tensor, config: Memory3Config, steps: int, batch_size: int, lr: float,
                      warmup_steps: int = 0, rewrite_every: int = 50, seed: int = 0) -> dict:
    """Stage two: train `model` (in place) on rows `tokens` [N, T] (T <= chunk) with their memories attached.

    `retrieved` [N, m] names each row's references (rows of `references`); the memory bank is
    re-written by the current weights every `rewrite_every` steps, without gradient.
    AdamW and a cosine schedule with warm-up, as `paperzoo.core.training.train`.
    """
    if tokens.shape[1] > config.chunk:
        raise ValueError(f"rows of {tokens.shape[1]} tokens exceed one retrieval chunk ({config.chunk})")
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    generator = torch.Generator().manual_seed(seed)
    history, start, bank = {"train_loss": []}, time.perf_counter(), None
    for step in range(steps):
        if step % rewrite_every == 0:
            bank = write_memories(model, references, config)
        model.train()
        rows = torch.randint(len(tokens), (batch_size,), generator=generator)
        with attached(model, bank, retrieved[rows]):
            loss = model(input_ids=tokens[rows], labels=labels[rows]).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history["train_loss"].append(loss.item())
    model.eval()
    history["seconds"] = time.perf_counter() - start
    return history


def quantize(bank: MemoryBank, clusters: int, seed: int = 0) -> tuple[MemoryBank, dict]:
    """Every stored key and value vector replaced by its k-means centroid (per layer, keys and values apart).

    Returns the quantised bank and, per layer, the relative error ||x - c(x)|| / ||x|| of keys and values.
    Storage falls from d floats to one index per vector (plus the codebook).
    """
    from sklearn.cluster import KMeans

    def snap(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).double().numpy()
        km = KMeans(n_clusters=min(clusters, len(flat)), n_init=1, random_state=seed).fit(flat)
        return torch.from_numpy(km.cluster_centers_[km.labels_]).to(x.dtype).view_as(x)

    keys = {l: snap(k) for l, k in bank.keys.items()}
    values = {l: snap(v) for l, v in bank.values.items()}
    error = {l: {"keys": float((keys[l] - bank.keys[l]).norm() / bank.keys[l].norm()),
                 "values": float((values[l] - bank.values[l]).norm() / bank.values[l].norm())} for l in keys}
    return MemoryBank(keys, values, bank.kept, bank.embeddings), error
