r"""T-FREE: tokenizer-free generative LLMs via sparse representations (Deiseroth et al., arXiv:2406.19223).

A subword tokenizer maps each token to one row of a large embedding matrix and one
logit of a large head, learned from a reference corpus. T-FREE drops the tokenizer:
text is split into *words*, each word into its boundary-padded character trigrams,
and every trigram is hashed into $m$ of $v$ buckets. A word is the sparse multi-hot
pattern $P_w \subset \{1..v\}$, the union of its trigrams' buckets ("hello" ->
``_he hel ell llo lo_``, about $5m$ active buckets). With $v$ far below a subword
vocabulary the embedding and head shrink (the paper: > 85% fewer parameters there).

- Embedding (Sec. 3.1): the sum of the active rows, $e_w = \sum_{i \in P_w} E_i$
  (an ``nn.EmbeddingBag`` in sum mode).
- Head and loss (Sec. 3.2): $v$ independent sigmoids $\sigma(z_i)$ trained with
  binary cross-entropy on the next word's multi-hot pattern $y$, with the positives
  up-weighted by $p$ because a pattern is sparse:
  $\mathcal{L} = -\frac{1}{v}\sum_i \big[p\, y_i \log\sigma(z_i) + (1-y_i)\log(1-\sigma(z_i))\big]$.
- Decoding (Sec. 3.2): every word $w$ of a dictionary is scored by how well its
  pattern matches the activations, and a softmax over the dictionary gives the next
  word. As in the official code's scoring,
  $s_w = \frac{1}{|P_w|}\sum_{i\in P_w}\sigma(z_i) - \frac{1}{v-|P_w|}\sum_{i\notin P_w}\sigma(z_i)$,
  $\;p(w) = \mathrm{softmax}_w(s_w)$.

Details checked against the official code (Aleph-Alpha/trigrams,
``trigram_tokenizer/tokenizer/trigram_tokenizer.py`` and ``configs/7b_fineweb_tokenizer.yaml``):
a word is padded with one space on each side and its distinct trigrams taken; each
trigram gets $m=10$ *distinct* buckets from md5 hashes (re-hashing on a clash), and
$k=2$ of the ten are taken from the *lowercased* trigram, so case variants of a word
share a fifth of their pattern; the embedding sums (``embedding_aggregation: sum``);
the loss is ``binary_cross_entropy_with_logits`` with ``pos_weight`` 300 at $v$ = 32k.

Deviations:
- Trigrams are of characters, not UTF-8 bytes (identical for ASCII text), and are
  hashed by their text, not by a byte-id table; md5 keeps it deterministic across
  processes (Python's ``hash`` is salted per process).
- The $k$ lowercase buckets are hashed from the lowercased trigram with their own salt
  and added to the $m-k$ case-sensitive ones (the official code overwrites the last
  $k$ sorted buckets); a rare clash between the two leaves a trigram with $m-1$.
- Word splitting: runs of letters are words, every other non-space character (digit,
  punctuation, underscore) is a word of its own, and whitespace is dropped. The
  official splitter also marks unexpected whitespace with special words.
- Decoding normalises by $|P_w|$, the pattern's size, where the official code uses
  $m$ times the number of trigrams (equal unless buckets clash). The official loss is
  also multiplied by a constant 100 (``loss_scale``), left out here.
- The model embeds words through a table of their patterns (`word_patterns`) built
  for the words it will see; any word can be added to the table without training.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

BOUNDARY = " "  # the official code pads each word with one space on each side
WORD = re.compile(r"[^\W\d_]+|\S")  # letter runs; any other non-space character alone


@dataclass(frozen=True)
class TFreeConfig:
    v: int = 8000  # buckets: rows of the embedding, sigmoids of the head
    m: int = 10  # buckets per trigram (official: vocab_population 10)
    k_lower: int = 2  # of the m, hashed from the lowercased trigram (official: 2)
    pos_weight: float = 300.0  # BCE weight of the active buckets (official: 300 at v = 32k)


def split_words(text: str) -> list[str]:
    """Words as T-FREE sees them: letter runs, and each digit or punctuation mark alone."""
    return WORD.findall(text)


def trigrams(word: str) -> list[str]:
    """The distinct boundary-padded character trigrams of a word, in order of appearance."""
    padded = f"{BOUNDARY}{word}{BOUNDARY}"
    return list(dict.fromkeys(padded[i:i + 3] for i in range(len(padded) - 2)))


def _distinct_buckets(text: str, salt: str, count: int, v: int) -> list[int]:
    """`count` distinct buckets in [0, v) from md5 hashes of the text; a clash is re-hashed."""
    found: list[int] = []
    for k in range(count):
        j = 0
        while True:
            bucket = int(hashlib.md5(f"{text}_{salt}{k}_{j}".encode()).hexdigest(), 16) % v
            if bucket not in found:
                found.append(bucket)
                break
            j += 1
    return found


@lru_cache(maxsize=1 << 20)
def trigram_buckets(trigram: str, v: int, m: int, k_lower: int) -> tuple[int, ...]:
    """The m buckets one trigram activates: m - k from the trigram as written, k from its lowercase."""
    if not 0 <= k_lower <= m <= v:
        raise ValueError(f"need 0 <= k_lower <= m <= v, got k_lower={k_lower}, m={m}, v={v}")
    cased = _distinct_buckets(trigram, "", m - k_lower, v)
    lower = _distinct_buckets(trigram.lower(), "lower", k_lower, v)
    return tuple(sorted(set(cased) | set(lower)))


def word_pattern(word: str, config: TFreeConfig) -> list[int]:
    """P_w: the sorted active buckets of a word, the union over its trigrams."""
    active = set()
    for t in trigrams(word):
        active.update(trigram_buckets(t, config.v, config.m, config.k_lower))
    return sorted(active)


def word_patterns(words, config: TFreeConfig) -> torch.Tensor:
    """Patterns of many words as a [W, P_max] table, padded with v (the embedding's padding row)."""
    rows = [word_pattern(w, config) for w in words]
    table = torch.full((len(rows), max(map(len, rows), default=1)), config.v, dtype=torch.long)
    for i, row in enumerate(rows):
        table[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return table


def multi_hot(patterns: torch.Tensor, v: int) -> torch.Tensor:
    """y in {0,1}^v for each row of padded patterns [..., P] -> [..., v]."""
    y = torch.zeros(*patterns.shape[:-1], v + 1, dtype=torch.float32, device=patterns.device)
    return y.scatter_(-1, patterns, 1.0)[..., :v]


def tfree_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: float) -> torch.Tensor:
    r"""Mean over buckets (and rows) of the positive-weighted BCE
    $-[p\,y\log\sigma(z) + (1-y)\log(1-\sigma(z))]$, as the official trainer computes it."""
    weight = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return nn.functional.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), pos_weight=weight)


