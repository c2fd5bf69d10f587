r"""Byte Latent Transformer: patches scale better than tokens (Pagnoni et al., arXiv:2412.09871).

A tokenizer fixes, once and for all, how many bytes each step of the large model
covers. BLT drops it: the model reads raw bytes, groups them into *patches* whose
boundaries a small byte-level LM places where the next byte is hard to predict, and
runs its large transformer over patches only. Predictable stretches become long
patches, so the expensive model takes fewer steps per byte (Sec. 2, 3).

- Entropy patching (Sec. 2.3). A small causal byte LM $p_e$ gives each byte's entropy
  $H(x_i) = -\sum_{v \in \mathcal{V}} p_e(x_i = v \mid x_{<i}) \log p_e(x_i = v \mid x_{<i})$
  (nats, as in the official ``patcher.entropy``). A new patch starts at byte $i$ when
  $H(x_i) > \theta_g$ (global constraint) or, under the approximate monotonic
  constraint, $H(x_i) - H(x_{i-1}) > \theta_r$. Fixed-stride patching (Sec. 2.1) starts
  a patch every $k$ bytes. Both decide byte $i$'s boundary from $x_{<i}$ only.
- Hash n-gram embeddings (Sec. 3.2.1). Byte $i$ enters as
  $e_i = x_i + \sum_{n=3}^{8} E^{hash}_n\big(\mathrm{Hash}(g_{i,n})\big)$, with
  $g_{i,n} = \{b_{i-n+1}, \dots, b_i\}$ and
  $\mathrm{Hash}(g) = \mathrm{RollPolyHash}(g) \bmod |E^{hash}_n|$,
  $\mathrm{RollPolyHash}(g) = \sum_{j} b_j\, a^{j}$.
- Local encoder (Sec. 3.2). Causal byte-level transformer layers over $e$, then
  encoder cross-attention: each patch's query is the max-pool of its own bytes' states,
  and it attends (keys and values: byte states) to *its own bytes only*.
- Latent global transformer (Sec. 3.1): a causal decoder over the patch sequence.
- Local decoder (Sec. 3.3): byte states (the encoder's) are queries and the latent
  patch states keys and values, then causal byte layers and a 256-way head. The byte
  at position $t$ predicts $x_{t+1}$ and may read only patches strictly *earlier* than
  the patch of $x_{t+1}$, i.e. patches that have ended by byte $t$ (the official code's
  decoder patch ids, ``decoder_patch_ids_from_lengths``). Whether byte $t+1$ opens a new
  patch is decided from $H(x_{t+1})$, a function of $x_{\le t}$, so this never lets a
  later byte in: changing $x_{t+1}, x_{t+2}, \dots$ leaves every logit up to $t$ alone.

Details checked against the official code (facebookresearch/blt:
``bytelatent/data/patcher.py``, ``bytelatent/model/blt.py``, ``local_models.py``):
entropies in nats; boundaries taken from the entropy of each position's *next*-byte
prediction; hash n-grams of the current and previous bytes with a zero-padded start,
summed into the byte embedding without normalisation, every table initialised with
standard deviation $d^{-1/2}$; encoder cross-attention after the
last encoder layer with pooled patch queries; decoder cross-attention before the first
decoder layer, on the encoder's byte states.

Deviations:
- Each byte (at position $t$) cross-attends to *all* patches that have ended by $t$; the
  official decoder mask lets it see only the latest one (the global transformer has
  already folded the earlier ones in). Bytes before the first patch ends see none: their
  cross-attention output is zero and the residual carries their own state. The official
  code instead forces a one-byte first patch.
- The hash is a polynomial in $a = 257$ reduced modulo the prime $2^{31}-1$ at every
  step (exact int64 arithmetic, identical on every machine), with bytes shifted by one so
  the zero padding before the text differs from byte 0. The official code multiplies by
  large primes and lets int64 wrap. One hash function per $n$ (the official configs can
  sum several).
- Byte and patch layers are transformers' Llama layers (RMSNorm, RoPE, SwiGLU) fed with
  ``inputs_embeds``; there is no BOS/BOE byte, and the entropy model runs on the same
  row as the BLT (no sliding window, no reset at newlines).
- `inference_flops_per_byte` is an analytic count of the matrix products of one forward
  pass over a row of bytes, dense as executed (masked entries of attention counted);
  embeddings, norms and elementwise work are not counted. The entropy model's own FLOPs
  are counted separately (`token_lm_flops_per_token` with vocabulary 256): patching can be done once, as data
  pre-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaModel
from transformers.modeling_outputs import CausalLMOutput

BYTES = 256
NGRAM_SIZES = (3, 4, 5, 6, 7, 8)  # the paper's n = 3..8
HASH_BASE = 257  # a in RollPolyHash: larger than any shifted byte, so short n-grams never collide in the polynomial
HASH_MODULUS = 2**31 - 1  # a prime; products stay below 2^62, exact in int64


@dataclass(frozen=True)
class BLTConfig:
    d_local: int = 32  # width of the byte-level encoder and decoder
    d_global: int = 128  # width of the latent transformer over patches
    encoder_layers: int = 1
    decoder_layers: int = 2
    global_layers: int = 2
    local_heads: int = 2
    global_heads: int = 2
    cross_heads: int = 2
    mlp_ratio: int = 4
    ngram_sizes: tuple[int, ...] = NGRAM_SIZES
    hash_buckets: int = 4096  # rows of each E^hash_n
    max_bytes: int = 1024  # longest row the rotary positions are set up for


# ---------------------------------------------------------------------------------------------
# Patching: where a patch starts


def entropies(logits: torch.Tensor) -> torch.Tensor:
    r"""$H = -\sum_v p_v \log p_v$ (nats) of each next-byte distribution: logits [..., V] -> [...]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_patch_starts(H: torch.Tensor, theta: float, rule: str = "global") -> torch.Tensor:
    r"""Patch starts [B, n] (bool) from byte entropies H [B, n], H[:, i] = $H(x_i)$.

    ``global``: byte $i$ starts a patch when $H(x_i) > \theta_g$; ``monotonic``: when
    $H(x_i) - H(x_{i-1}) > \theta_r$. Byte 0 always starts the first patch.
    """
    if rule == "global":
        starts = H > theta
    elif rule == "monotonic":
        starts = torch.zeros_like(H, dtype=torch.bool)
        starts[:, 1:] = H[:, 1:] - H[:, :-1] > theta
    else:
        raise ValueError(f"rule must be 'global' or 'monotonic', not {rule!r}")
    starts[:, 0] = True
    return starts


