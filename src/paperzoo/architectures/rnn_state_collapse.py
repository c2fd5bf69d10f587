r"""Stuffed Mamba: State Collapse and State Capacity of RNN-Based Long-Context Modeling (Chen et al., arXiv:2410.07145).

A Mamba-2 layer keeps, per head, a matrix state $h_t \in \mathbb{R}^{P \times N}$ ($P$ the head
width, $N$ the state size ``d_state``) and updates it with a scalar, input-dependent decay:

$$\Delta_t = \mathrm{softplus}(w_\Delta^\top u_t + b_\Delta), \qquad \alpha_t = \exp(-\Delta_t a), \qquad
h_t = \alpha_t h_{t-1} + \Delta_t\, x_t B_t^\top, \qquad y_t = h_t C_t + D x_t,$$

so $h_t = \sum_{i \le t} \alpha_{i+1:t}\, \Delta_i x_i B_i^\top$ with $\alpha_{i:t} = \prod_{j=i}^{t} \alpha_j$
(the paper's Eq. for the unrolled state). The paper finds that a model trained on sequences
shorter than its state can hold learns to *never forget*: some channels keep $\alpha \approx 1$,
their magnitude grows past the training length until a few outlier channels dominate and the
output breaks (*state collapse*, SC). It proposes three training-free fixes (its Sec. 5):

1. **More forgetting, less memorising**: scale $\Delta_t$ up (faster decay $\alpha_t$) or $B_t$
   down (less inserted per token). Here ``StateFix(delta_scale=s)`` uses $s \Delta_t$ and
   ``StateFix(b_scale=s)`` uses $s B_t$.
2. **State normalisation**: after each update, if the state's norm passes a threshold $p$,
   shrink it onto the sphere of radius $p$:
   $\hat h_t = \alpha_t h_{t-1} + \Delta_t x_t B_t^\top$,
   $h_t = \hat h_t\, p / \lVert\hat h_t\rVert$ if $\lVert \hat h_t \rVert > p$ else $\hat h_t$.
   The norm is each head's Frobenius norm and $p$ one threshold per head, as in the official
   code (``use_state_norm(norm_thresholds)``: one float per head); `calibrate_state_norm` sets
   $p$ from the final state's norm on training-length inputs, as the official
   ``start_state_norm`` does (times a multiplier).
3. **Sliding window by state difference**: read out from the state of the last $r$ tokens only,
   $h^{(r)}_t = \sum_{i=t-r+1}^{t} \alpha_{i+1:t} \Delta_i x_i B_i^\top = h_t - \alpha_{t-r+1:t}\, h_{t-r}$,
   while the recurrence itself carries the full $h_t$ on.

Two scans compute the same map: `ssd_sequential` (one step per token; the only one that can
apply state normalisation, which is not linear) and `ssd_chunked` (Mamba-2's chunked "SSD" form:
within a chunk of $Q$ tokens the quadratic form
$y_t = \sum_{i \le t} e^{\ell_{i+1:t}} (C_t^\top B_i) \Delta_i x_i$, $\ell = \log \alpha$,
across chunks the state is passed on). `Mamba2Mixer` is the whole layer, ``[B, T, D] -> [B, T, D]``
and causal, installable as the ``mixer`` slot of `paperzoo.core.blocks.swap`
(`mamba2_mixer_factory`); `apply_fix` sets a `StateFix` on every such layer of a model.

Deviations from the paper and the official code (thunlp/stuffed-mamba):

- One group of $B, C$ shared by all heads (Mamba-2's ``ngroups = 1``), no tensor parallelism,
  no fused kernels; the scans are plain PyTorch in the input's dtype (fp32 in training: the
  autocast is switched off inside them, products of many bf16 decays drift).
- State normalisation is applied at every token, as the paper's equation writes it. The
  official passkey code applies it once every 128 tokens (chunk by chunk); and its rescaling
  multiplies by $\lVert h\rVert / p$ rather than $p / \lVert h\rVert$, which we read as a slip.
- The forgetting fix scales $\Delta_t$ after the softplus, in both the decay and the insertion
  (Mamba-2's $\bar B_t = \Delta_t B_t$): the paper's description. The official code's
  ``dt_mult`` scales the pre-softplus projection instead, bias excluded.
- The sliding-window read-out in `ssd_chunked` sums the last $r$ terms directly (a banded
  quadratic form), which equals $h_t - \alpha_{t-r+1:t} h_{t-r}$ exactly but does not lose
  precision to cancellation when $h_t$ has grown large; `ssd_sequential` uses the difference
  as the paper writes it. The window and state normalisation are not combined.
- The layer around the scan follows Mamba-2 (in-projection to $z, x, B, C, \Delta$; a causal
  depthwise convolution of width 4 and SiLU on $x, B, C$; a skip $D$; gated RMSNorm
  $\mathrm{norm}(y \odot \mathrm{SiLU}(z))$; out-projection) at tiny width, with
  $a = e^{A_{\log}}$, $A_{\log}$ initialised to $\log U(1, 16)$ and $\Delta$'s bias so that
  $\Delta \sim \log U(10^{-3}, 10^{-1})$ at initialisation, Mamba-2's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StateFix:
    """The paper's training-free fixes (Sec. 5). The default changes nothing."""

    delta_scale: float = 1.0  # Delta_t -> s * Delta_t: faster decay ("forget more")
    b_scale: float = 1.0  # B_t -> s * B_t: less written per token ("remember less")
    state_norm: bool = False  # rescale each head's state to norm p when it passes p (thresholds set by calibration)
    window: int | None = None  # r: read out from the state of the last r tokens only

    def __post_init__(self):
        if self.state_norm and self.window is not None:
            raise ValueError("state normalisation and the sliding window are separate fixes: choose one")
        if self.window is not None and self.window < 1:
            raise ValueError(f"the window must hold at least one token, not {self.window}")