class TrigramEmbedding(nn.Module):
    """Word ids [B, T] -> [B, T, D]: the sum of the embedding rows each word's pattern activates."""

    def __init__(self, patterns: torch.Tensor, v: int, hidden_size: int):
        super().__init__()
        self.register_buffer("patterns", patterns, persistent=False)
        # row v is the padding row: EmbeddingBag leaves it out of the sum and never trains it
        self.bag = nn.EmbeddingBag(v + 1, hidden_size, mode="sum", padding_idx=v)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        active = self.patterns[input_ids.reshape(-1)]  # [B*T, P]
        return self.bag(active).view(*input_ids.shape, -1)


class TFreeLM(nn.Module):
    """A decoder (any HF base model taking ``inputs_embeds``, e.g. ``LlamaModel``) with T-FREE's
    embedding and multi-label head. ``forward(input_ids, labels)`` takes word ids into `patterns`
    and returns ``.loss`` (BCE on the next word's pattern) and ``.logits`` [B, T, v]."""

    def __init__(self, decoder: nn.Module, patterns: torch.Tensor, config: TFreeConfig):
        super().__init__()
        hidden = decoder.config.hidden_size
        self.config = config
        self.decoder = decoder
        self.embedding = TrigramEmbedding(patterns, config.v, hidden)
        self.decoder.embed_tokens = None  # the subword table is gone; words come in through `embedding`
        self.head = nn.Linear(hidden, config.v, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        hidden = self.decoder(inputs_embeds=self.embedding(input_ids)).last_hidden_state
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            # position t predicts word t+1; positions labelled -100 are left out, as in HF
            z, nxt = logits[:, :-1], labels[:, 1:]
            keep = nxt != -100
            y = multi_hot(self.embedding.patterns[nxt[keep]], self.config.v)
            loss = tfree_loss(z[keep].float(), y, self.config.pos_weight)
        return CausalLMOutput(loss=loss, logits=logits)


def dictionary_matrix(patterns: torch.Tensor, v: int) -> torch.Tensor:
    """The dictionary's patterns as a sparse [W, v] 0/1 matrix (for `decode`)."""
    rows = torch.arange(len(patterns)).unsqueeze(1).expand_as(patterns)
    keep = patterns < v
    idx = torch.stack([rows[keep], patterns[keep]])
    return torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (len(patterns), v), check_invariants=True).coalesce()


def word_scores(logits: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    r"""$s_w$ for logits [N, v] and a sparse dictionary [W, v]: mean activation on the pattern minus
    mean activation off it. Returns [N, W]."""
    a = torch.sigmoid(logits.float())  # [N, v]
    v = a.shape[-1]
    size = torch.sparse.sum(dictionary, dim=1).to_dense()  # |P_w|
    on = torch.sparse.mm(dictionary, a.T).T  # [N, W]: sum of sigma over P_w
    off = a.sum(-1, keepdim=True) - on
    return on / size - off / (v - size)


def decode(logits: torch.Tensor, dictionary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next word by softmax over the dictionary: (argmax index [N], probabilities [N, W])."""
    p = torch.softmax(word_scores(logits, dictionary), dim=-1)
    return p.argmax(-1), p
