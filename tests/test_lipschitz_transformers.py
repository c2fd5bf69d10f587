import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm
from transformers import LlamaConfig, LlamaForCausalLM

from paperzoo.architectures.lipschitz_transformers import (
    JORDAN_QUINTIC, Constraint, LipschitzTransformer, LipschitzTransformerConfig, cap, enforce, lipschitz_bound,
    muon_update_bound, newton_schulz, newton_schulz_gain, soft_cap_strength, spectral_hammer, spectral_normalize,
    spectral_soft_cap)

torch.set_num_threads(1)


def sigma(W: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(W.detach().double(), ord=2).item()


def matrix_with_top_singular_value(m: int, n: int, top: float, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    W = torch.randn(m, n, dtype=torch.float64)
    return W * top / sigma(W)


# --- Newton-Schulz / Muon -------------------------------------------------------------------------

def test_newton_schulz_approaches_the_polar_factor():
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    # the classic cubic (1.5, -0.5, 0) converges to UV^T itself
    assert torch.allclose(newton_schulz(G, (1.5, -0.5, 0.0), steps=40), polar, atol=1e-4)
    # Jordan's quintic: same singular vectors, singular values pushed into a band around 1
    X = newton_schulz(G, JORDAN_QUINTIC, steps=5)
    D = U.T @ X @ Vh.T
    assert (D - torch.diag(torch.diagonal(D))).abs().max() < 1e-3
    assert torch.diagonal(D).min() > 0.6 and torch.diagonal(D).max() <= newton_schulz_gain() + 1e-4
    assert (X - polar).norm() / polar.norm() < 0.3 < (G / G.norm() - polar).norm() / polar.norm()
    # and it is the direction torch.optim.Muon steps along (first step, no momentum history)
    W = nn.Parameter(torch.zeros(24, 40))
    W.grad = G.clone()
    torch.optim.Muon([W], lr=0.1, weight_decay=0.0, nesterov=False, momentum=0.0).step()
    assert torch.nn.functional.cosine_similarity(-W.detach().flatten(), X.flatten(), dim=0) > 0.99


def test_newton_schulz_gain_is_the_polynomials_overshoot():
    # the quintic lands singular values in roughly [0.7, 1.2]; the cubic never overshoots 1
    assert 1.05 < newton_schulz_gain(JORDAN_QUINTIC, 5) < 1.3
    assert newton_schulz_gain((1.5, -0.5, 0.0), 5) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(32, 16), (16, 32)])
def test_muon_step_spectral_norm_is_within_its_bound(shape):
    torch.manual_seed(1)
    W = nn.Parameter(torch.zeros(shape))
    opt = torch.optim.Muon([W], lr=0.05, weight_decay=0.0)
    bound = muon_update_bound(0.05, shape)
    for _ in range(5):
        before = W.detach().clone()
        W.grad = torch.randn(shape)
        opt.step()
        step = sigma(W.detach() - before)
        assert 0.6 * bound < step <= bound


# --- projections ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(20, 20), (12, 30), (30, 12)])
def test_normalize_and_hammer_bring_sigma_max_to_w_max(shape):
    w_max = 1.5
    W = matrix_with_top_singular_value(*shape, top=4.0)
    assert sigma(spectral_normalize(W, w_max, iterations=100)) == pytest.approx(w_max, rel=1e-4)
    small = matrix_with_top_singular_value(*shape, top=1.0)
    assert torch.allclose(spectral_normalize(small, w_max, iterations=100), small)  # inside: untouched
    # the hammer's case: one step pushed one singular value out of the ball; only it moves
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    S = torch.linspace(1.4, 0.1, len(S), dtype=W.dtype)
    S[0] = 2.5
    W = U @ torch.diag(S) @ Vh
    hammered = torch.linalg.svdvals(spectral_hammer(W, w_max, iterations=100))
    assert hammered[0].item() == pytest.approx(w_max, rel=1e-4)
    assert torch.allclose(hammered[1:], S[1:], rtol=1e-4)