def stride_patch_starts(batch: int, n: int, k: int) -> torch.Tensor:
    """Fixed-stride patching: a patch starts every k bytes. [batch, n] bool."""
    return (torch.arange(n) % k == 0).expand(batch, n).clone()


class StridePatcher:
    """Byte ids [B, T] -> patch starts [B, T + 1] for bytes 0..T (the last: would a byte after the row start one)."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return stride_patch_starts(input_ids.shape[0], input_ids.shape[1] + 1, self.k).to(input_ids.device)


class EntropyPatcher:
    """Entropy patching with a frozen causal byte LM (any module whose ``(input_ids).logits`` is [B, T, 256]).

    Its next-byte distribution at position t gives $H(x_{t+1})$, so a row of T bytes
    yields boundaries for bytes 1..T; $H(x_0)$, before any byte is seen, is taken as the
    uniform distribution's $\\log 256$. Not an ``nn.Module``: the BLT that holds it
    neither trains nor counts the entropy model's weights.
    """

    def __init__(self, byte_lm: nn.Module, theta: float, rule: str = "global"):
        self.byte_lm, self.theta, self.rule = byte_lm, theta, rule

    @torch.no_grad()
    def byte_entropies(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T + 1]: H(x_0) .. H(x_T)."""
        was_training = self.byte_lm.training
        self.byte_lm.eval()
        H_next = entropies(self.byte_lm(input_ids=input_ids).logits)  # [B, T]: H(x_1) .. H(x_T)
        self.byte_lm.train(was_training)
        first = torch.full_like(H_next[:, :1], math.log(BYTES))
        return torch.cat([first, H_next], dim=1)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return entropy_patch_starts(self.byte_entropies(input_ids), self.theta, self.rule)


def patch_ids(starts: torch.Tensor) -> torch.Tensor:
    """Index of each byte's patch: starts [B, n] -> [B, n] long (0 for the first patch)."""
    return starts.long().cumsum(1) - 1


