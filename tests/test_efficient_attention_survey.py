"""efficient-attention-survey: the window, linear and Performer rules against their exact forms."""

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from paperzoo.architectures.efficient_attention_survey import (attention_flops, linear_attention,
                                                               performer_attention, sliding_window_attention)
from paperzoo.core.blocks import is_causal, standard_model, swap

B, H, T, D = 2, 2, 10, 8


def qkv(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(B, H, T, D, generator=g) for _ in range(3)]


def softmax_attention(q, k, v, scaling):
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("chunk", [1, 3, 64])  # one position per chunk, chunks with a remainder, one chunk
def test_chunked_linear_attention_equals_its_definition(chunk, monkeypatch):
    import paperzoo.architectures.efficient_attention_survey as survey

    monkeypatch.setattr(survey._causal_kernel_attention, "__defaults__", (chunk,))
    d = 4
    q, k, v = (x[..., :d] for x in qkv())
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    expected = torch.zeros(B, H, T, d)
    for t in range(T):  # the definition, one position at a time
        S = torch.einsum("bhsf,bhse->bhfe", phi_k[:, :, : t + 1], v[:, :, : t + 1])
        z = phi_k[:, :, : t + 1].sum(2)
        expected[:, :, t] = torch.einsum("bhf,bhfe->bhe", phi_q[:, :, t], S) / (phi_q[:, :, t] * z).sum(-1, keepdim=True)
    out, _ = linear_attention(None, q, k, v, None)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 3, T])
def test_window_keeps_only_the_last_w_keys(window):
    q, k, v = qkv()
    out, weights = sliding_window_attention(window)(None, q, k, v, None, scaling=D ** -0.5)
    t, s = torch.arange(T).view(-1, 1), torch.arange(T).view(1, -1)
    assert (weights[..., (s > t) | (t - s >= window)] == 0).all()
    if window == T:
        torch.testing.assert_close(out, softmax_attention(q, k, v, D ** -0.5), atol=1e-5, rtol=1e-5)
    if window == 1:
        torch.testing.assert_close(out, v.transpose(1, 2))


def test_performer_error_shrinks_with_more_features():
    q, k, v = qkv(scale=0.5)
    exact = softmax_attention(q, k, v, D ** -0.5)
    errors = []
    for m in (4, 64, 1024):
        seeds = [(performer_attention(m, seed)(None, q, k, v, None, scaling=D ** -0.5)[0] - exact).pow(2).mean()
                 for seed in range(5)]
        errors.append(torch.stack(seeds).mean().item())
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors
    assert errors[2] < 1e-3


@torch.no_grad()
def test_window_attention_matches_mistral_sliding_window_in_transformers():
    config = MistralConfig(vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=4)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    mistral = MistralForCausalLM(config)
    full = copy.deepcopy(mistral)
    full.config.sliding_window = None
    ids = torch.randint(30, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = mistral(input_ids=ids).logits
    assert not torch.allclose(full(input_ids=ids).logits, expected, atol=1e-4)  # the window matters here
    swap(full, "attention_fn", sliding_window_attention(4))
    torch.testing.assert_close(full(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [linear_attention, performer_attention(16), sliding_window_attention(3)])
def test_every_rule_is_causal_inside_a_model(fn):
    model = standard_model(20, 12, hidden_size=16, num_heads=2, seed=0)
    assert is_causal(swap(model, "attention_fn", fn), 20, 12)


def test_flop_counts():
    assert attention_flops("window", 100, D, window=100) == attention_flops("softmax", 100, D)
    assert attention_flops("window", 10_000, D, window=8) < attention_flops("window", 10_000, D, window=16) < 4 * D * 16
    assert attention_flops("softmax", 2048, D) == 2 * attention_flops("softmax", 1024, D) - 2 * D
    assert attention_flops("linear", 10, D) == attention_flops("linear", 10_000, D) == 4 * D * D
