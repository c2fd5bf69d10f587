r"""Lynx: Enabling Efficient MoE Inference through Dynamic Batch-Aware Expert Selection
(Gupta, Sinha, Gavrilovska, Iyer; arXiv:2411.08982).

A mixture-of-experts (MoE) layer sends each token to its top-$k$ of $N$ experts, so
one token touches few weights. A served model decodes a *batch* of $B$ sequences at
once, and the union of their top-$k$ sets soon covers nearly all $N$ experts. Decode
is memory-bound, so its cost grows with the number of *distinct* experts whose
weights a step must read, and batching gives MoE's sparsity away. Lynx takes it
back at run time. At each decode step, in each MoE layer, it looks at the router
scores of the whole batch, keeps only the experts that matter to the batch, and
re-routes every token to its best $k$ experts inside that reduced set. Prefill,
which is compute-bound and more sensitive to expert substitution, keeps full routing.
The paper's observations drive the rule: within a batch expert use is skewed; a
token depends mostly on its top-1 expert and little on lower-ranked ones; how much
a token cares about an assignment can be read off its router scores.

With router probabilities $p_{t,e} = \mathrm{softmax}(z_t)_e$ for token $t$ of the
batch and $\mathcal{T}_t$ its top-$k$ experts, one decode step of one layer does:

1. *Critical assignments.* An assignment is critical when the router scores it close
   to the token's top-1 expert $e_t^{(1)}$ (a low-confidence token, sensitive to losing
   it); each token's top-1 is always critical:
   $$ c_{t,e} = \big[\, e \in \mathcal{T}_t \,\wedge\, \log p_{t,e} - \log p_{t,e_t^{(1)}} \ge -\delta \,\big]. $$
2. *Batch importance.* Assignments that are not critical (the secondary experts of
   confident tokens) are filtered out; what is left is summed over the batch:
   $$ w_e = \sum_{t=1}^{B} c_{t,e}\, p_{t,e}. $$
3. *Kept set.* The at most $m$ experts with the largest $w_e > 0$:
   $ \mathcal{S} = \operatorname{top}_m \{ e : w_e > 0 \} $, so $|\mathcal{S}| \le \min(m, N)$
   and a batch of confident tokens keeps fewer. $m$ = ``num_kept`` (None: no cap).
4. *Re-routing.* Every token takes its top-$k$ inside the kept set,
   $ \mathcal{T}'_t = \operatorname{top}_k \{ p_{t,e} : e \in \mathcal{S} \} $, with the
   router's own weights (renormalised over $\mathcal{T}'_t$ when the model renormalises
   its top-$k$, e.g. Mixtral). The paper's less lossy variant (``protect_critical``)
   lets each token keep its critical assignments even outside $\mathcal{S}$.

Experts outside the active set receive no token, and transformers' experts modules
(eager loop, ``grouped_mm``) only run experts that receive tokens, so the dropped
experts' weights are neither read nor multiplied. Tokens whose top-$k$ already lies
in the kept set keep the router's output unchanged, bit for bit.

Implementation notes and deviations:

- The review this project follows describes the paper's first version (v1): all
  experts in prefill; in decode, split the batch's tokens into sensitive and
  insensitive by router confidence, drop the experts only insensitive tokens ask for,
  keep the experts the batch uses most, route everyone to top-$k$ among them (or, less
  lossy, let sensitive tokens keep all of theirs). v1 gives no formula for the
  confidence test or the "most used" ranking, and no code is public (searched the
  code index and GitHub for an official repository: none). We make both concrete
  as above: confidence is the log-ratio to the top-1 score, as the later versions
  (v2/v3, "AffinityBinning") also use, with one margin $\delta$ (default $\ln 2$: a
  secondary expert at least half as likely as the top-1 is critical); "most used" is
  the summed router probability of the surviving assignments. v3 replaces the fixed
  budget with a batch-size-based exponential weighting over binned log-ratios
  ($w_e = \sum_t B^{\mathrm{bin}(t,e)}$) and a data-dependent size; we keep v1's
  simpler fixed cap $m$ and do not implement the binning.
- Which layers are reduced is a parameter (``layers``); the paper finds middle layers
  the most sensitive, and the experiment measures per-layer sensitivity.
- Hooks only, on unmodified HF models whose router returns
  ``(router_logits, top_k_weights, top_k_index)`` with softmax-then-top-$k$ routing
  (Mixtral, Qwen2-MoE, Qwen3-MoE in transformers 5). A forward pre-hook on each
  sparse-MoE block reads the ``[batch, seq]`` shape; a forward hook on its router
  rewrites the router's output. The first call checks that the router really
  computes softmax-top-$k$ from its logits and raises ValueError otherwise (for
  instance for sigmoid or biased routers), instead of re-routing wrongly.
- Phase: with ``prefill_tokens=None`` (generation with a KV cache) a forward of one
  new token per sequence is a decode step and longer forwards are prefill. With
  ``prefill_tokens=P`` a forward is read as *teacher-forced decoding*: positions
  $< P$ are prefill and each later position $s$ is one decode step whose batch is the
  $B$ sequences at $s$. The two agree exactly for sequences decoded in lock-step (a
  test checks it), which is how the experiment evaluates quality.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from paperzoo.compression import Compressed
from paperzoo.core.models import decoder_layers

_MOE_BLOCK_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class LynxConfig:
    num_kept: int | None = None  # m: at most this many experts per layer and decode step (None: no cap)
    affinity_margin: float = math.log(2)  # delta: log p_e - log p_top1 >= -delta makes an assignment critical
    protect_critical: bool = False  # the paper's less lossy variant: critical assignments always kept
    layers: tuple[int, ...] | None = None  # decoder-layer indices to reduce (None: every MoE layer)

    def __post_init__(self):
        if self.num_kept is not None and (not _is_int(self.num_kept) or self.num_kept < 1):
            raise ValueError(f"num_kept must be None or an integer >= 1 (experts kept per step), got {self.num_kept!r}")
        if isinstance(self.affinity_margin, bool) or not isinstance(self.affinity_margin, (int, float)) \
                or not self.affinity_margin >= 0:
            raise ValueError(f"affinity_margin must be a number >= 0 (inf keeps every assignment critical), "
                             f"got {self.affinity_margin!r}")
        if not isinstance(self.protect_critical, bool):
            raise ValueError(f"protect_critical must be True or False, got {self.protect_critical!r}")
        if self.layers is not None and (isinstance(self.layers, (str, bytes))
                                        or not all(_is_int(i) and i >= 0 for i in self.layers)):
            raise ValueError(f"layers must be None or decoder-layer indices (integers >= 0), got {self.layers!r}")


@dataclass
class MoELayer:
    index: int  # decoder-layer index
    block: nn.Module  # the sparse-MoE block (router + experts)
    router: nn.Module
    experts: nn.Module
    top_k: int
    num_experts: int
    normalize: bool  # whether the router renormalises its top-k probabilities to sum to one


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every decoder layer's sparse-MoE block, its router and experts (dense layers are skipped)."""
    _, layers = decoder_layers(model)
    found = []
    for i, layer in enumerate(layers):
        for name in _MOE_BLOCK_NAMES:
            block = getattr(layer, name, None)
            router, experts = getattr(block, "gate", None), getattr(block, "experts", None)
            if isinstance(router, nn.Module) and isinstance(experts, nn.Module) and hasattr(router, "top_k"):
                found.append(MoELayer(i, block, router, experts, int(router.top_k), int(router.num_experts),
                                      bool(getattr(router, "norm_topk_prob", True))))
                break
    if not found:
        raise ValueError(f"{type(model).__name__} has no sparse-MoE blocks with a top-k router (block.gate, block.experts)")
    return found


