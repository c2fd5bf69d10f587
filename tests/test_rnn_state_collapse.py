"""Tests for paperzoo.architectures.rnn_state_collapse (Stuffed Mamba, arXiv:2410.07145)."""

import math

import pytest
import torch

from paperzoo.architectures.rnn_state_collapse import (
    Mamba2Config, Mamba2Mixer, StateFix, apply_fix, calibrate_state_norm, ssd_chunked, ssd_sequential)


def scan_inputs(b=2, T=23, H=3, P=4, N=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    delta = torch.nn.functional.softplus(torch.randn(b, T, H, generator=g, dtype=dtype))
    a = torch.rand(H, generator=g, dtype=dtype) + 0.2
    B = torch.randn(b, T, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, N, generator=g, dtype=dtype)
    return x, delta, a, B, C


def naive(x, delta, a, B, C):
    """h_t = alpha_t h_{t-1} + Delta_t x_t B_t^T, y_t = h_t C_t, written out with explicit loops over heads."""
    b, T, H, P = x.shape
    y = torch.zeros_like(x)
    for hd in range(H):
        h = torch.zeros(b, P, B.shape[-1], dtype=x.dtype)
        for t in range(T):
            alpha = torch.exp(-delta[:, t, hd] * a[hd])
            h = alpha[:, None, None] * h + delta[:, t, hd, None, None] * x[:, t, hd, :, None] * B[:, t, None, :]
            y[:, t, hd] = (h @ C[:, t, :, None])[..., 0]
    return y


def test_sequential_scan_is_the_recurrence():
    args = scan_inputs()
    y, _, _ = ssd_sequential(*args)
    torch.testing.assert_close(y, naive(*args))


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunked_equals_sequential_in_float64(chunk):
    args = scan_inputs()
    y_seq, norms_seq, final = ssd_sequential(*args)
    y_chunk, norms_chunk = ssd_chunked(*args, chunk=chunk)
    torch.testing.assert_close(y_chunk, y_seq, rtol=1e-10, atol=1e-10)
    ends = [min(s + chunk, 23) - 1 for s in range(0, 23, chunk)]
    torch.testing.assert_close(norms_chunk, norms_seq[:, ends])
    torch.testing.assert_close(norms_chunk[:, -1], final.flatten(2).norm(dim=-1))


@pytest.mark.parametrize("r", [1, 5, 8])
def test_window_equals_a_fresh_scan_of_the_last_r_tokens(r):
    args = scan_inputs(T=20)
    y_seq, _, _ = ssd_sequential(*args, window=r)
    y_chunk, _ = ssd_chunked(*args, chunk=6, window=r)
    for t in (r - 1, r, 13, 19):
        fresh, _, _ = ssd_sequential(*(v[:, t - r + 1:t + 1] if v.dim() > 1 else v for v in args))
        torch.testing.assert_close(y_seq[:, t], fresh[:, -1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(y_chunk[:, t], fresh[:, -1], rtol=1e-9, atol=1e-9)
    # a window longer than the sequence changes nothing
    torch.testing.assert_close(ssd_sequential(*args, window=50)[0], ssd_sequential(*args)[0])


def test_state_normalisation_caps_each_head_at_p_and_leaves_small_states_alone():
    x, delta, a, B, C = scan_inputs(T=40)
    a = a * 1e-3  # almost no decay: the state grows
    _, free, _ = ssd_sequential(x, delta, a, B, C)
    p = torch.tensor([2.0, 1e9, 5.0], dtype=torch.float64)
    y, capped, final = ssd_sequential(x, delta, a, B, C, p=p)
    assert free[..., 0].max() > 4 and free[..., 2].max() > 10
    assert (capped[..., 0] <= 2.0 + 1e-9).all() and (capped[..., 2] <= 5.0 + 1e-9).all()
    torch.testing.assert_close(capped[..., 1], free[..., 1])  # a threshold never reached changes nothing
    # once at the cap the norm stays there while the state keeps turning with new input
    assert torch.allclose(capped[:, -5:, 0], torch.full_like(capped[:, -5:, 0], 2.0))
    # the rescale is h p / ||h||: the step before the cap is reached equals the free state
    first = int((free[0, :, 0] > 2.0).nonzero()[0])
    torch.testing.assert_close(capped[0, :first, 0], free[0, :first, 0])


def small_mixer(seed=0, **kw):
    torch.manual_seed(seed)
    mixer = Mamba2Mixer(Mamba2Config(hidden_size=16, d_state=6, head_dim=8, chunk=5, **kw)).double()
    with torch.no_grad():
        mixer.dt_bias += 1.5  # decays far from 1, so every token matters to the outputs checked
    return mixer


@pytest.mark.parametrize("fix", [StateFix(), StateFix(delta_scale=3.0, b_scale=0.5), StateFix(window=4),
                                 StateFix(state_norm=True)])
def test_mixer_is_causal(fix):
    mixer = small_mixer()
    mixer.fix = fix
    mixer.p = torch.full_like(mixer.p, 0.05)
    u = torch.randn(2, 17, 16, dtype=torch.float64)
    changed = u.clone()
    changed[:, 9:] = torch.randn(2, 8, 16, dtype=torch.float64)
    out, out_changed = mixer(u), mixer(changed)
    torch.testing.assert_close(out[:, :9], out_changed[:, :9], rtol=0, atol=0)
    assert (out[:, 9:] - out_changed[:, 9:]).abs().max() > 1e-3


def test_mixer_chunked_and_recorded_paths_agree():
    mixer = small_mixer()
    u = torch.randn(2, 17, 16, dtype=torch.float64)
    chunked = mixer(u)
    mixer.record = True  # the recording path runs the sequential scan
    torch.testing.assert_close(mixer(u), chunked)
    assert mixer.state_norms.shape == (2, 17, mixer.config.heads)


def test_forgetting_fix_scales_delta_and_b():
    mixer = small_mixer()
    u = torch.randn(1, 9, 16, dtype=torch.float64)
    _, x, delta, B, C = mixer.ssm_inputs(u)
    mixer.fix = StateFix(delta_scale=2.5, b_scale=0.3)
    _, x2, delta2, B2, C2 = mixer.ssm_inputs(u)
    torch.testing.assert_close(delta2, 2.5 * delta)
    torch.testing.assert_close(B2, 0.3 * B)
    torch.testing.assert_close(C2, C)


def test_calibrated_state_norm_caps_longer_inputs_at_the_training_norm():
    class Wrap(torch.nn.Module):  # the smallest "model" calibrate_state_norm accepts: input_ids -> mixer
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 16).double()
            self.mixer = small_mixer()
            with torch.no_grad():
                self.mixer.dt_bias -= 6.0  # slow decay: the state keeps growing past the calibration length

        def forward(self, input_ids):
            return self.mixer(self.embed(input_ids))

    model = Wrap()
    torch.manual_seed(1)
    short, long = torch.randint(11, (4, 12)), torch.randint(11, (4, 120))
    p = calibrate_state_norm(model, short)[0]
    m = model.mixer
    m.record = True
    model(long)
    free = m.state_norms
    apply_fix(model, StateFix(state_norm=True))
    model(long)
    capped = m.state_norms
    assert (free[:, -1] > 1.5 * p).all()
    assert (capped <= p + 1e-9).all()
    with pytest.raises(ValueError):
        StateFix(state_norm=True, window=3)


class _CopyModel(torch.nn.Module):
    """Predicts "the next token repeats this one", with confidence 5 before position `until` and none after."""

    def __init__(self, vocab, until):
        super().__init__()
        self.vocab, self.until = vocab, until

    def forward(self, input_ids):
        strength = 5.0 * (torch.arange(input_ids.shape[1]) < self.until)
        logits = torch.nn.functional.one_hot(input_ids, self.vocab).double() * strength[None, :, None]
        return type("Out", (), {"logits": logits})()


def test_long_and_in_length_compare_the_same_tokens_with_long_and_cut_histories():
    from paperzoo.experiments.architectures.rnn_state_collapse import long_and_in_length

    T, V = 8, 11
    blocks = torch.arange(3)[:, None].repeat(1, 4 * T) + 2  # each row repeats one token
    right = torch.nn.functional.cross_entropy(torch.tensor([[5.0] + [0.0] * (V - 1)]), torch.tensor([0])).item()
    steady = long_and_in_length(_CopyModel(V, 10**6), blocks, T)  # a model unaffected by history length
    assert steady["long"] == pytest.approx(steady["in"]) and steady["in"] == pytest.approx([right] * 3)
    broken = long_and_in_length(_CopyModel(V, T), blocks, T)  # breaks past T: long tokens lose, pieces do not
    assert broken["long"] == pytest.approx([math.log(V)] * 3) and broken["in"] == pytest.approx([right] * 3)