NO_FIX = StateFix()


def _unsqueeze_heads(v: torch.Tensor) -> torch.Tensor:
    return v[..., None, None]


def ssd_sequential(x: torch.Tensor, delta: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   p: torch.Tensor | None = None, window: int | None = None):
    r"""The recurrence one token at a time; returns (y [b, T, H, P], state norms [b, T, H], final state [b, H, P, N]).

    x [b, T, H, P], delta [b, T, H], a [H] (> 0), B and C [b, T, N]. `p` [H]: state-normalisation
    thresholds (None: off). `window` r: read out $h_t - \alpha_{t-r+1:t} h_{t-r}$. The state norms
    are those of $h_t$ after normalisation (the window changes the read-out only).
    """
    b, T, H, P = x.shape
    h = x.new_zeros(b, H, P, B.shape[-1])
    log_alpha = -delta * a  # [b, T, H]
    if window is not None:
        past = []  # h_{t-r} .. h_t: the states the difference needs
        cum = F.pad(log_alpha.cumsum(1), (0, 0, 1, 0))  # cum[:, t] = sum_{j < t} log alpha_j
    ys, norms = [], []
    for t in range(T):
        # h_t = alpha_t h_{t-1} + Delta_t x_t B_t^T
        h = _unsqueeze_heads(log_alpha[:, t].exp()) * h + \
            (delta[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        norm = h.flatten(2).norm(dim=-1)  # [b, H]
        if p is not None:
            # h_t = h_t p / ||h_t|| when ||h_t|| > p
            scale = torch.where(norm > p, p / norm.clamp_min(1e-30), torch.ones_like(norm))
            h = _unsqueeze_heads(scale) * h
            norm = norm * scale
        read = h
        if window is not None:
            past.append(h)
            if len(past) > window:
                # h_t^{(r)} = h_t - alpha_{t-r+1:t} h_{t-r}
                decay = (cum[:, t + 1] - cum[:, t + 1 - window]).exp()
                read = h - _unsqueeze_heads(decay) * past.pop(0)
        ys.append(torch.einsum("bhpn,bn->bhp", read, C[:, t]))
        norms.append(norm)
    return torch.stack(ys, 1), torch.stack(norms, 1), h


def _segment_decay(log_alpha: torch.Tensor) -> torch.Tensor:
    r"""[b, L, H] -> [b, H, L, L]: $e^{\ell_{i+1:t}}$ at (t, i) for i <= t, 0 above the diagonal."""
    cum = log_alpha.cumsum(1).transpose(1, 2)  # [b, H, L]
    diff = cum[..., :, None] - cum[..., None, :]
    causal = torch.ones(diff.shape[-2:], dtype=torch.bool, device=diff.device).tril()
    return diff.masked_fill(~causal, -math.inf).exp()  # mask before exp: above the diagonal diff > 0 could overflow


def ssd_chunked(x: torch.Tensor, delta: torch.Tensor, a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk: int = 64, window: int | None = None):
    r"""The chunked (SSD) form; returns (y [b, T, H, P], state norms at chunk ends [b, T // chunk rounded up, H]).

    Inside a chunk: the quadratic form; across chunks: the state,
    $h_{\mathrm{end}} = \alpha_{\mathrm{chunk}} h_{\mathrm{start}} + \sum_i \alpha_{i+1:\mathrm{end}} \Delta_i x_i B_i^\top$.
    With `window` r, every output sums its last r terms only (keys from r - 1 tokens before the chunk).
    """
    b, T, H, P = x.shape
    log_alpha = -delta * a
    xbar = delta[..., None] * x  # Delta_i x_i
    h = x.new_zeros(b, H, P, B.shape[-1])
    ys, norms = [], []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        if window is None:
            L = _segment_decay(log_alpha[:, s:e])  # [b, H, Q, Q]
            scores = torch.einsum("btn,bin->bti", C[:, s:e], B[:, s:e])
            y = torch.einsum("bhti,bti,bihp->bthp", L, scores, xbar[:, s:e])
            # the state carried in decays by alpha_{s:t} before it is read at t
            into = log_alpha[:, s:e].cumsum(1).exp()  # [b, Q, H]
            y = y + torch.einsum("bhpn,btn,bth->bthp", h, C[:, s:e], into)
            decay_out = (log_alpha[:, s:e].sum(1, keepdim=True) - log_alpha[:, s:e].cumsum(1)).exp()  # alpha_{i+1:e}
            h = _unsqueeze_heads(into[:, -1]) * h + torch.einsum("bih,bihp,bin->bhpn", decay_out, xbar[:, s:e], B[:, s:e])
            norms.append(h.flatten(2).norm(dim=-1))
        else:
            k = max(0, s - window + 1)  # the oldest key any query of this chunk may read
            L = _segment_decay(log_alpha[:, k:e])[:, :, s - k:]  # [b, H, Q, e - k]
            t_idx = torch.arange(s, e, device=x.device)[:, None]
            i_idx = torch.arange(k, e, device=x.device)[None, :]
            L = L * (i_idx > t_idx - window)  # i in (t - r, t]
            scores = torch.einsum("btn,bin->bti", C[:, s:e], B[:, k:e])
            y = torch.einsum("bhti,bti,bihp->bthp", L, scores, xbar[:, k:e])
        ys.append(y)
    return torch.cat(ys, 1), (torch.stack(norms, 1) if norms else None)


@dataclass(frozen=True)
class Mamba2Config:
    """A tiny Mamba-2 layer: width `hidden_size`, `expand` x wider inside, heads of `head_dim`, state size `d_state`."""

    hidden_size: int
    d_state: int = 16
    head_dim: int = 16
    expand: int = 2
    conv_width: int = 4
    chunk: int = 64

    @property
    def inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def heads(self) -> int:
        return self.inner // self.head_dim


class Mamba2Mixer(nn.Module):
    """A causal Mamba-2 layer, ``[B, T, D] -> [B, T, D]``, with the paper's training-free fixes (`fix`)."""

    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.config = c = config
        if c.inner % c.head_dim:
            raise ValueError(f"the inner width {c.inner} must be a multiple of head_dim {c.head_dim}")
        self.in_proj = nn.Linear(c.hidden_size, 2 * c.inner + 2 * c.d_state + c.heads, bias=False)
        conv_channels = c.inner + 2 * c.d_state
        self.conv = nn.Conv1d(conv_channels, conv_channels, c.conv_width, groups=conv_channels, padding=c.conv_width - 1)
        self.A_log = nn.Parameter(torch.empty(c.heads).uniform_(1, 16).log())
        dt = torch.empty(c.heads).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt)
        self.D = nn.Parameter(torch.ones(c.heads))
        self.norm = nn.RMSNorm(c.inner)
        self.out_proj = nn.Linear(c.inner, c.hidden_size, bias=False)
        self.fix = NO_FIX
        self.register_buffer("p", torch.full((c.heads,), math.inf), persistent=False)  # state-norm thresholds
        self.record = False  # keep the last forward's state norms in `state_norms`
        self.state_norms: torch.Tensor | None = None
        self.final_state: torch.Tensor | None = None

    def ssm_inputs(self, u: torch.Tensor):
        """u [b, T, D] -> z, x [b, T, H, P], Delta [b, T, H], B, C [b, T, N] (with the fix's scales)."""
        c = self.config
        z, xBC, dt = self.in_proj(u).split([c.inner, c.inner + 2 * c.d_state, c.heads], dim=-1)
        xBC = F.silu(self.conv(xBC.transpose(1, 2))[..., : u.shape[1]].transpose(1, 2))  # causal: left padding only
        x, B, C = xBC.split([c.inner, c.d_state, c.d_state], dim=-1)
        delta = F.softplus(dt + self.dt_bias) * self.fix.delta_scale
        return z, x.unflatten(-1, (c.heads, c.head_dim)), delta, B * self.fix.b_scale, C

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z, x, delta, B, C = self.ssm_inputs(u)
        a = self.A_log.exp()
        with torch.autocast(u.device.type, enabled=False):
            dtype = torch.promote_types(u.dtype, torch.float32)  # bf16 under autocast -> fp32; fp64 stays fp64
            x, delta, B, C = (v.to(dtype) for v in (x, delta, B, C))
            if self.fix.state_norm or self.record:
                p = self.p if self.fix.state_norm else None
                y, norms, self.final_state = ssd_sequential(x, delta, a, B, C, p=p, window=self.fix.window)
            else:
                y, norms = ssd_chunked(x, delta, a, B, C, chunk=self.config.chunk, window=self.fix.window)
            y = y + self.D[:, None] * x
        if self.record:
            self.state_norms = norms.detach()
        y = self.norm(y.flatten(2).to(u.dtype) * F.silu(z))
        return self.out_proj(y)


def mamba2_mixer_factory(d_state: int = 16, head_dim: int = 16, expand: int = 2, chunk: int = 64):
    """A ``mixer`` factory for `paperzoo.core.blocks.swap`: ``factory(hf_config, layer_idx) -> Mamba2Mixer``."""

    def factory(config, layer_idx: int) -> Mamba2Mixer:
        return Mamba2Mixer(Mamba2Config(config.hidden_size, d_state, head_dim, expand, chunk=chunk))

    return factory


def mamba2_mixers(model: nn.Module) -> list[Mamba2Mixer]:
    return [m for m in model.modules() if isinstance(m, Mamba2Mixer)]


def apply_fix(model: nn.Module, fix: StateFix) -> nn.Module:
    """Set `fix` on every Mamba-2 layer of `model` (in place; also returned). `NO_FIX` undoes it."""
    for m in mamba2_mixers(model):
        m.fix = fix
    return model


@torch.no_grad()
def calibrate_state_norm(model: nn.Module, input_ids: torch.Tensor, multiplier: float = 1.0) -> list[torch.Tensor]:
    """Set each layer's thresholds p [H] to `multiplier` x the mean norm of its final state on `input_ids`.

    Run it on training-length inputs: the threshold is then the state norm the model saw in
    training (the official code's ``start_state_norm``). Returns the thresholds per layer.
    """
    mixers = mamba2_mixers(model)
    fixes = [m.fix for m in mixers]
    for m in mixers:
        m.fix, m.record = NO_FIX, True
    was_training = model.training
    model.eval()
    model(input_ids=input_ids)
    model.train(was_training)
    thresholds = []
    for m, fix in zip(mixers, fixes):
        m.p = multiplier * m.state_norms[:, -1].mean(0)
        m.fix, m.record, m.state_norms = fix, False, None
        thresholds.append(m.p.clone())
    return thresholds


@torch.no_grad()
def state_norms(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each Mamba-2 layer's per-head state norm at every position, [b, T, H], under the layers' current fixes."""
    mixers = mamba2_mixers(model)
    for m in mixers:
        m.record = True
    was_training = model.training
    model.eval()
    model(input_ids=input_ids)
    model.train(was_training)
    out = []
    for m in mixers:
        out.append(m.state_norms)
        m.record, m.state_norms = False, None
    return out
