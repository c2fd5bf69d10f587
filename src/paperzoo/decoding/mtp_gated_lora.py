r"""Your LLM Knows the Future: Uncovering Its Multi-Token Prediction Potential
(Samragh, Kundu, Harrison, Nishu, Naik, Cho, Farajtabar; arXiv:2507.11851).

An autoregressive LM already carries information about tokens beyond the next one.
The paper turns that into a drafter *inside the model itself*: append $k$ mask
tokens $m_1 \dots m_k$ to the input, and the outputs at the mask positions predict
the tokens after the next one. A LoRA adapter that is *gated* -- active only at mask
positions -- teaches the model to fill the masks while leaving every ordinary
position computed exactly as before, so the model can verify its own drafts in the
same forward pass: speculative decoding with no second model and no change in output.

**Masked input.** For a prefix $x_{1..n}$ the model reads
$[x_1, \dots, x_n, m_1, \dots, m_k]$; position $n$ predicts $x_{n+1}$ as usual (NTP)
and mask $m_j$ predicts $x_{n+1+j}$ (MTP). Mask $m_j$ sits at position $n + j$ and
sees the prefix and $m_{1..j}$.

**Gated LoRA.** Every adapted linear layer computes

$$ y_t = W x_t + g_t \, \tfrac{\alpha}{r} B A x_t, \qquad g_t = \mathbb{1}[t \text{ is a mask position}] $$

so at $g_t = 0$ the layer is the base layer, bit for bit. Because ordinary tokens
never attend to mask tokens (the masks come last, or an attention mask forbids it),
every ordinary position's hidden states and logits are the base model's.

**Sampler head.** Independent per-mask argmaxes can be
incoherent, so each draft token is conditioned on the one before it: with $z_j$ the
final hidden state at $m_j$ (the input of the unembedding $U$) and $e(\cdot)$ the input
embedding,

$$ \hat y_{n+1+j} = \arg\max\; U \big( z_j + W_2\, \mathrm{SiLU}(W_1 [z_j ; e(\hat y_{n+j})]) \big),
   \qquad \hat y_{n+1} = \arg\max U z^{\text{NTP}}_n . $$

**Training.** A training sequence $x_{1..T}$ gets a block of
$k$ masks after an anchor $x_a$ for many anchors at once; all blocks are appended
after the sequence and an attention mask gives each the view it would have at
inference (ordinary tokens see ordinary tokens causally; mask $(a, j)$ sees
$x_{\le a}$ and $m_{1..j}$ of its own block; positions $a + j$). Three losses on the
mask positions, with target $x_{a+1+j}$:

$$ \mathcal{L} = \mathrm{CE}(U z_{a,j},\, x_{a+1+j})
   + \mathrm{CE}(U s(z_{a,j}, e(x_{a+j})),\, x_{a+1+j})
   + \lambda\, \lVert z_{a,j} - \mathrm{sg}(z^{\text{NTP}}_{a+j}) \rVert^2 / d $$

the mask cross-entropy, the sampler cross-entropy (teacher-forced with the true
previous token), and the latent consistency matching (LCM) loss, which pulls the
mask latent towards the base model's own latent at the position $a + j$ that
predicts the same token -- i.e. towards what the verifier will accept. (The NTP
cross-entropy at ordinary positions is constant here: nothing trainable reaches them.)
Trainable: the LoRA matrices, the $k$ mask embeddings, the sampler.

**Speculative decoding** (the paper's "linear" and "quadratic" decoding). A pass
feeds the tokens not yet in the KV cache -- the last verified token, then the $c$
drafts -- plus mask blocks. The NTP logits at the ordinary positions verify the
drafts greedily: draft $i$ is accepted while it equals the base model's argmax after
draft $i - 1$; the first disagreement yields the base model's own token instead (the
"bonus" token). Every pass thus emits accepted drafts + 1 token, and the output is the
base model's greedy output. *Linear* decoding appends one mask block after the last
draft: new drafts exist only if every draft was accepted, otherwise the next pass
has none. *Quadratic* decoding appends a block after the last verified token *and
after every draft*, so whichever prefix is accepted, the block anchored at it
supplies $k$ fresh drafts; a pass reads $(c + 1)(k + 1)$ tokens. Both are
implemented (`strategy=`). Ordinary tokens come first in every pass, so keeping the
accepted prefix is a plain cache crop.

Implementation notes and deviations:

- Gated LoRA is peft's LoRA (`LoraConfig`, all linear layers, no DoRA) with a forward
  hook on each ``lora_B`` that multiplies its output by the per-position gate; peft
  adds ``lora_B(lora_A(x)) * scaling`` to the base output, so this is exactly
  $g_t \frac{\alpha}{r} B A x_t$ (a test checks it against plain peft with the gate
  fully open). The gate is explicit -- `GatedMTP.forward(input_ids, gate=...)`, closed
  by default -- rather than read from the token ids, so a real token that happens to
  share an id with a mask token is never gated on.
- Mask tokens: $k$ *distinct* tokens taken from the tokenizer's unused reserved
  special tokens (``<|reserved_i|>``, Llama-3's ``<|reserved_special_token_i|>``).
  Their embeddings are separate parameters initialised to the mean input embedding,
  substituted at gated positions by hooks on the input-embedding module; the base
  embedding table stays frozen. When the tokenizer has fewer than $k$ reserved
  tokens, the missing masks get ids past the vocabulary that never reach the
  embedding table, instead of adding tokens and resizing the embeddings: a resized
  unembedding changes the shape of the logits matmul, and with it the last bits of
  the base logits (observed on CPU), which would break the exact-equality guarantee.
- The sampler has a residual path with $W_2$ initialised to zero, so it starts as the
  plain mask head and learns the correction; the paper specifies a two-layer MLP on
  $[z; e]$ without fixing these details.
- Training inserts mask blocks after a random subset of `anchors` positions per
  sequence instead of after every token, to fit a CPU budget; `anchors=None` uses all.
  The loss weights are 1, 1 and `lcm_weight` (we could not check the paper's
  weights). Training text is whatever the caller gives (the experiment uses each LM's
  own training data); the community implementation siihwanpark/MTP-GLoRA instead
  trains on the model's own generations with soft targets. No official code was
  found; the equations above follow the paper's description as we read it.
- Verification is greedy (exact match with the base model's argmax); sampling-based
  acceptance is not implemented. One prompt at a time.
- The decoding loop is our own (``model(...)`` with a DynamicCache, custom 4-D
  attention masks and position ids, cache crops): `generate` cannot append mask blocks,
  read their latents or roll back rejected drafts. Attention must be ``eager`` or
  ``sdpa`` (a boolean or additive 4-D mask is passed through unchanged by HF).
- Architectures: Llama-style models, GPT-2 and OPT (whose feed-forward layers flatten
  the batch to [B * N, d]; the gate is flattened with it). A prompt whose length plus
  `max_new_tokens` plus the k mask positions of the last block exceeds the model's
  positions is refused before any pass, naming the limit.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from paperzoo.core.sampling import check_positions, max_positions
from paperzoo.decoding import Generation, count_forward_passes, prompt_ids

_RESERVED = re.compile(r"<\|reserved(?:_special_token)?_(\d+)\|>")


@dataclass(frozen=True)
class MTPConfig:
    k: int = 4  # mask tokens per block: drafts per pass
    rank: int = 16
    alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    sampler_hidden: int | None = None  # default: the model's hidden size
    lcm_weight: float = 1.0

    def __post_init__(self):
        if self.k < 1 or self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"need k >= 1, rank >= 1 and alpha > 0, got k={self.k}, rank={self.rank}, "
                             f"alpha={self.alpha}")
        if not 0 <= self.lora_dropout < 1 or self.lcm_weight < 0:
            raise ValueError(f"need 0 <= lora_dropout < 1 and lcm_weight >= 0, got {self.lora_dropout} and "
                             f"{self.lcm_weight}")
        if self.sampler_hidden is not None and self.sampler_hidden < 1:
            raise ValueError(f"sampler_hidden must be at least 1 (or None), not {self.sampler_hidden}")


def mask_token_ids(tokenizer, k: int, model: nn.Module | None = None) -> list[int]:
    """Ids of k distinct mask tokens: the tokenizer's reserved special tokens, then new ids past the vocabulary.

    New ids (needed only when fewer than k reserved tokens exist, and then `model` is
    required) lie beyond both the tokenizer and the embedding table: they never reach
    the table, since `GatedMTP` substitutes the learnt mask embeddings for them.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    found = sorted((int(m.group(1)), t) for t in tokenizer.all_special_tokens if (m := _RESERVED.fullmatch(t)))
    ids = [tokenizer.convert_tokens_to_ids(t) for _, t in found][:k]
    if len(ids) < k:
        if model is None:
            raise ValueError(f"the tokenizer has {len(ids)} reserved tokens, fewer than k={k}; pass the model for new ids")
        first = max(len(tokenizer), model.get_input_embeddings().weight.shape[0])
        ids += list(range(first, first + k - len(ids)))
    return ids