def test_normalize_matches_torch_spectral_norm_at_convergence():
    torch.manual_seed(0)
    layer = nn.Linear(24, 16, bias=False)
    with torch.no_grad():
        layer.weight.mul_(5.0)
    W = layer.weight.detach().clone()
    torch_spectral_norm(layer, n_power_iterations=50)
    layer.train()
    for _ in range(5):  # each access in training mode runs more power iterations
        reference = layer.weight.detach()
    assert torch.allclose(spectral_normalize(W, 1.0, iterations=200), reference, atol=1e-5)


def test_soft_cap_polynomial_maps_the_reachable_maximum_onto_w_max():
    for k in (1.01, 1.1, 1.3):
        a = soft_cap_strength(k)
        g = lambda s: s - 3 * a**2 * s**5 + 3 * a**3 * s**7 - a**4 * s**9
        assert g(k) == pytest.approx(1.0, abs=1e-9)
        s = np.linspace(0, k, 1001)
        assert (g(s) <= s + 1e-12).all() and (g(s) <= 1 + 1e-9).all()
        # the matrix iteration applies exactly this polynomial to the singular values
        W = matrix_with_top_singular_value(16, 16, top=k * 2.0, seed=2)
        assert torch.allclose(torch.linalg.svdvals(spectral_soft_cap(W, a, w_max=2.0)) / 2.0,
                              torch.from_numpy(g(torch.linalg.svdvals(W).numpy() / 2.0)), atol=1e-9)
    assert soft_cap_strength(0.9) == 0.0
    # the coupling's limit: past k ~ 1.3 (a step of 30% of w_max) g overshoots 1 before k
    a = soft_cap_strength(2.0)
    s = np.linspace(0, 2.0, 1001)
    assert (s - 3 * a**2 * s**5 + 3 * a**3 * s**7 - a**4 * s**9).max() > 1.1


