import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from paperzoo.architectures.adaptive_temperature_softmax import (
    POLYNOMIAL, AdaptiveTemperatureLogitsProcessor, adaptive_softmax, adaptive_temperature_attention, entropy,
    inverse_temperature, use_adaptive_temperature)


def quartic(H: float) -> float:
    """The paper's P(H) by hand: -0.037 H^4 + 0.481 H^3 - 2.3 H^2 + 4.917 H - 1.791."""
    return -0.037 * H**4 + 0.481 * H**3 - 2.3 * H**2 + 4.917 * H - 1.791


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def test_beta_is_one_for_sharp_heads_and_never_below_one():
    H = torch.linspace(0.0, 0.5, 11)
    assert torch.equal(inverse_temperature(H), torch.ones_like(H))
    # P(0.7) = 0.72 < 1: the floor keeps the temperature from rising
    assert inverse_temperature(torch.tensor(0.7)).item() == 1.0 and quartic(0.7) < 1
    # P > 1 only on (0.85, 5.94) nats; beyond it the quartic turns down and the floor returns 1
    assert inverse_temperature(torch.tensor(7.0)).item() == 1.0
    assert (inverse_temperature(torch.linspace(0, 10, 1001)) >= 1).all()


@pytest.mark.parametrize("H", [1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
def test_beta_follows_the_quartic_highest_power_first(H):
    assert inverse_temperature(torch.tensor(H, dtype=torch.float64)).item() == pytest.approx(quartic(H), abs=1e-9)
    assert quartic(H) == pytest.approx(np.polyval(POLYNOMIAL, H))


def test_beta_of_one_nat_is_1_27():
    # P(1) is the coefficients' sum: -0.037 + 0.481 - 2.3 + 4.917 - 1.791 = 1.27
    assert inverse_temperature(torch.tensor(1.0)).item() == pytest.approx(1.27, abs=1e-6)
    # and P(2) = -0.592 + 3.848 - 9.2 + 9.834 - 1.791 = 2.099 (coefficients in the reverse order give 2.405)
    assert inverse_temperature(torch.tensor(2.0)).item() == pytest.approx(2.099, abs=1e-5)


def test_adaptive_softmax_is_softmax_of_beta_times_logits_by_hand():
    z = torch.tensor([1.0, 0.5, 0.0, 0.0, -0.5], dtype=torch.float64)
    p = np.exp(z.numpy()) / np.exp(z.numpy()).sum()
    H = float(-(p * np.log(p)).sum())
    beta = quartic(H)
    assert 0.85 < H < 5.9 and beta > 1
    expected = np.exp(beta * z.numpy()) / np.exp(beta * z.numpy()).sum()
    np.testing.assert_allclose(adaptive_softmax(z).numpy(), expected, atol=1e-12)
    # a sharp distribution (H <= 0.5) is returned unchanged
    sharp = torch.tensor([8.0, 0.0, 0.0], dtype=torch.float64)
    assert entropy(F.softmax(sharp, -1)).item() < 0.5
    torch.testing.assert_close(adaptive_softmax(sharp), F.softmax(sharp, -1))


def test_entropy_never_rises_and_falls_where_beta_exceeds_one():
    g = torch.Generator().manual_seed(0)
    fell = 0
    for n in (2, 5, 16, 64, 256, 2048):
        for scale in (0.1, 1.0, 3.0, 10.0):
            z = scale * torch.randn(32, n, generator=g, dtype=torch.float64)
            H = entropy(F.softmax(z, -1))
            H_adaptive = entropy(adaptive_softmax(z))
            assert (H_adaptive <= H + 1e-12).all()
            sharpened = inverse_temperature(H) > 1.01
            assert (H_adaptive[sharpened] < H[sharpened] - 1e-6).all()
            fell += int(sharpened.sum())
    assert fell > 100


def test_fully_masked_row_stays_finite():
    z = torch.full((2, 4), torch.finfo(torch.float32).min)
    z[1, :2] = torch.tensor([0.3, -0.2])
    out = adaptive_softmax(z)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2))


@pytest.mark.parametrize("padded", [False, True])
def test_attention_with_beta_forced_to_one_equals_eager_attention(padded):
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding: only a passed mask can hide these keys
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        use_adaptive_temperature(model, threshold=math.inf)
        forced = model(ids, attention_mask=mask).logits
        use_adaptive_temperature(model)
        adaptive = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(forced[keep], eager[keep], atol=1e-6, rtol=1e-6)
    assert (adaptive[keep] - eager[keep]).abs().max() > 1e-4  # beta > 1 somewhere changes the model


def test_attention_weights_are_adaptive_softmax_of_causal_scores():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(2)
    B, H, H_kv, T, hd = 2, 4, 2, 9, 8
    q = torch.randn(B, H, T, hd, generator=g)
    k, v = torch.randn(B, H_kv, T, hd, generator=g), torch.randn(B, H_kv, T, hd, generator=g)
    out, weights = adaptive_temperature_attention(attn, q, k, v, None, scaling=0.5)
    k_full, v_full = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    z = (q @ k_full.transpose(2, 3)) * 0.5
    z = z.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.empty_like(z)
    for idx in np.ndindex(B, H, T):  # one beta per head and query, from that row's entropy
        row = z[idx][: idx[2] + 1]
        p = F.softmax(row, -1)
        beta = max(quartic(float(entropy(p))), 1.0) if float(entropy(p)) > 0.5 else 1.0
        expected[idx] = F.softmax(beta * z[idx], -1)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, (expected @ v_full).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_logits_processor_samples_from_adaptive_softmax():
    z = torch.randn(3, 50, generator=torch.Generator().manual_seed(3)) * torch.tensor([[0.3], [1.0], [6.0]])
    processed = AdaptiveTemperatureLogitsProcessor()(torch.zeros(3, 1, dtype=torch.long), z)
    torch.testing.assert_close(F.softmax(processed, -1), adaptive_softmax(z))
    assert not torch.allclose(F.softmax(processed, -1), F.softmax(z, -1))
