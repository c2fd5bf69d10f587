"""FFTNet (2502.18394): the spectral step's identity, per-example context, odd lengths, and FNet's mixing."""

import pytest
import torch

from paperzoo.architectures.fftnet_attention import FFTNetConfig, FNetMixer, SpectralAttention, modrelu


def layer(N=10, D=8, H=2, seed=0) -> SpectralAttention:
    torch.manual_seed(seed)
    return SpectralAttention(FFTNetConfig(hidden_size=D, seq_len=N, num_heads=H)).double().eval()


def neutral(m: SpectralAttention) -> SpectralAttention:
    """MLP output zero (its last layer zeroed) and b = 0: W = W_base = 1 and modReLU(z) = z |z| / (|z| + eps)."""
    with torch.no_grad():
        m.adaptive_mlp[-1].weight.zero_()
        m.adaptive_mlp[-1].bias.zero_()
        m.modrelu_bias.zero_()
    return m


@pytest.mark.parametrize("N", [9, 10])
def test_zero_filter_and_bias_make_the_spectral_step_return_its_input(N):
    """With tanh(MLP) = 0 and b = 0 the spectral step is iFFT(modReLU(rFFT(x))) = x up to eps/|z| per coefficient,
    and the layer is LayerNorm(x + x) = LayerNorm(x) (LayerNorm ignores the factor 2 up to its own eps)."""
    m = neutral(layer(N=N))
    x = torch.randn(3, N, 8, dtype=torch.float64)
    # |z| is O(1) for these inputs, so the eps/|z| error is O(1e-6); a broken FFT pair or filter is O(1) off
    torch.testing.assert_close(m.spectral(x), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(m(x), m.norm(x), atol=1e-4, rtol=0)


def test_the_default_layer_is_not_the_identity_and_adds_its_input_back():
    """The identity above comes from the zeroed MLP and b, not from a step that ignores them."""
    m = layer()
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    assert (m.spectral(x) - x).abs().max() > 1e-2
    torch.testing.assert_close(m(x), m.norm(x + m.spectral(x)))  # the residual, then LayerNorm


def test_modrelu_by_hand():
    z = torch.tensor([3 + 4j, 0.3 + 0.4j, 0j], dtype=torch.complex128)  # |z| = 5, 0.5, 0
    b = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64)
    out = modrelu(z, b, eps=0.0 + 1e-12)
    # magnitude 5 -> 4 with the phase kept; magnitude 0.5 and 0 -> 0
    torch.testing.assert_close(out, torch.tensor([2.4 + 3.2j, 0j, 0j], dtype=torch.complex128))


def test_the_filter_adapts_to_each_example_alone():
    """The context is each example's own mean over tokens: an example's output does not depend on its batch."""
    m = layer(N=11)
    x = torch.randn(4, 11, 8, dtype=torch.float64)
    together = m(x)
    alone = torch.cat([m(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(m(x[order]), together[order])


def test_the_filter_is_one_plus_the_bounded_mlp_of_the_mean_token():
    """W = 1 + tanh(MLP(mean_t x)): recomputed by hand, so it changes with the context and equals 1 when the MLP is 0."""
    m = layer(N=10)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    by_hand = 1 + torch.tanh(m.adaptive_mlp(x.mean(dim=1))).view(2, 2, 6, 1)
    torch.testing.assert_close(m.filter(x), by_hand)
    assert (m.filter(x) - m.filter(x + 1.0)).abs().max() > 1e-3  # another mean, another filter
    torch.testing.assert_close(neutral(m).filter(x), torch.ones(2, 2, 6, 1, dtype=torch.float64))


@pytest.mark.parametrize("N", [1, 7, 9, 33])
def test_shapes_for_odd_lengths(N):
    m = layer(N=N)
    x = torch.randn(2, N, 8, dtype=torch.float64)
    assert m.spectral(x).shape == (2, N, 8)
    assert m(x).shape == (2, N, 8)
    assert m.base_filter.shape == (2, N // 2 + 1, 1)


def test_non_causal_every_token_sees_every_other():
    """FFTNet mixes globally, as in the paper: changing the last token changes the first output."""
    m = layer(N=9)
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    y = x.clone()
    y[0, -1] += 1.0
    assert (m(x)[0, 0] - m(y)[0, 0]).abs().max() > 1e-6


def test_a_sequence_of_another_length_is_refused():
    with pytest.raises(ValueError, match="built for sequences of 10"):
        layer(N=10)(torch.randn(1, 12, 8, dtype=torch.float64))


def test_fnet_is_the_real_part_of_the_2d_dft():
    """FNet's mixing by its definition: sum over t', d' of x[t', d'] cos(2 pi (t t'/N + d d'/D))."""
    N, D = 5, 4
    x = torch.randn(1, N, D, dtype=torch.float64)
    t, d = torch.arange(N, dtype=torch.float64), torch.arange(D, dtype=torch.float64)
    phase = 2 * torch.pi * (t[:, None, None, None] * t[None, None, :, None] / N
                            + d[None, :, None, None] * d[None, None, None, :] / D)  # [t, d, t', d']
    mixed = (torch.cos(phase) * x[0][None, None]).sum(dim=(2, 3))
    m = FNetMixer(D).double()
    torch.testing.assert_close(m(x)[0], m.norm(x[0] + mixed))


def test_the_factories_fill_the_mixer_slot_of_a_tiny_llama():
    """`fftnet_mixer` reads width, heads and the fixed length from the HF config; the swapped model is non-causal."""
    from paperzoo.architectures.fftnet_attention import fftnet_mixer, fnet_mixer
    from paperzoo.core.blocks import is_causal, standard_model, swap

    for factory in (fftnet_mixer, fnet_mixer):
        model = swap(standard_model(vocab_size=12, length=9, hidden_size=16, num_heads=2, seed=0), "mixer", factory)
        assert model(input_ids=torch.randint(12, (2, 9))).logits.shape == (2, 9, 12)
        assert not is_causal(model, vocab_size=12, seq_len=9)
    spectral = swap(standard_model(12, 9, 16, num_heads=2, seed=0), "mixer", fftnet_mixer).model.layers[1].self_attn.mixer
    assert (spectral.config.seq_len, spectral.config.num_heads, spectral.base_filter.shape) == (9, 2, (2, 5, 1))
