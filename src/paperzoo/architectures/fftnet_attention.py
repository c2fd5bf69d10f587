"""FFTNet: adaptive spectral filtering as a token mixer (arXiv 2502.18394).

*The FFT Strikes Back: An Efficient Alternative to Self-Attention* (Fein-Ashley, 2025)
replaces self-attention with a mixer that works on the Fourier coefficients of the
sequence: a real FFT over tokens, a filter that a small MLP adapts to the input's
global context, a complex nonlinearity (modReLU), and the inverse FFT. Every token
then depends on every other at O(N log N) cost instead of attention's O(N^2). Like
attention in an encoder, it is non-causal: the filter and the FFT see all tokens.

For an input $X \\in \\mathbb{R}^{N \\times D}$ split into $H$ heads of width $D/H$
(`SpectralAttention`, following the official code, jacobfa/fft ``fftnet_modules.py``):

$$F = \\mathrm{rFFT}_{\\text{tokens}}(X) \\in \\mathbb{C}^{H \\times (\\lfloor N/2 \\rfloor + 1) \\times D/H}
\\quad (\\text{orthonormal})$$
$$c = \\tfrac{1}{N} \\textstyle\\sum_t X_t, \\qquad
W = W_{\\text{base}} + \\tanh(\\mathrm{MLP}(c)), \\quad W_{\\text{base}} = \\mathbf{1} \\in \\mathbb{R}^{H \\times (\\lfloor N/2 \\rfloor + 1)}$$
$$\\tilde F = F \\odot W \\quad (\\text{one weight per head and frequency bin, shared by the head's channels})$$
$$\\mathrm{modReLU}(z) = z \\, \\frac{\\mathrm{ReLU}(|z| + b)}{|z| + \\epsilon} \\quad (b \\text{ per head and bin})$$
$$Y = \\mathrm{LayerNorm}\\big(X + \\mathrm{iFFT}_{\\text{tokens}}(\\mathrm{modReLU}(\\tilde F))\\big)$$

with MLP = Linear(D, D) - GELU - Linear(D, H (N/2 + 1)). `spectral` is the bracketed
step before the residual; with the MLP's output zero and b = 0 it returns its input up
to a relative error eps/|z| per coefficient (the filter is all ones, modReLU the identity,
and the orthonormal FFT pair inverts exactly).

W is real, so before modReLU the step is a circular convolution over tokens whose kernel is
symmetric in time (zero phase): it mixes a token's left and right neighbours alike, and only
the position embedding, modReLU and the per-example filter break that symmetry.

`FNetMixer` is the paper's fixed-Fourier baseline (FNet, 2105.03824): the real part of a
2-D FFT over tokens and channels, $Y = \\mathrm{LayerNorm}(X + \\Re\\,\\mathrm{FFT}_2(X))$.

Both mixers map [B, N, D] -> [B, N, D] and take the residual and LayerNorm themselves,
as in their papers. `fftnet_mixer` and `fnet_mixer` are factories for the architectures
family's "mixer" slot (`paperzoo.core.blocks.swap`): they read the width, heads and the
fixed sequence length from a Hugging Face config.

Deviations and choices
----------------------
- The context $c$ is the mean of the *input* over tokens, as in the official code; the
  paper's text (and the review) average the Fourier coefficients instead.
- $\\tanh$ bounds the MLP's output as in the official code; the paper's equations add the
  MLP's output to $W_{\\text{base}}$ unbounded. $\\tanh(0) = 0$, so the identity above holds.
- modReLU divides by $|z| + \\epsilon$ ($\\epsilon = 10^{-6}$), the paper's form; the official
  code divides by $\\max(|z|, 10^{-3})$ instead. b starts at -0.1 as in the official code.
- The layer's filter has one weight per frequency bin of a fixed length N (as the
  official code, which is built for a fixed `seq_len`); a sequence of any other length is
  refused rather than padded. No windowed local branch (the paper's later versions add
  one) and no dropout by default (the official code uses 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FFTNetConfig:
    hidden_size: int  # D
    seq_len: int  # N: the filter has one weight per rFFT bin of this length
    num_heads: int = 4  # H, the official default
    dropout: float = 0.0
    modrelu_bias_init: float = -0.1  # official code
    eps: float = 1e-6

    @property
    def freq_bins(self) -> int:
        return self.seq_len // 2 + 1


def modrelu(z: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """modReLU(z) = z ReLU(|z| + b) / (|z| + eps): shrinks each coefficient's magnitude by -b, keeps its phase."""
    magnitude = z.abs()
    return z * (torch.relu(magnitude + b) / (magnitude + eps))


class SpectralAttention(nn.Module):
    """FFTNet's mixer: [B, N, D] -> LayerNorm(X + iFFT(modReLU(rFFT(X) * (1 + tanh MLP(mean_t X)))))."""

    def __init__(self, config: FFTNetConfig):
        super().__init__()
        D, H = config.hidden_size, config.num_heads
        if D % H:
            raise ValueError(f"hidden_size {D} is not divisible by num_heads {H}")
        self.config = config
        bins = config.freq_bins
        self.base_filter = nn.Parameter(torch.ones(H, bins, 1))  # W_base = 1
        self.adaptive_mlp = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, H * bins))
        self.modrelu_bias = nn.Parameter(torch.full((H, bins, 1), config.modrelu_bias_init))  # b
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(D)

    def filter(self, x: torch.Tensor) -> torch.Tensor:
        """W = W_base + tanh(MLP(c)) with c = (1/N) sum_t X_t, each example's own context: [B, H, N/2+1, 1]."""
        B = x.shape[0]
        context = x.mean(dim=1)  # [B, D]
        return self.base_filter + torch.tanh(self.adaptive_mlp(context)).view(B, *self.base_filter.shape)

    def spectral(self, x: torch.Tensor) -> torch.Tensor:
        """The spectral step, before the residual: iFFT(modReLU(F * W)), [B, N, D] -> [B, N, D]."""
        B, N, D = x.shape
        c = self.config
        if N != c.seq_len:
            raise ValueError(f"this FFTNet layer was built for sequences of {c.seq_len} tokens, got {N}")
        H = c.num_heads
        heads = x.view(B, N, H, D // H).transpose(1, 2)  # [B, H, N, D/H]
        F = torch.fft.rfft(heads, dim=2, norm="ortho")  # [B, H, N/2+1, D/H], complex
        Z = modrelu(F * self.filter(x), self.modrelu_bias, c.eps)
        out = torch.fft.irfft(Z, n=N, dim=2, norm="ortho")  # n=N: an odd N is not recoverable from its bins alone
        return out.transpose(1, 2).reshape(B, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.spectral(x)))


class FNetMixer(nn.Module):
    """FNet's parameter-free mixing (2105.03824), the paper's baseline: LayerNorm(X + Re FFT_2(X))."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + torch.fft.fft2(x, dim=(-2, -1)).real)  # unnormalised DFT over tokens and channels, as FNet


def fftnet_mixer(config, layer_idx: int = 0) -> SpectralAttention:
    """Factory for the "mixer" slot: one FFTNet layer per decoder layer, for sequences of max_position_embeddings."""
    return SpectralAttention(FFTNetConfig(hidden_size=config.hidden_size, seq_len=config.max_position_embeddings,
                                          num_heads=config.num_attention_heads))


def fnet_mixer(config, layer_idx: int = 0) -> FNetMixer:
    """Factory for the "mixer" slot: FNet's Fourier mixing."""
    return FNetMixer(config.hidden_size)