class SamplerHead(nn.Module):
    """s(z, e) = z + W_2 SiLU(W_1 [z; e]); the draft token is argmax U s."""

    def __init__(self, d_model: int, d_embed: int, d_hidden: int | None = None):
        super().__init__()
        d_hidden = d_hidden or d_model
        self.W1 = nn.Linear(d_model + d_embed, d_hidden)
        self.W2 = nn.Linear(d_hidden, d_model)
        nn.init.zeros_(self.W2.weight)
        nn.init.zeros_(self.W2.bias)

    def forward(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return z + self.W2(F.silu(self.W1(torch.cat([z, e], dim=-1))))


def block_layout(num_regular: int, anchors: torch.Tensor, k: int, past: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and attention pattern for ordinary tokens followed by mask blocks.

    The sequence is ``num_regular`` ordinary tokens, then for each anchor a (per row of
    `anchors` [B, A], indices into the ordinary tokens) the k masks m_1..m_k of that
    block, after `past` cached tokens. Ordinary token i sits at past + i and sees the
    cache and ordinary tokens <= i; mask (a, j) sits at past + a + j and sees the
    cache, ordinary tokens <= a and masks m_1..m_j of its own block.
    Returns position_ids [B, N] and allowed [B, N, past + N] (True: may attend).
    """
    B, A = anchors.shape
    T, N = num_regular, num_regular + A * k
    device = anchors.device
    regular = torch.arange(T, device=device).expand(B, T)
    # every token's anchor, block (-1: ordinary) and offset j (0: ordinary)
    anchor = torch.cat([regular, anchors.repeat_interleave(k, dim=1)], dim=1)  # [B, N]
    block = torch.cat([torch.full((B, T), -1, device=device),
                       torch.arange(A, device=device).repeat_interleave(k).expand(B, A * k)], dim=1)
    j = torch.cat([torch.zeros(B, T, dtype=torch.long, device=device),
                   torch.arange(1, k + 1, device=device).repeat(A).expand(B, A * k)], dim=1)
    key_is_regular = (block == -1)[:, None, :]
    sees_regular = key_is_regular & (anchor[:, None, :] <= anchor[:, :, None])
    sees_own_block = ~key_is_regular & (block[:, None, :] == block[:, :, None]) & (j[:, None, :] <= j[:, :, None])
    allowed = torch.cat([torch.ones(B, N, past, dtype=torch.bool, device=device), sees_regular | sees_own_block], dim=2)
    return past + anchor + j, allowed


def attention_mask_4d(allowed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """[B, N, K] bool -> the [B, 1, N, K] mask HF passes unchanged to its attention function."""
    impl = getattr(model.config, "_attn_implementation", "eager") or "eager"
    if impl == "sdpa":
        return allowed[:, None]
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]
    raise ValueError(f"gated MTP needs 'eager' or 'sdpa' attention, not {impl!r}")


class GatedMTP(nn.Module):
    """A causal LM with k mask tokens, gated LoRA and a sampler head: it drafts for itself.

    `attach` builds one (modifying the model in place, as peft does). Calling it with
    ``gate=None`` (or all zeros) runs the unchanged base model.
    """

    def __init__(self, model: nn.Module, mask_ids: Sequence[int], config: MTPConfig = MTPConfig()):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        if len(mask_ids) != config.k or len(set(mask_ids)) != config.k:
            raise ValueError(f"need {config.k} distinct mask token ids, got {list(mask_ids)}")
        self.config = config
        self.model = get_peft_model(model, LoraConfig(
            r=config.rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
            target_modules=config.target_modules, use_dora=False))
        self.base = self.model.get_base_model()
        embedding = self.base.get_input_embeddings()
        self.unembedding = self.base.get_output_embeddings()
        d_embed, d_model = embedding.weight.shape[1], self.unembedding.weight.shape[1]
        self.register_buffer("mask_ids", torch.tensor(list(mask_ids)), persistent=False)
        self.num_embeddings = embedding.weight.shape[0]
        index = torch.full((max(self.num_embeddings, max(mask_ids) + 1),), -1, dtype=torch.long)
        index[self.mask_ids] = torch.arange(config.k)
        self.register_buffer("mask_index", index, persistent=False)  # token id -> j - 1, or -1
        self.mask_embeddings = nn.Parameter(embedding.weight.detach().mean(0).repeat(config.k, 1))
        self.sampler = SamplerHead(d_model, d_embed, config.sampler_hidden)
        self._gate: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._inside = False  # within `gated`: record the unembedding's input
        self._hooks = [embedding.register_forward_pre_hook(self._keep_new_mask_ids_off_the_table),
                       embedding.register_forward_hook(self._substitute_mask_embeddings),
                       self.unembedding.register_forward_pre_hook(self._record_latents)]
        self._hooks += [module.register_forward_hook(self._gate_lora)
                        for name, module in self.model.named_modules() if name.endswith(".lora_B.default")]
        if len(self._hooks) == 3:
            raise ValueError("peft found no linear layers to adapt; pass target_modules")

    # --- hooks -----------------------------------------------------------------------
    def _gate_lora(self, module, args, out):
        if self._gate is None:  # closed gate: the LoRA branch contributes exactly zero
            return out * 0
        gate = self._gate
        if out.shape[:-1] != gate.shape and out.dim() == 2 and out.shape[0] == gate.numel():
            gate = gate.reshape(-1)  # OPT's feed-forward layers see the batch flattened to [B * N, d]
        if out.shape[:-1] != gate.shape:
            raise ValueError(f"gate of shape {tuple(self._gate.shape)} does not match activations {tuple(out.shape)}")
        return out * gate[..., None].to(out.dtype)

    def _keep_new_mask_ids_off_the_table(self, module, args):
        self._ids = ids = args[0]
        beyond = ids >= self.num_embeddings
        if beyond.any():
            known = ids < len(self.mask_index)
            is_mask = known & (self.mask_index[ids.masked_fill(~known, 0)] >= 0)
            if self._gate is None or not (self._gate.bool() & is_mask)[beyond].all():
                raise ValueError(f"token ids >= {self.num_embeddings} are allowed only as mask tokens at gated positions")
            return (ids.masked_fill(beyond, 0),)

    def _substitute_mask_embeddings(self, module, args, out):
        if self._gate is None:
            return out
        j = self.mask_index[self._ids]  # [B, N]
        at = self._gate.bool() & (j >= 0)
        return torch.where(at[..., None], self.mask_embeddings[j.clamp_min(0)].to(out.dtype), out)

    def _record_latents(self, module, args):
        if self._inside:
            self._z = args[0]

    # --- forward -----------------------------------------------------------------------
    @contextmanager
    def gated(self, gate: torch.Tensor | None):
        """Inside, every adapted layer adds its LoRA update where gate [B, N] is 1 (closed: None or zeros)."""
        self._gate = None if gate is None or not gate.any() else gate
        self._inside = True
        try:
            yield
        finally:
            self._gate, self._z, self._ids, self._inside = None, None, None, False

    def forward(self, input_ids: torch.Tensor, gate: torch.Tensor | None = None, **kwargs):
        """The model's output (with ``.z``, the unembedding's input); LoRA applies where gate = 1."""
        if gate is not None and gate.shape != input_ids.shape:
            raise ValueError(f"gate must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(gate.shape)}")
        with self.gated(gate):
            out = self.model(input_ids=input_ids, **kwargs)
            out.z = self._z
        return out

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """e(y): rows of the frozen input-embedding table (no hook involved)."""
        return F.embedding(ids, self.base.get_input_embeddings().weight)

    def sampler_logits(self, z: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.unembedding(self.sampler(z, self.embed(prev).to(z.dtype)))

    def propose(self, z: torch.Tensor, prev: int) -> list[int]:
        """Draft tokens from one block's mask latents z [k, d], each conditioned on the previous one."""
        drafts = []
        for j in range(z.shape[0]):
            logits = self.sampler_logits(z[j], torch.tensor(prev, device=z.device))
            prev = int(logits.argmax())
            drafts.append(prev)
        return drafts

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def attach(model: nn.Module, tokenizer, config: MTPConfig = MTPConfig()) -> GatedMTP:
    """Give `model` k mask tokens, gated LoRA and a sampler head (untrained: drafts are poor until `train_mtp`)."""
    ids = mask_token_ids(tokenizer, config.k, model)
    for p in model.parameters():
        p.requires_grad_(False)
    return GatedMTP(model, ids, config)


# --- training ------------------------------------------------------------------------
def mtp_batch(mtp: GatedMTP, x: torch.Tensor, anchors: int | None = None, generator: torch.Generator | None = None) -> dict:
    """Append mask blocks to sequences x [B, T]: model inputs and, per mask, its target and source index.

    Mask (a, j) targets x[a + 1 + j] (-100 past the end) and its source index a + j
    holds both the true previous token (for the sampler) and the ordinary position
    that predicts the same target (for the LCM loss).
    """
    B, T = x.shape
    k = mtp.config.k
    if T < 3:
        raise ValueError(f"MTP training needs sequences of at least 3 tokens, got {T}")
    A = T - 2 if anchors is None else min(anchors, T - 2)
    a = torch.rand(B, T - 2, generator=generator).argsort(dim=1)[:, :A].sort(dim=1).values.to(x.device)  # [B, A]
    position_ids, allowed = block_layout(T, a, k)
    j = torch.arange(1, k + 1, device=x.device)
    source = (a[:, :, None] + j).reshape(B, A * k)  # a + j
    target = torch.where(source + 1 < T, x.gather(1, (source + 1).clamp_max(T - 1)), -100)
    input_ids = torch.cat([x, mtp.mask_ids.repeat(B, A)], dim=1)
    gate = torch.cat([torch.zeros(B, T), torch.ones(B, A * k)], dim=1).to(x.device)
    return {"input_ids": input_ids, "gate": gate, "position_ids": position_ids, "allowed": allowed,
            "target": target, "source": source.clamp_max(T - 1), "num_regular": T}


def mtp_losses(mtp: GatedMTP, x: torch.Tensor, anchors: int | None = None) -> dict[str, torch.Tensor]:
    """The paper's three losses on one batch of sequences x [B, T], and their weighted sum."""
    batch = mtp_batch(mtp, x, anchors)
    T = batch["num_regular"]
    out = mtp(batch["input_ids"], gate=batch["gate"], position_ids=batch["position_ids"],
              attention_mask=attention_mask_4d(batch["allowed"], mtp.base), use_cache=False)
    valid = batch["target"] != -100  # [B, M]
    target = batch["target"][valid]
    z_mask = out.z[:, T:][valid]  # [n, d]
    logits_mask = out.logits[:, T:][valid].float()
    src = batch["source"]
    z_ntp = out.z[:, :T].gather(1, src[..., None].expand(-1, -1, out.z.shape[-1]))[valid].detach()
    prev = x.gather(1, src)[valid]
    ce_mask = F.cross_entropy(logits_mask, target)
    ce_sampler = F.cross_entropy(mtp.sampler_logits(z_mask, prev).float(), target)
    lcm = (z_mask.float() - z_ntp.float()).pow(2).mean()
    loss = ce_mask + ce_sampler + mtp.config.lcm_weight * lcm
    with torch.no_grad():
        accuracy = (logits_mask.argmax(-1) == target).float().mean()
    return {"loss": loss, "ce_mask": ce_mask, "ce_sampler": ce_sampler, "lcm": lcm, "mask_accuracy": accuracy}


class MTPObjective(nn.Module):
    """Adapter to `core.training.train`, which calls ``net(input_ids=x, labels=x).loss``."""

    def __init__(self, mtp: GatedMTP, anchors: int | None = None):
        super().__init__()
        self.mtp, self.anchors = mtp, anchors

    def forward(self, input_ids: torch.Tensor, labels=None):
        return SimpleNamespace(**mtp_losses(self.mtp, input_ids, self.anchors))


def train_mtp(mtp: GatedMTP, blocks: torch.Tensor, config, anchors: int | None = None, seed: int = 0) -> dict:
    """Fine-tune the mask embeddings, gated LoRA and sampler on token blocks [N, T] (core.training.train)."""
    from paperzoo.core.training import train

    if anchors is not None and anchors < 1:
        raise ValueError(f"anchors must be at least 1 (or None for every position), not {anchors}")
    if blocks.dim() != 2 or blocks.shape[1] < 3:
        raise ValueError(f"blocks must be token ids [N, T] with T >= 3, got shape {tuple(blocks.shape)}")
    # mask j after the last anchor T - 3 sits at position T - 3 + j: up to k - 2 positions past the block
    need, limit = blocks.shape[1] + max(0, mtp.config.k - 2), max_positions(mtp.base)
    if limit is not None and need > limit:
        raise ValueError(f"blocks of {blocks.shape[1]} tokens with k={mtp.config.k} mask tokens need {need} positions, "
                         f"but the model has {limit} (max_position_embeddings): use shorter blocks")

    history = train(MTPObjective(mtp, anchors), blocks, config, params=mtp.trainable_parameters(),
                    desc=f"MTP gated LoRA, k={mtp.config.k}", seed=seed)
    mtp.eval()
    return history


# --- decoding ------------------------------------------------------------------------
STRATEGIES = ("linear", "quadratic")


@torch.no_grad()
def mtp_decode(mtp: GatedMTP, tokenizer, prompt: str, max_new_tokens: int = 64, strategy: str = "quadratic",
               propose: Callable[[torch.Tensor, int, list[int]], list[int]] | None = None) -> Generation:
    """Greedy self-speculative decoding: the model drafts with its mask tokens and verifies with NTP.

    The output equals greedy decoding of the base model (up to floating-point ties).
    `propose(z [k, d], previous token, tokens so far)` replaces the sampler as drafter
    when given (e.g. to plant drafts in a test).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    mtp.eval()
    k, device = mtp.config.k, mtp.mask_ids.device
    prompt_tokens = prompt_ids(tokenizer, prompt)[0].tolist()
    check_positions(mtp.base, len(prompt_tokens), max_new_tokens, extra=k)
    eos = tokenizer.eos_token_id
    known, drafts, generated = prompt_tokens, [], []  # known: verified tokens not yet in the cache
    cache, past = None, 0
    cache_name = "cache" if "cache" in inspect.signature(mtp.base.forward).parameters else "past_key_values"
    drafter = propose or (lambda z, prev, _so_far: mtp.propose(z, prev))
    proposed = accepted = 0
    accepted_per_pass = []
    with count_forward_passes(mtp.base) as passes:
        start = time.perf_counter()
        while True:
            regular = known + drafts
            u = len(known)
            last = len(regular) - 1
            anchor_list = list(range(u - 1, last + 1)) if strategy == "quadratic" else [last]
            anchors = torch.tensor([anchor_list], device=device)
            position_ids, allowed = block_layout(len(regular), anchors, k, past)
            ids = torch.tensor([regular + mtp.mask_ids.tolist() * len(anchor_list)], device=device)
            gate = torch.zeros_like(ids, dtype=torch.float)
            gate[:, len(regular):] = 1
            out = mtp(ids, gate=gate, position_ids=position_ids, attention_mask=attention_mask_4d(allowed, mtp.base),
                      use_cache=True, **{cache_name: cache})
            cache = getattr(out, cache_name)
            greedy = out.logits[0, : len(regular)].argmax(-1).tolist()  # NTP: the verifier
            a = 0  # drafts[i] is accepted while it equals the base model's argmax after the token before it
            while a < len(drafts) and drafts[a] == greedy[u - 1 + a]:
                a += 1
            proposed += len(drafts)
            accepted += a
            accepted_per_pass.append(a)
            bonus = greedy[u - 1 + a]
            generated += drafts[:a] + [bonus]
            past += u + a
            cache.crop(past - cache.get_seq_length())  # keep the verified ordinary tokens; masks and rejects go
            if (eos is not None and eos in generated) or len(generated) >= max_new_tokens:
                break
            known, drafts = [bonus], []
            anchor = u - 1 + a
            if anchor in anchor_list:  # quadratic: always; linear: only if every draft was accepted
                b = anchor_list.index(anchor)
                z = out.z[0, len(regular) + b * k : len(regular) + (b + 1) * k]
                drafts = drafter(z, bonus, prompt_tokens + generated)
                drafts = drafts[: max_new_tokens - len(generated) - 1]
        wall = time.perf_counter() - start
    if eos is not None and eos in generated:
        generated = generated[: generated.index(eos) + 1]
    generated = generated[:max_new_tokens]
    stats = {"strategy": strategy, "k": k, "tokens_per_pass": len(generated) / passes.count,
             "acceptance_rate": accepted / proposed if proposed else 0.0, "drafts_proposed": proposed,
             "drafts_accepted": accepted, "accepted_per_pass": accepted_per_pass}
    return Generation(generated, tokenizer.decode(generated), passes.count, wall, stats)