@dataclass
class Selection:
    """Re-routed assignments for G decode steps of B tokens each."""

    indices: torch.Tensor  # [G, B, k] expert ids
    weights: torch.Tensor  # [G, B, k] mixing weights (0 in padding slots)
    kept: torch.Tensor  # [G, N] bool: the kept set S of each step


def _route(p: torch.Tensor, allowed: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of p among the allowed experts; slots beyond the allowed count get weight 0 on the best one."""
    masked = p.masked_fill(~allowed, -1.0)  # probabilities are >= 0, so -1 sorts below every allowed expert
    top_p, top_i = masked.topk(k, dim=-1)
    valid = top_p >= 0
    if not bool(valid.all()):
        top_i = torch.where(valid, top_i, top_i[..., :1])
        top_p = torch.where(valid, top_p, torch.zeros_like(top_p))
    if normalize:  # the same operations as the HF routers, so an unchanged token keeps its weights bit for bit
        top_p = top_p / top_p.sum(-1, keepdim=True)
    return top_i, top_p


def _active(indices: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[G, N] bool: experts that receive a token (with non-zero weight) at each step."""
    G = indices.shape[0]
    hits = torch.zeros(G, num_experts, dtype=weights.dtype)
    hits.scatter_add_(-1, indices.reshape(G, -1), (weights > 0).to(weights.dtype).reshape(G, -1))
    return hits > 0


def lynx_selection(p: torch.Tensor, k: int, config: LynxConfig, normalize: bool = True) -> Selection:
    """Lynx's batch-aware expert selection (steps 1-4 of the module docstring).

    `p` [G, B, N]: router probabilities of G decode steps, each a batch of B tokens.
    """
    if p.dim() != 3:
        raise ValueError(f"router probabilities must be [steps, batch, experts], got shape {tuple(p.shape)}")
    G, B, N = p.shape
    _check_k(k, N)
    m = config.num_kept
    top_p, top_i = p.topk(k, dim=-1)  # [G, B, k], rank 0 = the token's top-1
    # c_{t,e}: log p_{t,e} - log p_{t,top1} >= -delta, tested without logs; always true at rank 0
    critical = top_p >= top_p[..., :1] * math.exp(-config.affinity_margin)
    w = torch.zeros(G, N, dtype=p.dtype).scatter_add_(  # w_e = sum_t c_{t,e} p_{t,e}
        -1, top_i.reshape(G, -1), (top_p * critical).reshape(G, -1))
    kept = w > 0
    if m is not None and m < N:
        kept &= torch.zeros_like(kept).scatter_(-1, w.topk(m, dim=-1).indices, True)
    allowed = kept[:, None, :].expand(G, B, N)
    if config.protect_critical:
        own = torch.zeros(G, B, N, dtype=torch.bool).scatter_(-1, top_i, critical)
        allowed = allowed | own
    indices, weights = _route(p, allowed, k, normalize)
    return Selection(indices, weights, kept)


def _check_k(k, num_experts: int) -> None:
    if not _is_int(k) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an integer from 1 to the {num_experts} experts, got {k!r}")


def matched_random_selection(p: torch.Tensor, k: int, config: LynxConfig, generator: torch.Generator,
                             normalize: bool = True) -> Selection:
    """Random expert dropping at Lynx's budget: the control with the same number of experts per step.

    At each step, as many experts as Lynx would keep (`config`) are drawn uniformly from those the
    batch's tokens request (the union of their top-k), and every token is routed top-k inside them,
    exactly as Lynx re-routes. Lynx's kept set is always a subset of the requested experts, and every
    kept expert then receives a token in both policies, so the distinct experts per step are equal;
    only *which* experts are kept differs: router confidence against chance.
    """
    if config.protect_critical:
        raise ValueError("matched_random_selection matches Lynx's kept-set size, which protect_critical=True "
                         "exceeds; use protect_critical=False")
    lynx = lynx_selection(p, k, config, normalize)
    G, B, N = p.shape
    sizes = lynx.kept.sum(-1)  # [G]
    requested = torch.zeros(G, N, dtype=torch.bool).scatter_(-1, p.topk(k, dim=-1).indices.reshape(G, -1), True)
    draw = torch.rand(G, N, generator=generator).masked_fill(~requested, -1.0)  # requested experts sort first
    rank = draw.argsort(-1, descending=True).argsort(-1)
    kept = requested & (rank < sizes[:, None])
    indices, weights = _route(p, kept[:, None, :].expand(G, B, N), k, normalize)
    return Selection(indices, weights, kept)


def static_top_k_selection(p: torch.Tensor, k: int, normalize: bool = True) -> Selection:
    """The static baseline: every token keeps only its own top-k experts (e.g. top-1), batch-blind."""
    _check_k(k, p.shape[-1])
    top_p, top_i = p.topk(k, dim=-1)
    if normalize:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    return Selection(top_i, top_p, _active(top_i, top_p, p.shape[-1]))


@dataclass
class RoutingStats:
    """Distinct experts per decode step, summed over steps, for one MoE layer."""

    steps: int = 0
    active: int = 0  # sum over steps of |experts that received a token| after the policy
    full: int = 0  # the same for the model's own top-k routing
    kept_history: list = field(default_factory=list)  # [N] bool masks, only when recording

    @property
    def mean_active(self) -> float:
        return self.active / self.steps if self.steps else float("nan")

    @property
    def mean_full(self) -> float:
        return self.full / self.steps if self.steps else float("nan")


Policy = Callable[[torch.Tensor, int, bool], Selection]  # (p [G, B, N], k, normalize) -> Selection


class ExpertSelection:
    """Hooks that apply a batch-level routing policy to the decode steps of an HF MoE model.

    Use as a context manager or call `remove()`. With `track=True`, `stats[layer]` counts
    distinct experts per decode step (turn it off when timing); with `record=True` it
    also keeps every step's kept set.
    """

    def __init__(self, model: nn.Module, policy: Policy, layers: tuple[int, ...] | None = None,
                 prefill_tokens: int | None = None, track: bool = True, record: bool = False):
        if prefill_tokens is not None and (not _is_int(prefill_tokens) or prefill_tokens < 0):
            raise ValueError(f"prefill_tokens must be None or an integer >= 0, got {prefill_tokens!r}")
        if not callable(policy):
            raise ValueError(f"policy must be callable as policy(p, k, normalize), got {type(policy).__name__}")
        moe = moe_layers(model)
        available = [m.index for m in moe]
        if layers is not None and not set(layers) <= set(available):
            raise ValueError(f"layers {sorted(set(layers) - set(available))} have no MoE block (MoE layers: {available})")
        self.policy, self.prefill_tokens, self.track, self.record = policy, prefill_tokens, track, record
        self.layers = [m for m in moe if layers is None or m.index in layers]
        self.stats = {m.index: RoutingStats() for m in self.layers}
        self._shape: dict[int, tuple[int, int]] = {}
        self._checked: set[int] = set()
        self._handles = []
        for layer in self.layers:
            self._handles.append(layer.block.register_forward_pre_hook(self._read_shape(layer)))
            self._handles.append(layer.router.register_forward_hook(self._reroute(layer)))

    def _read_shape(self, layer: MoELayer):
        def hook(module, args):
            x = args[0]
            if x.dim() != 3:
                raise ValueError(f"MoE block of layer {layer.index} got input of shape {tuple(x.shape)}; expected [batch, seq, d]")
            self._shape[layer.index] = (x.shape[0], x.shape[1])
        return hook

    def _check_router(self, layer: MoELayer, p: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor) -> None:
        top_p, top_i = p.topk(layer.top_k, dim=-1)
        if layer.normalize:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        tol = 1e-2 if scores.dtype in (torch.bfloat16, torch.float16) else 1e-4
        if indices.shape != top_i.shape or not torch.equal(indices, top_i) or not torch.allclose(
                scores.float(), top_p, rtol=tol, atol=tol):
            raise ValueError(f"the router of layer {layer.index} ({type(layer.router).__name__}) is not softmax-top-k "
                             "routing; Lynx's re-routing would be wrong for it")
        self._checked.add(layer.index)

    def _reroute(self, layer: MoELayer):
        def hook(module, args, output):
            if not (isinstance(output, tuple) and len(output) == 3):
                raise ValueError(f"router of layer {layer.index} must return (logits, weights, indices)")
            logits, scores, indices = output
            B, S = self._shape.pop(layer.index)
            P = self.prefill_tokens
            if P is None:  # generation with a KV cache: one new token per sequence is a decode step
                first = 0 if S == 1 else S
            else:  # teacher-forced decoding: positions >= P are decode steps
                first = min(P, S)
            if first >= S:
                return output
            with torch.no_grad():
                p = torch.softmax(logits.float(), dim=-1)  # [B*S, N]
                if layer.index not in self._checked:
                    self._check_router(layer, p, scores, indices)
                N, k = p.shape[-1], indices.shape[-1]
                p_steps = p.view(B, S, N)[:, first:].transpose(0, 1)  # [G, B, N], one row per decode step
                sel = self.policy(p_steps, k, layer.normalize)
                old_i = indices.view(B, S, k)[:, first:].transpose(0, 1)  # [G, B, k]
                old_w = scores.view(B, S, k)[:, first:].transpose(0, 1)
                new_i, new_w = sel.indices, sel.weights.to(scores.dtype)
                if new_i.shape[-1] != k and first > 0:
                    raise ValueError("a policy that changes k cannot share a forward with prefill positions")
                if first > 0:
                    new_i = torch.cat([indices.view(B, S, k)[:, :first], new_i.transpose(0, 1)], 1)
                    new_w = torch.cat([scores.view(B, S, k)[:, :first], new_w.transpose(0, 1)], 1)
                else:
                    new_i, new_w = new_i.transpose(0, 1), new_w.transpose(0, 1)
                if self.track:
                    stats = self.stats[layer.index]
                    stats.steps += p_steps.shape[0]
                    stats.active += int(_active(sel.indices, sel.weights, N).sum())
                    stats.full += int(_active(old_i, torch.ones_like(old_w), N).sum())
                    if self.record:
                        stats.kept_history.extend(sel.kept.clone())
            return logits, new_w.reshape(B * S, -1), new_i.reshape(B * S, -1)
        return hook

    def mean_active_experts(self) -> float:
        """Distinct experts per decode step and layer, averaged over both."""
        steps = sum(s.steps for s in self.stats.values())
        return sum(s.active for s in self.stats.values()) / steps if steps else float("nan")

    def mean_full_experts(self) -> float:
        steps = sum(s.steps for s in self.stats.values())
        return sum(s.full for s in self.stats.values()) / steps if steps else float("nan")

    def reset_stats(self) -> None:
        self.stats = {m.index: RoutingStats() for m in self.layers}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_lynx(model: nn.Module, config: LynxConfig = LynxConfig(), prefill_tokens: int | None = None,
               track: bool = True, record: bool = False) -> ExpertSelection:
    """Install Lynx on `model`'s decode steps (see `ExpertSelection` for `prefill_tokens`)."""
    if not isinstance(config, LynxConfig):
        raise ValueError(f"config must be a LynxConfig, got {type(config).__name__}")

    def policy(p, k, normalize):
        return lynx_selection(p, k, config, normalize)
    return ExpertSelection(model, policy, config.layers, prefill_tokens, track=track, record=record)


def apply_matched_random(model: nn.Module, config: LynxConfig = LynxConfig(), seed: int = 0,
                         prefill_tokens: int | None = None, track: bool = True) -> ExpertSelection:
    """Install the matched random-dropping control (`matched_random_selection`) on `model`'s decode steps."""
    if not isinstance(config, LynxConfig):
        raise ValueError(f"config must be a LynxConfig, got {type(config).__name__}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if config.protect_critical:
        raise ValueError("the matched random control needs protect_critical=False (see matched_random_selection)")
    generator = torch.Generator().manual_seed(seed)

    def policy(p, k, normalize):
        return matched_random_selection(p, k, config, generator, normalize)
    return ExpertSelection(model, policy, config.layers, prefill_tokens, track=track)


def apply_static_top_k(model: nn.Module, k: int, layers: tuple[int, ...] | None = None,
                       prefill_tokens: int | None = None, track: bool = True) -> ExpertSelection:
    """The static baseline: top-`k` per token at decode steps (k below the model's own), whatever the batch."""
    top_k = {m.top_k for m in moe_layers(model)}
    if not _is_int(k) or not 1 <= k <= min(top_k):
        raise ValueError(f"k must be an integer from 1 to the model's top-k {min(top_k)}, got {k!r}")
    if k < min(top_k) and prefill_tokens not in (None, 0):
        # k changes the routing tensors' width, which must be uniform over one forward's tokens
        def policy(p, model_k, normalize):
            sel = static_top_k_selection(p, k, normalize)
            pad = model_k - k  # padding slots: zero weight on the token's own top-1
            return Selection(torch.cat([sel.indices, sel.indices[..., :1].expand(*sel.indices.shape[:-1], pad)], -1),
                             torch.cat([sel.weights, torch.zeros(*sel.weights.shape[:-1], pad)], -1),
                             sel.kept)
    else:
        def policy(p, model_k, normalize):
            return static_top_k_selection(p, k, normalize)
    return ExpertSelection(model, policy, layers, prefill_tokens, track=track)


def compress(model: nn.Module, config: LynxConfig = LynxConfig(), inplace: bool = False) -> Compressed:
    """The family interface: a copy of `model` (or `model` itself) that runs Lynx whenever it generates.

    No weight changes; the hooks stay on the returned model for its lifetime.
    """
    import copy

    if not isinstance(config, LynxConfig):
        raise ValueError(f"config must be a LynxConfig, got {type(config).__name__}")
    moe_layers(model)  # refuse a dense model before copying it
    model = model if inplace else copy.deepcopy(model)
    handle = apply_lynx(model, config)
    return Compressed(model, {
        "method": "Lynx batch-aware expert selection (2411.08982)",
        "moe_layers": [m.index for m in moe_layers(model)],
        "reduced_layers": [m.index for m in handle.layers],
        "num_kept": config.num_kept,
        "affinity_margin": config.affinity_margin,
        "protect_critical": config.protect_critical,
        "size_ratio": 1.0,  # no weight is removed: the reduction happens per decode step
    })


# ---------------------------------------------------------------------------------------------
# A small trained MoE to run Lynx on (paperzoo's base LMs are dense); a shared, cached substrate.


@dataclass(frozen=True)
class TinyMoEConfig:
    """A Mixtral-style decoder (top-k softmax router, load-balancing loss) sized for a CPU."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    aux_loss_coef: float = 0.01
    max_seq_len: int = 128

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_experts", "top_k",
                     "max_seq_len"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"TinyMoEConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"TinyMoEConfig.hidden_size {self.hidden_size} must be divisible by num_heads "
                             f"{self.num_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"TinyMoEConfig.top_k must be at most num_experts ({self.num_experts}), got {self.top_k}")
        if not 0 <= self.aux_loss_coef < math.inf:
            raise ValueError(f"TinyMoEConfig.aux_loss_coef must be a finite number >= 0, got {self.aux_loss_coef!r}")

    def build(self, vocab_size: int) -> nn.Module:
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralForCausalLM(MixtralConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads, num_key_value_heads=self.num_heads,
            num_local_experts=self.num_experts, num_experts_per_tok=self.top_k, max_position_embeddings=self.max_seq_len,
            router_aux_loss_coef=self.aux_loss_coef, output_router_logits=True,  # the load-balancing loss trains
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0))


def trained_tiny_moe(lm, config: TinyMoEConfig, train_config, seed: int = 0, name: str = "moe-lm"):
    """A tiny MoE trained on `lm`'s tokenizer and training corpus, cached; a `LanguageModel` on the same corpus.

    `lm` is a `paperzoo.core.models.LanguageModel` (a dense base LM: only its tokenizer and
    corpus are used) and `train_config` a `paperzoo.core.training.TrainConfig` whose
    ``seq_len`` is at most ``config.max_seq_len``. Trained on first use (with a progress
    bar) and cached under the hash of everything that fixes the weights; every load is
    noted as substrate, so a run's record carries the MoE's card.
    """
    import time
    from dataclasses import asdict

    from transformers import MixtralForCausalLM

    from paperzoo.core import store
    from paperzoo.core.models import LanguageModel, load_trained, save_trained
    from paperzoo.core.training import TrainConfig, train

    if not isinstance(config, TinyMoEConfig):
        raise ValueError(f"config must be a TinyMoEConfig, got {type(config).__name__}")
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    if train_config.seq_len > config.max_seq_len:
        raise ValueError(f"train_config.seq_len must be at most config.max_seq_len ({config.max_seq_len}), "
                         f"got {train_config.seq_len}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    tokenizer = lm.tokenizer
    key = store.stable_hash(["moe-lm-v2", asdict(config), asdict(train_config), seed, lm.corpus.fingerprint,
                             tokenizer.backend_tokenizer.to_str()])
    path = store.home() / "models" / f"{name}-{key}"

    def build(tmp) -> None:
        torch.manual_seed(seed)
        model = config.build(len(tokenizer))
        start = time.perf_counter()
        history = train(model, lm.blocks("train", train_config.seq_len), train_config,
                        val_blocks=lm.blocks("validation", train_config.seq_len)[:64],
                        desc=f"training the tiny MoE LM {name} (cached afterwards)", seed=seed)
        record = {"config": asdict(config), "train": asdict(train_config), "seed": seed, "corpus": lm.corpus.name,
                  "train_seconds": time.perf_counter() - start,
                  "card": {"architecture": f"Mixtral-style MoE, {config.num_experts} experts, top-{config.top_k}",
                           "validation_curve": [{"step": v["step"], "perplexity": round(v["perplexity"], 2)}
                                                for v in history["val"]],
                           "tokens_per_second": round(history["tokens_per_second"])},
                  **history}
        save_trained(tmp, model, tokenizer, record)

    model, saved_tokenizer, record = load_trained(store.cached_dir(path, build), model_class=MixtralForCausalLM)
    model.config.output_router_logits = False  # the auxiliary loss is for training only
    return LanguageModel(f"paperzoo {name} ({path.name})", model, saved_tokenizer or tokenizer, lm.corpus,
                         train_config.seq_len, trained_here=True, record=record)