def encoder_cross_mask(starts: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, P, T]: patch p's query may attend byte t iff t belongs to p. `starts` is [B, T + 1] (the last ignored)."""
    pid = patch_ids(starts[:, :-1])
    return pid[:, None, :] == torch.arange(num_patches, device=starts.device)[None, :, None]


def decoder_cross_mask(starts: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, T, P]: byte t (predicting byte t+1) may attend patch p iff p has ended by t, i.e. p < patch(t + 1).

    `starts` [B, T + 1] covers bytes 0..T; patch(t + 1) counts the starts up to t + 1.
    """
    ended = patch_ids(starts)[:, 1:]  # patch of byte t+1 = number of patches ended by t
    return torch.arange(num_patches, device=starts.device)[None, None, :] < ended[:, :, None]


# ---------------------------------------------------------------------------------------------
# Hash n-gram embeddings


def ngram_hashes(input_ids: torch.Tensor, n: int, buckets: int) -> torch.Tensor:
    r"""$\mathrm{RollPolyHash}(g_{i,n}) \bmod$ buckets for every byte i: ids [B, T] -> [B, T] long.

    $g_{i,n}$ is bytes $i-n+1..i$, zero-padded before the row's start; each byte enters as
    $b+1$ so padding is not byte 0. Horner's rule, reduced mod $2^{31}-1$ at every step.
    """
    x = F.pad(input_ids.long() + 1, (n - 1, 0))  # [B, T + n - 1]
    h = torch.zeros_like(input_ids, dtype=torch.long)
    T = input_ids.shape[1]
    for j in range(n):  # oldest byte first: h = sum_j b_{i-n+1+j} a^{n-1-j}
        h = (h * HASH_BASE + x[:, j:j + T]) % HASH_MODULUS
    return h % buckets


class HashNgramEmbedding(nn.Module):
    """$e_i = x_i + \\sum_n E^{hash}_n(\\mathrm{Hash}(g_{i,n}))$: ids [B, T] -> [B, T, d]."""

    def __init__(self, d: int, ngram_sizes=NGRAM_SIZES, buckets: int = 4096):
        super().__init__()
        self.ngram_sizes, self.buckets = tuple(ngram_sizes), buckets
        self.bytes = nn.Embedding(BYTES, d)
        self.hashed = nn.ModuleList(nn.Embedding(buckets, d) for _ in self.ngram_sizes)
        for table in (self.bytes, *self.hashed):  # the official init: std d^-1/2, cut at 3 std (not torch's N(0, 1))
            nn.init.trunc_normal_(table.weight, std=d ** -0.5, a=-3 * d ** -0.5, b=3 * d ** -0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.bytes(input_ids)
        for n, table in zip(self.ngram_sizes, self.hashed):
            e = e + table(ngram_hashes(input_ids, n, self.buckets))
        return e


# ---------------------------------------------------------------------------------------------
# Cross-attention and the model


class CrossAttention(nn.Module):
    """Multi-head attention of queries x [B, Q, d] on keys/values kv [B, K, d_kv] under a bool mask [B, Q, K].

    Pre-norm on both sides, as the official CrossAttention. A query with nothing to attend returns 0.
    """

    def __init__(self, d: int, d_kv: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.RMSNorm(d), nn.RMSNorm(d_kv)
        self.wq, self.wo = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.wk, self.wv = nn.Linear(d_kv, d, bias=False), nn.Linear(d_kv, d, bias=False)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, Q, d = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # [B, h, n, d/h]
        q, kvn = split(self.wq(self.norm_q(x))), self.norm_kv(kv)
        k, v = split(self.wk(kvn)), split(self.wv(kvn))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # [B, h, Q, K]
        scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1) * mask[:, None].any(-1, keepdim=True)  # all-masked rows: zero, not uniform
        return self.wo((weights @ v).transpose(1, 2).reshape(B, Q, d))


def llama_stack(d: int, layers: int, heads: int, mlp_ratio: int, max_len: int) -> LlamaModel:
    """Causal Llama layers used through ``inputs_embeds`` (their own token table removed)."""
    config = LlamaConfig(vocab_size=1, hidden_size=d, intermediate_size=mlp_ratio * d, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaModel(config)
    model.embed_tokens = None
    return model


class ByteLatentTransformer(nn.Module):
    """BLT over byte ids: ``forward(input_ids [B, T] in 0..255, labels=None)`` -> ``.loss`` (next-byte
    cross-entropy, HF shift, -100 ignored) and ``.logits`` [B, T, 256]. `patcher` maps ids [B, T] to patch
    starts [B, T + 1] (`StridePatcher`, `EntropyPatcher`); ``starts=`` overrides it for one call."""

    def __init__(self, config: BLTConfig, patcher):
        super().__init__()
        c = self.config = config
        self.patcher = patcher
        self.embedding = HashNgramEmbedding(c.d_local, c.ngram_sizes, c.hash_buckets)
        self.encoder = llama_stack(c.d_local, c.encoder_layers, c.local_heads, c.mlp_ratio, c.max_bytes)
        self.encoder_cross = CrossAttention(c.d_local, c.d_local, c.cross_heads)
        self.to_global = nn.Linear(c.d_local, c.d_global, bias=False)
        self.latent = llama_stack(c.d_global, c.global_layers, c.global_heads, c.mlp_ratio, c.max_bytes)
        self.decoder_cross = CrossAttention(c.d_local, c.d_global, c.cross_heads)
        self.decoder = llama_stack(c.d_local, c.decoder_layers, c.local_heads, c.mlp_ratio, c.max_bytes)
        self.head = nn.Linear(c.d_local, BYTES, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, starts: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutput:
        B, T = input_ids.shape
        starts = self.patcher(input_ids) if starts is None else starts  # [B, T + 1]
        pid = patch_ids(starts[:, :-1])  # [B, T]
        P = int(pid.max()) + 1

        h = self.encoder(inputs_embeds=self.embedding(input_ids)).last_hidden_state  # [B, T, d_l]
        # patch queries: max-pool of each patch's bytes (rows with fewer patches keep zeros beyond their last)
        pooled = h.new_zeros(B, P, h.shape[-1]).scatter_reduce(
            1, pid[..., None].expand_as(h), h, reduce="amax", include_self=False)
        patches = pooled + self.encoder_cross(pooled, h, encoder_cross_mask(starts, P))  # [B, P, d_l]
        z = self.latent(inputs_embeds=self.to_global(patches)).last_hidden_state  # [B, P, d_g]
        d = h + self.decoder_cross(h, z, decoder_cross_mask(starts, P))  # bytes read earlier patches only
        logits = self.head(self.decoder(inputs_embeds=d).last_hidden_state)  # [B, T, 256]

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, BYTES), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


# ---------------------------------------------------------------------------------------------
# Inference FLOPs (analytic)


def _layer_flops(d: int, n: int, mlp_ratio: int) -> float:
    """One Llama layer's forward matmuls on n positions: q,k,v,o (4 d^2), SwiGLU (3 r d^2), QK^T and AV (dense)."""
    return 2 * n * (4 + 3 * mlp_ratio) * d * d + 4 * n * n * d


