import math

import numpy as np
import pytest
import torch

from paperzoo.experiments.phenomena.universal_icl import checks, kernel_mean, preconditions
from paperzoo.phenomena.universal_icl import (
    InContextConfig, InContextTransformer, MultiHeadMeasureAttention, context_size_invariance, measure_attention)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return InContextTransformer(InContextConfig(d_in=2, width=16, heads=2, depth=2, **kw)).eval()


def points(B=3, n=10, seed=1):
    return torch.randn(B, n, 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("copies", [2, 3])
def test_duplicating_every_token_leaves_the_bidirectional_model_unchanged(copies):
    y, x = points(), points(n=5, seed=2)
    assert context_size_invariance(model(), y, copies) < 1e-5  # at the context's own tokens
    assert context_size_invariance(model(), y, copies, queries=x) < 1e-5  # at queries away from the support
    assert context_size_invariance(model().double(), y.double(), copies, queries=x.double()) < 1e-12


def test_a_torch_transformer_encoder_without_positions_passes_the_check():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    assert context_size_invariance(encoder, torch.randn(2, 7, 8), copies=3) < 1e-5


def test_positions_or_a_causal_mask_fail_the_check():
    y, x = points(), points(n=5, seed=2)
    assert context_size_invariance(model(max_positions=64), y, 2) > 1e-2
    assert context_size_invariance(model(max_positions=64), y, 2, queries=x) > 1e-2
    assert context_size_invariance(model(causal=True), y, 2) > 1e-2
    # a stock encoder under a causal mask fails too: the check needs nothing of this module
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    causal = lambda t: encoder(t, mask=torch.nn.Transformer.generate_square_subsequent_mask(t.shape[1]), is_causal=True)
    assert context_size_invariance(causal, torch.randn(2, 7, 8), copies=2) > 1e-2


def test_the_model_is_a_function_of_the_measure_order_and_weights_included():
    m, y, x = model().double(), points().double(), points(n=5, seed=2).double()
    order = torch.randperm(y.shape[1], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(m(y[:, order], x), m(y, x), atol=1e-12)
    # one token of mass 2/3 is the same measure as two copies of it beside one of mass 1/3
    a, b = y[:, :1], y[:, 1:2]
    weighted = m(torch.cat([a, b], 1), x, mass=torch.tensor([[1 / 3, 2 / 3]] * 3, dtype=torch.float64))
    assert torch.allclose(weighted, m(torch.cat([a, b, b], 1), x), atol=1e-12)
    assert not torch.allclose(weighted, m(torch.cat([a, b], 1), x), atol=1e-3)


def test_measure_attention_by_hand():
    # mu = (delta_a + delta_b) / 2, a = e1, b = e2, Q = K = V = I, x = e1: scores <x, a> = 1, <x, b> = 0
    x, support, I = torch.tensor([[1.0, 0.0]]), torch.eye(2), torch.eye(2)
    e = math.e
    got = measure_attention(x, support, torch.tensor([0.5, 0.5]), I, I, I)
    assert torch.allclose(got, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))
    # mu = delta_a / 4 + 3 delta_b / 4: the integral weighs each exp by its mass
    got = measure_attention(x, support, torch.tensor([0.25, 0.75]), I, I, I)
    assert torch.allclose(got, torch.tensor([[0.25 * e, 0.75]]) / (0.25 * e + 0.75))
    assert torch.allclose(got, measure_attention(x, support[[0, 1, 1, 1]], torch.full((4,), 0.25), I, I, I))


def test_the_modules_attention_is_the_integral_formula_summed_over_heads():
    torch.manual_seed(0)
    attention = MultiHeadMeasureAttention(width=6, heads=3).double()
    n, stream = 5, torch.randn(2, 8, 6, dtype=torch.float64)  # 5 context tokens, then 3 queries
    uniform = torch.full((2, n), 1 / n, dtype=torch.float64)
    got = attention(stream, n, torch.zeros(2, n, dtype=torch.float64))
    expected = sum(measure_attention(stream, stream[:, :n], uniform, Q, K, V) @ W.T
                   for Q, K, V, W in (attention.head_matrices(h) for h in range(3)))
    assert torch.allclose(got, expected, atol=1e-12)


def test_kernel_target_by_hand():
    y = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])  # mu = (delta_0 + delta_e1) / 2
    x = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    got = kernel_mean(x, y, sigma=1.0)[0]
    assert torch.allclose(got, torch.tensor([(1 + math.exp(-0.5)) / 2, (math.exp(-1) + math.exp(-0.5)) / 2]))
    assert torch.allclose(kernel_mean(x, y, sigma=0.5)[0, 0], torch.tensor((1 + math.exp(-2)) / 2))


def test_bad_copies_are_refused():
    for copies in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="copies"):
            context_size_invariance(model(), points(), copies)


def metrics(train=0.01, unseen=0.012, baseline=0.1, spread=0.002, k=50, duplicate=1e-7, causal=0.1):
    wobble = spread * np.tile([-1.0, 1.0], k // 2)
    return {"train_sizes": [8, 16], "unseen_sizes": [128],
            "error_by_size": {"8": list(train + wobble), "16": list(train - wobble), "128": list(unseen + wobble)},
            "baseline_error": list(baseline + wobble), "duplicate_deviation": duplicate,
            "causal_duplicate_deviation": causal}


def test_predicate_and_preconditions_by_hand():
    assert list(preconditions(metrics()).values()) == [True, True]
    assert list(preconditions(metrics(baseline=0.04)).values()) == [False, True]  # 0.2 x 0.04 < 0.01
    assert list(preconditions(metrics(causal=1e-6)).values()) == [True, False]
    assert list(checks(metrics()).values()) == [True, True]
    assert list(checks(metrics(unseen=0.03)).values()) == [False, True]  # 3x the training-size error
    assert list(checks(metrics(duplicate=1e-3)).values()) == [True, False]
    # 1.5x sits inside the interval: undecided, whatever the point estimate
    assert list(checks(metrics(unseen=0.015, spread=0.01, k=8)).values()) == [None, True]