def test_soft_cap_with_muon_keeps_every_step_inside_the_ball():
    """The co-design: the step's known spectral norm sets alpha, so sigma_max <= w_max holds after
    every projection without measuring sigma_max."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False))
    constraint, lr, wd = Constraint("soft_cap", w_max=1.0), 0.1, 0.1
    enforce(model, Constraint("normalize"))
    opt = torch.optim.Muon(model.parameters(), lr=lr, weight_decay=wd)
    x = torch.randn(64, 16)
    free = [m.weight.detach().clone() for m in model]
    for step in range(15):
        opt.zero_grad()
        (-model(x).pow(2).mean()).backward()  # pushes every weight to grow
        opt.step()
        enforce(model, constraint, update_bound=lambda W: muon_update_bound(lr, tuple(W.shape)), shrink=1 - lr * wd)
        for m in model:
            assert sigma(m.weight) <= cap(m.weight, 1.0) * (1 + 1e-4), step
    # without the projection the same training leaves the ball
    unconstrained = nn.Sequential(*[nn.Linear(W.shape[1], W.shape[0], bias=False) for W in free])
    with torch.no_grad():
        for m, W in zip(unconstrained, free):
            m.weight.copy_(W)
    opt = torch.optim.Muon(unconstrained.parameters(), lr=lr, weight_decay=wd)
    for _ in range(15):
        opt.zero_grad()
        (-unconstrained(x).pow(2).mean()).backward()
        opt.step()
    assert any(sigma(m.weight) > 1.5 * cap(m.weight, 1.0) for m in unconstrained)


@pytest.mark.parametrize("method", ["normalize", "hammer", "soft_cap"])
def test_enforce_caps_every_linear_of_a_hugging_face_model(method):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    # the regime the projections are built for: inside the ball, then one step pushes the top
    # singular direction 25% past the cap (the hammer fixes one direction, the soft cap k <= 1.3)
    enforce(model, Constraint("normalize", w_max=2.0, power_iterations=200))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                U, S, Vh = torch.linalg.svd(m.weight)
                m.weight.add_(0.25 * cap(m.weight, 2.0) * torch.outer(U[:, 0], Vh[0]))
        model.model.embed_tokens.weight.mul_(30.0)
    enforce(model, Constraint(method, w_max=2.0, power_iterations=200))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 7 + 1
    for m in linears:
        assert sigma(m.weight) <= cap(m.weight, 2.0) * (1 + 1e-3)
    assert model.model.embed_tokens.weight.norm(dim=1).max() <= math.sqrt(32) * (1 + 1e-5)


# --- the transformer and its bound ------------------------------------------------------------------

def tiny(layers=2, heads=2, D=16, s=1.0, seed=0) -> LipschitzTransformer:
    torch.manual_seed(seed)
    return LipschitzTransformer(LipschitzTransformerConfig(vocab_size=11, seq_len=8, hidden_size=D,
                                                           num_layers=layers, num_heads=heads, softmax_scale=s))


def sequence_norm(X: torch.Tensor) -> torch.Tensor:
    return X.norm(dim=-1).amax(dim=-1)  # max over positions of the l2 norm


def measured_sensitivity(model, X, steps=60):
    """Largest ||f(X + d) - f(X)|| / ||d|| found by ascent on the perturbation direction d."""
    d = torch.randn_like(X, requires_grad=True)
    opt = torch.optim.Adam([d], lr=0.05)
    eps, best = 1e-3, 0.0
    for _ in range(steps):
        delta = eps * d / sequence_norm(d)[:, None, None]
        ratio = sequence_norm(model.blocks(X + delta) - model.blocks(X)) / eps
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best


@pytest.mark.parametrize("s,scale", [(1.0, 1.0), (8.0, 1.0), (8.0, 3.0)])
def test_bound_exceeds_measured_sensitivity(s, scale):
    model = tiny(layers=2, heads=2, s=s, seed=int(s))
    enforce(model, Constraint("normalize", w_max=scale, power_iterations=100))
    R0 = model.embed.weight.norm(dim=1).max().item()
    X = torch.randn(16, 8, 16)
    X = X / X.norm(dim=-1, keepdim=True) * R0 * torch.rand(16, 8, 1)  # tokens inside the domain
    measured = measured_sensitivity(model, X)
    bound = lipschitz_bound(model)
    assert measured <= bound
    assert measured > 0.02 * bound  # the bound is not vacuous on these models


def test_bound_is_attained_by_a_linear_configuration():
    """Q = K = 0 makes attention a causal mean and zeroing the MLP's output makes the model linear;
    with one head, V = cI and O = U = I, a constant perturbation attains the bound exactly."""
    N, c = 3, 2.5
    model = tiny(layers=N, heads=1, D=8)
    with torch.no_grad():
        for attn, mlp in zip(model.attn, model.mlp):
            attn.q.weight.zero_(); attn.k.weight.zero_()
            attn.v.weight.copy_(c * torch.eye(8)); attn.o.weight.copy_(torch.eye(8))
            mlp.down.weight.zero_()
        model.head = nn.Linear(8, 8, bias=False)
        model.head.weight.copy_(torch.eye(8))
    b = 1 / (2 * N)
    expected = (((1 - b) + b * c / 3) * (1 - b)) ** N
    assert lipschitz_bound(model) == pytest.approx(expected, rel=1e-6)
    X, delta = torch.randn(1, 8, 8), torch.zeros(1, 8, 8)
    delta[..., 0] = 1e-3
    ratio = sequence_norm(model.blocks(X + delta) - model.blocks(X)) / 1e-3
    assert ratio.item() == pytest.approx(expected, rel=1e-3)


def test_model_is_a_causal_lm_and_layernorm_has_no_bound():
    model = tiny()
    ids = torch.randint(0, 11, (2, 8))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 8, 11) and out.loss.ndim == 0
    changed = ids.clone(); changed[:, 5:] = (changed[:, 5:] + 1) % 11
    assert torch.allclose(model(changed).logits[:, :5], out.logits[:, :5], atol=1e-6)
    assert lipschitz_bound(LipschitzTransformer(LipschitzTransformerConfig(11, 8, 16, layernorm=True))) == math.inf


def test_attention_logit_path_needs_its_term_in_the_bound():
    """With Q = K = V = O = I and s = 4 the attention weights move with the input: the measured
    sensitivity exceeds what the value path alone, (1 - b) + b/3, allows, and stays under the bound."""
    model = tiny(layers=1, heads=1, D=4, s=4.0)
    with torch.no_grad():
        for m in (model.attn[0].q, model.attn[0].k, model.attn[0].v, model.attn[0].o):
            m.weight.copy_(torch.eye(4))
        model.mlp[0].down.weight.zero_()
        model.head = nn.Linear(4, 4, bias=False)
        model.head.weight.copy_(torch.eye(4))
    torch.manual_seed(0)
    X = torch.randn(64, 3, 4)
    X = X / X.norm(dim=-1, keepdim=True) * model.embed.weight.norm(dim=1).max().item()
    measured, b = measured_sensitivity(model, X, steps=100), 0.5
    assert ((1 - b) + b / 3) * (1 - b) * 1.3 < measured <= lipschitz_bound(model)


def test_cap_is_in_rms_units_and_logits_use_one_over_d():
    assert cap(torch.zeros(64, 32), 2.0) == pytest.approx(2.0 * math.sqrt(2.0))
    assert cap(torch.zeros(16, 64), 1.0) == pytest.approx(0.5)
    # one token: RoPE is the identity at position 0, so the logit is s/d ||x||^2 with Q = K = I
    model = tiny(layers=1, heads=2, D=8, s=3.0)
    with torch.no_grad():
        model.attn[0].q.weight.copy_(torch.eye(8)); model.attn[0].k.weight.copy_(torch.eye(8))
    x = torch.randn(1, 1, 8)
    model.blocks(x)
    assert model.attn[0].max_logit == pytest.approx(3.0 / 4 * x[0, 0, :4].pow(2).sum().item(), rel=1e-5) or \
        model.attn[0].max_logit == pytest.approx(3.0 / 4 * x[0, 0, 4:].pow(2).sum().item(), rel=1e-5)


def test_bound_tracks_activation_norms_through_the_residual_stream():
    """Hand value: layer 1 averages with V = cI (the stream's norm bound grows), the MLPs are
    zero (they shrink it by 1 - b), layer 2's logit term then sees the grown radius."""
    c, s, D = 2.5, 2.0, 4
    model = tiny(layers=2, heads=1, D=D, s=s)
    with torch.no_grad():
        a1, a2 = model.attn
        a1.q.weight.zero_(); a1.k.weight.zero_(); a1.v.weight.copy_(c * torch.eye(D)); a1.o.weight.copy_(torch.eye(D))
        for m in (a2.q, a2.k, a2.v, a2.o):
            m.weight.copy_(torch.eye(D))
        for mlp in model.mlp:
            mlp.down.weight.zero_()
        model.head = nn.Linear(D, D, bias=False)
        model.head.weight.copy_(torch.eye(D))
    b, R0 = 1 / 4, 1.5
    R1 = ((1 - b) + b * c / 3) * R0 * (1 - b)
    expected = ((1 - b) + b * c / 3) * (1 - b) * ((1 - b) + b / 3 * (1 + 2 * s / D * R1**2)) * (1 - b)
    assert lipschitz_bound(model, input_norm=R0) == pytest.approx(expected, rel=1e-6)


def test_enforce_warm_starts_power_iteration_so_a_flat_spectrum_ends_within_its_cap():
    """Muon leaves near-flat spectra, where a few cold power iterations under-estimate sigma_max; `enforce`
    restarts each weight's iteration from its previous vector, so repeated projections converge to the cap."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 32, bias=False)
    Q, _ = torch.linalg.qr(torch.randn(32, 32))
    R, _ = torch.linalg.qr(torch.randn(32, 32))
    with torch.no_grad():
        layer.weight.copy_(Q @ torch.diag(torch.linspace(3.0, 2.0, 32)) @ R.T)
    model = nn.Sequential(layer)
    constraint = Constraint("normalize", w_max=1.0, power_iterations=2)
    enforce(model, constraint)
    first = torch.linalg.svdvals(layer.weight)[0].item()
    assert first > 1.05  # two cold iterations miss the top of a flat spectrum by 10%
    for _ in range(30):
        enforce(model, constraint)
    assert torch.linalg.svdvals(layer.weight)[0].item() - 1.0 < (first - 1.0) / 10  # cold restarts: no better