def _cross_flops(d: int, d_kv: int, q: int, k: int) -> float:
    """Cross-attention forward: projections of q queries (q, o) and k keys (k, v), then dense QK^T and AV."""
    return 2 * q * 2 * d * d + 2 * k * 2 * d_kv * d + 4 * q * k * d


def inference_flops_per_byte(config: BLTConfig, row_bytes: int, mean_patch_length: float) -> float:
    """Analytic forward matmul FLOPs per byte of the BLT on a row of `row_bytes` bytes cut into
    row_bytes / mean_patch_length patches (hash embeddings are look-ups: no FLOPs)."""
    c, T = config, row_bytes
    P = T / mean_patch_length
    flops = (c.encoder_layers * _layer_flops(c.d_local, T, c.mlp_ratio)
             + _cross_flops(c.d_local, c.d_local, P, T)
             + 2 * P * c.d_local * c.d_global  # to_global
             + c.global_layers * _layer_flops(c.d_global, P, c.mlp_ratio)
             + _cross_flops(c.d_local, c.d_global, T, P)
             + c.decoder_layers * _layer_flops(c.d_local, T, c.mlp_ratio)
             + 2 * T * c.d_local * BYTES)
    return flops / T


def token_lm_flops_per_token(d: int, layers: int, vocab: int, row_tokens: int, mlp_ratio: int = 4) -> float:
    """The same count for a token-level Llama (the BPE control, or the entropy model with vocab 256): per token."""
    return (layers * _layer_flops(d, row_tokens, mlp_ratio) + 2 * row_tokens * d * vocab) / row_tokens
