r"""Mixture-of-Recursions: a shared block that each token passes through as often as a router decides.

Bae et al., *Mixture-of-Recursions: Learning Dynamic Recursive Depths for Adaptive
Token-Level Computation*, arXiv:2507.10524 (NeurIPS 2025); official code
raymin0223/mixture_of_recursions.

A recursive transformer ties weights across depth: here the paper's best sharing,
**Middle-Cycle** (Sec. 2.1): the first and the last layer are unique, and the
$L - 2$ middle layers of a Llama-style config become one shared block $f$ of
$(L-2)/N_r$ layers applied up to $N_r$ times. Mixture-of-Recursions adds a router per
token that decides how many of the $N_r$ recursions it gets, so compute follows the
tokens that need it while the unique parameters stay about $1/N_r$ of the vanilla model's.

Routing (Sec. 2.2.1), with $\mathcal{H}^r_t$ the state of token $t$ entering recursion $r$:

- **expert-choice** (``routing="expert"``): every recursion is an expert that keeps the
  top-$k_r$ tokens among those it was handed (hierarchical filtering, so depth only
  shrinks) by a sigmoid router per recursion,
  $g^r_t = \alpha\,\sigma(\theta_r^\top \mathcal{H}^r_t)$, and
  $$\mathcal{H}^{r+1}_t = \begin{cases} \mathcal{H}^r_t + g^r_t\, f(\mathcal{H}^r_t;\Phi') & t \in \mathrm{TopK}_r \\ \mathcal{H}^r_t & \text{otherwise.}\end{cases}$$
  $k_r = \lfloor c_r T \rfloor$ with capacities $c_r$ a share of the whole sequence;
  the default $c = (N_r/N_r, (N_r-1)/N_r, \dots, 1/N_r)$ -- for $N_r = 3$ every token
  gets recursion 1, then 2/3 and 1/3 of the sequence go on (the paper's Fig. 2a,
  $k = 9, 6, 3$). A top-$k$ over the sequence lets later tokens decide whether an
  earlier one is kept, which causal decoding cannot do; an **auxiliary router**
  (``causal_router="aux_router"``: a separate linear scorer per recursion on the
  detached state) or an **auxiliary loss** on the router itself (``"aux_loss"``) is
  trained with binary cross-entropy to predict the top-$k$ membership, and at
  inference (``model.eval()``) a token goes on iff that predictor's logit is > 0
  (probability > 1/2) -- a per-token, causal decision.
- **token-choice** (``routing="token"``): one softmax router at the first recursion
  assigns each token a depth $i_t = \arg\max_j p_{t,j}$ with gate
  $g_t = \alpha\, p_{t,i_t}$; the token passes recursions $1..i_t$ and leaves with
  $\mathcal{H}^1_t + g_t\,(f^{\circ i_t}(\mathcal{H}^1_t) - \mathcal{H}^1_t)$ (as in the
  official code, which gates only the exit). A Switch-style balancing loss
  $N_r \sum_j f_j P_j$ ($f_j$ the share of tokens sent to depth $j$, $P_j$ the mean
  router probability of $j$) keeps the depths used.
- ``routing="none"``: the plain recursive transformer -- every token, every recursion,
  $\mathcal{H}^{r+1} = f(\mathcal{H}^r)$ -- the paper's fixed-recursion baseline.

**Recursion-wise KV caching** (Sec. 2.2.2): at recursion $r$ attention runs only among
the tokens still active at $r$ (they are gathered into a shorter sequence, keep their
original rotary positions and a causal mask), so a token that exited neither computes
nor offers keys and values there. `kv_cache_entries` counts the cache this implies,
and the one recursive KV sharing would need.

Deviations from the paper and its code:

- $f$ here is the shared block's *residual update* (its output minus its input), so a
  gate of 1 reproduces the plain recursive transformer exactly; the official code adds
  the whole block output, $\mathcal{H} + g\,\mathrm{Block}(\mathcal{H})$.
- Recursive KV sharing (reusing recursion 1's keys and values at deeper recursions) is
  not implemented, only counted (`kv_cache_entries(..., sharing=True)`); the paper's
  best MoR uses recursion-wise caching.
- Only Middle-Cycle sharing (the paper's best); no router z-loss, no capacity warm-up,
  no loss-free balancing; routers are linear (the paper's default "linear" router).
- The model is built from a ``LlamaConfig`` out of transformers' own
  ``LlamaDecoderLayer`` modules (no forked modeling code); it trains from scratch, as in
  the paper, rather than converting a trained checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

ROUTINGS = ("expert", "token", "none")
CAUSAL_ROUTERS = ("aux_router", "aux_loss")


@dataclass(frozen=True)
class RecursionConfig:
    num_recursions: int = 3  # N_r
    routing: str = "expert"  # "expert", "token" or "none" (fixed recursion: every token, every step)
    capacities: tuple[float, ...] | None = None  # c_r, share of the sequence kept at recursion r; None: (N_r-r+1)/N_r
    alpha: float = 1.0  # gate scale: g = alpha * sigma(.) (expert) or alpha * softmax(.) (token)
    causal_router: str = "aux_router"  # expert-choice at inference: "aux_router" or "aux_loss"
    aux_coeff: float = 0.1  # weight of the auxiliary BCE (with "aux_router" it only trains the detached scorer)
    balance_coeff: float = 0.1  # weight of the token-choice balancing loss

    def __post_init__(self):
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, not {self.routing!r}")
        if self.causal_router not in CAUSAL_ROUTERS:
            raise ValueError(f"causal_router must be one of {CAUSAL_ROUTERS}, not {self.causal_router!r}")
        c = self.capacity
        if len(c) != self.num_recursions or any(not 0 < x <= 1 for x in c) or any(a < b for a, b in zip(c, c[1:])):
            raise ValueError(f"capacities must be {self.num_recursions} shares in (0, 1], non-increasing: {c}")

    @property
    def capacity(self) -> tuple[float, ...]:
        n = self.num_recursions
        return tuple(self.capacities) if self.capacities is not None else tuple((n - r) / n for r in range(n))


@dataclass
class RecursionOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None  # language-model loss + the routing losses (when labels are given)
    lm_loss: torch.Tensor | None
    routing_loss: torch.Tensor  # auxiliary BCE (expert) or balancing loss (token), unweighted; 0 for "none"
    depths: torch.Tensor  # [B, T] recursions each token received
    selected: list[torch.Tensor] = field(default_factory=list)  # per recursion, [B, T] bool: tokens it processed


def middle_cycle_layers(num_layers: int, num_recursions: int) -> int:
    """Layers in the shared block when the first and last of `num_layers` stay unique (Middle-Cycle)."""
    if num_layers < 3 or (num_layers - 2) % num_recursions:
        raise ValueError(f"Middle-Cycle needs num_layers - 2 divisible by N_r: {num_layers} layers, N_r = {num_recursions}")
    return (num_layers - 2) // num_recursions


class MixtureOfRecursions(nn.Module):
    """A Middle-Cycle recursive Llama with expert-choice, token-choice or no routing; HF-style forward."""

    def __init__(self, config: LlamaConfig, recursion: RecursionConfig = RecursionConfig()):
        super().__init__()
        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"  # our masks are boolean: sdpa reads them, eager would not
        self.config, self.recursion = config, recursion
        n_r, d = recursion.num_recursions, config.hidden_size
        block_layers = middle_cycle_layers(config.num_hidden_layers, n_r)
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.first = LlamaDecoderLayer(config, 0)
        self.block = nn.ModuleList(LlamaDecoderLayer(config, 1 + j) for j in range(block_layers))  # Phi', shared
        self.last = LlamaDecoderLayer(config, block_layers + 1)
        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        if recursion.routing == "expert":
            self.routers = nn.ModuleList(nn.Linear(d, 1) for _ in range(n_r))  # theta_r
            if recursion.causal_router == "aux_router":
                self.aux_routers = nn.ModuleList(nn.Linear(d, 1) for _ in range(n_r))
        elif recursion.routing == "token":
            self.router = nn.Linear(d, n_r)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _layer(self, layer: nn.Module, h: torch.Tensor, positions, mask) -> torch.Tensor:
        out = layer(h, attention_mask=mask, position_embeddings=positions)
        return out[0] if isinstance(out, tuple) else out

    def apply_block(self, h: torch.Tensor, active: torch.Tensor, positions) -> torch.Tensor:
        """Block(h) at the active tokens, h elsewhere: attention only among the active tokens (recursion-wise KV).

        The active tokens of each row are gathered, in order, into a sequence of K (the most
        any row has) with their own rotary positions; rows with fewer are padded, and padding
        is never attended to.
        """
        B, T, D = h.shape
        counts = active.sum(1)
        K = int(counts.max())
        if K == 0:
            return h
        # active positions first, in increasing order (stable sort), then the rest as padding
        idx = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :K]  # [B, K]
        valid = torch.arange(K, device=h.device)[None] < counts[:, None]  # [B, K]
        causal = torch.ones(K, K, dtype=torch.bool, device=h.device).tril()
        # a padded query attends to itself only, so its (discarded) row is finite
        mask = (causal & valid[:, None, :]) | torch.eye(K, dtype=torch.bool, device=h.device)
        x = h.gather(1, idx[..., None].expand(-1, -1, D))
        cos, sin = (p.expand(B, -1, -1).gather(1, idx[..., None].expand(-1, -1, p.shape[-1])) for p in positions)
        for layer in self.block:
            x = self._layer(layer, x, (cos, sin), mask[:, None])
        # write back only the valid rows (padding points at inactive positions, which must keep h)
        x = torch.where(valid[..., None], x, h.gather(1, idx[..., None].expand(-1, -1, D)))
        return h.scatter(1, idx[..., None].expand(-1, -1, D), x)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_) -> RecursionOutput:
        B, T = input_ids.shape
        rc = self.recursion
        h = self.embed_tokens(input_ids)
        positions = self.rotary_emb(h, torch.arange(T, device=h.device)[None])
        full = torch.ones(B, T, dtype=torch.bool, device=h.device)
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()[None, None]
        h = self._layer(self.first, h, positions, causal)
        depths = torch.zeros(B, T, dtype=torch.long, device=h.device)
        selected: list[torch.Tensor] = []
        routing_loss = h.new_zeros(())
        if rc.routing == "none":
            for _ in range(rc.num_recursions):
                h = self.apply_block(h, full, positions)
                selected.append(full)
        elif rc.routing == "expert":
            h, routing_loss, selected = self._expert_choice(h, positions)
        else:
            h, routing_loss, selected = self._token_choice(h, positions)
        for s in selected:
            depths = depths + s.long()
        h = self._layer(self.last, h, positions, causal)
        logits = self.lm_head(self.norm(h))
        lm_loss = loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            weight = {"expert": rc.aux_coeff, "token": rc.balance_coeff, "none": 0.0}[rc.routing]
            loss = lm_loss + weight * routing_loss
        return RecursionOutput(logits, loss, lm_loss, routing_loss.detach(), depths, selected)

    def _expert_choice(self, h: torch.Tensor, positions):
        rc = self.recursion
        B, T, _ = h.shape
        active = torch.ones(B, T, dtype=torch.bool, device=h.device)
        bce, selected = h.new_zeros(()), []
        for r in range(rc.num_recursions):
            logit = self.routers[r](h).squeeze(-1).float()  # theta_r^T H^r, [B, T]
            g = rc.alpha * torch.sigmoid(logit)  # g^r_t
            aux = self.aux_routers[r](h.detach()).squeeze(-1).float() if rc.causal_router == "aux_router" else logit
            if self.training:
                k = max(1, int(rc.capacity[r] * T))
                # top-k among the tokens recursion r-1 kept: hierarchical filtering
                top = logit.masked_fill(~active, float("-inf")).topk(k, dim=1).indices
                chosen = torch.zeros_like(active).scatter(1, top, True) & active
                # the causal predictor learns top-k membership, on the tokens that were candidates
                bce = bce + F.binary_cross_entropy_with_logits(aux[active], chosen[active].float())
            elif rc.capacity[r] == 1:
                chosen = active  # a recursion that keeps the whole sequence needs no decision
            else:
                chosen = active & (aux > 0)  # sigma(aux) > 1/2: decided by the token's own state, causally
            update = self.apply_block(h, chosen, positions) - h  # f(H^r), zero where not chosen
            h = h + (g * chosen)[..., None].to(h.dtype) * update
            active = chosen
            selected.append(chosen)
        return h, bce / rc.num_recursions, selected

    def _token_choice(self, h: torch.Tensor, positions):
        rc = self.recursion
        p = torch.softmax(self.router(h).float(), dim=-1)  # [B, T, N_r]
        depth = p.argmax(-1)  # i_t - 1
        g = rc.alpha * p.gather(-1, depth[..., None])  # g_t, [B, T, 1]
        h1, selected = h, []
        for r in range(rc.num_recursions):
            chosen = depth >= r
            h = self.apply_block(h, chosen, positions)  # ungated inside: a token keeps its state after it exits
            selected.append(chosen)
        h = h1 + g.to(h.dtype) * (h - h1)
        f = F.one_hot(depth, rc.num_recursions).float().flatten(0, 1).mean(0)  # f_j: share sent to depth j
        balance = rc.num_recursions * (f * p.flatten(0, 1).mean(0)).sum()  # N_r sum_j f_j P_j
        return h, balance, selected


def mixture_of_recursions(config: LlamaConfig, **recursion) -> MixtureOfRecursions:
    """MoR from any Llama-style config: ``mixture_of_recursions(config, routing="expert", num_recursions=3)``."""
    return MixtureOfRecursions(config, RecursionConfig(**recursion))


def unique_block_parameters(model: MixtureOfRecursions) -> int:
    """Non-embedding parameters that are not the routers: first + shared block + last layers + final norm."""
    return sum(p.numel() for m in (model.first, model.block, model.last, model.norm) for p in m.parameters())


def kv_cache_entries(selected: list[torch.Tensor], block_layers: int, unique_layers: int = 2,
                     sharing: bool = False) -> torch.Tensor:
    """[B] key-value entries (token x layer) a sequence leaves in the cache.

    Recursion-wise caching stores a token's keys and values at recursion r only if it is
    active there: unique layers x T + block layers x sum_r |active_r|. Recursive KV
    sharing stores recursion 1's only: (unique + block layers) x T. Multiply by
    2 x kv heads x head dim x bytes per value for bytes.
    """
    T = selected[0].shape[1]
    if sharing:
        return torch.full((selected[0].shape[0],), (unique_layers + block_layers) * T)
    return unique_layers * T + block_layers * sum(s.sum(1) for s in selected)
