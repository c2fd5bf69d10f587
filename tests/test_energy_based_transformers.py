"""Energy-Based Transformers (2507.02092): the gradient step (on the distribution, or on the logits), the energy's
sequence layout, causality, the loss."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, LlamaConfig

from paperzoo.architectures.energy_based_transformers import EnergyBasedTransformer, energy_based_transformer, think
from paperzoo.core.blocks import is_causal

V, T = 20, 9


def config() -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=64)


def model(seed: int = 0, **ebt) -> EnergyBasedTransformer:
    torch.manual_seed(seed)
    ebt.setdefault("alpha", 1.0)  # the official 500 is for a far flatter energy than the sharpened one below
    m = energy_based_transformer(config(), **ebt)
    with torch.no_grad():  # a sharper energy than the init's, so steps move the logits visibly
        m.energy_head.weight.normal_(std=1.0)
    return m


def ids(seed: int = 0, rows: int = 3) -> torch.Tensor:
    return torch.randint(V, (rows, T), generator=torch.Generator().manual_seed(seed))


def logits(seed: int = 1, rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, T, V, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("step_space", ["probabilities", "logits"])
@pytest.mark.parametrize("training", [True, False])
def test_alpha_zero_leaves_the_candidate_unchanged(training, step_space):
    """alpha = 0: every step returns the point it differentiated at -- the logits in logit space; in probability space
    the distribution p = softmax(y_hat), which the next step reads as its logits (the official code's convention)."""
    m = model(steps=3, step_space=step_space).train(training)
    with torch.no_grad():
        m.alpha.fill_(0.0)
    y0 = logits()
    out = m(ids(), labels=ids(), y_hat=y0)
    assert len(out.step_logits) == 3
    previous = y0
    for y in out.step_logits:
        assert torch.equal(y.detach(), previous.softmax(-1) if step_space == "probabilities" else previous)
        previous = y.detach()
    with torch.no_grad():
        m.alpha.fill_(1.0)
    moved = m(ids(), y_hat=y0).step_logits[0].detach()
    assert not torch.allclose(moved, y0.softmax(-1) if step_space == "probabilities" else y0, atol=1e-4)  # alpha 1 moves it


def test_probability_step_is_the_gradient_of_the_energy_in_the_distribution():
    """One step from y_hat_0 in float64: (p_0 - y_hat_1) / alpha = grad_p E(x, p) at p_0 = softmax(y_hat_0), against
    central differences of E in p (float32 softmax inside eager attention: difference step 1e-3, as below)."""
    alpha = 0.7
    m = model(steps=1, alpha=alpha).double().eval()  # step_space's default: probabilities, as the official code
    x, y0 = ids(), logits().double()
    p0 = y0.softmax(-1)
    step = (p0 - m(x, y_hat=y0).logits.detach()) / alpha
    g = torch.Generator().manual_seed(3)
    eps = 1e-3
    for _ in range(12):
        b, t, v = (int(torch.randint(n, (), generator=g)) for n in (3, T, V))
        with torch.no_grad():
            up, down = p0.clone(), p0.clone()
            up[b, t, v] += eps
            down[b, t, v] -= eps
            numeric = (m.distribution_energy(x, up).sum() - m.distribution_energy(x, down).sum()) / (2 * eps)
        assert abs(step[b, t, v].item() - numeric.item()) < 1e-3 + 1e-3 * abs(numeric.item())
    assert step.abs().max() > 1e-2  # the gradient is not trivially zero


def test_energy_gradient_matches_finite_differences():
    """Central differences in float64. HF's eager attention takes its softmax in float32 (~1e-7 relative), so the
    difference step is 1e-3 (rounding error ~1e-4) rather than 1e-6; a wrong gradient is off by far more."""
    m = model(step_space="logits").double().eval()
    x, y = ids(), logits().double().requires_grad_()
    _, grad = m.energy_gradient(x, y)
    g = torch.Generator().manual_seed(2)
    eps = 1e-3
    for _ in range(12):
        b, t, v = (int(torch.randint(n, (), generator=g)) for n in (3, T, V))
        with torch.no_grad():
            up, down = y.detach().clone(), y.detach().clone()
            up[b, t, v] += eps
            down[b, t, v] -= eps
            numeric = (m.energy(x, up).sum() - m.energy(x, down).sum()) / (2 * eps)
        assert abs(grad[b, t, v].item() - numeric.item()) < 1e-3 + 1e-3 * abs(numeric.item())


@torch.no_grad()
def test_energy_is_the_base_decoder_on_context_then_candidate_at_the_next_position():
    """E_t = head(decoder([x_0..x_t, softmax(y_t) W_emb]) at positions 0..t, t+1), with the decoder's own causal mask."""
    m = model().eval()
    x, y = ids(rows=2), logits(rows=2)
    E = m.energy(x, y)
    plain = AutoModel.from_config(config(), attn_implementation="eager").eval()
    plain.load_state_dict(m.decoder.state_dict())
    W = plain.get_input_embeddings().weight
    for t in range(T):
        seq = torch.cat([plain.get_input_embeddings()(x[:, :t + 1]), (y[:, t].softmax(-1) @ W)[:, None]], 1)
        positions = torch.cat([torch.arange(t + 1), torch.tensor([t + 1])])[None]
        h = plain(inputs_embeds=seq, position_ids=positions, use_cache=False).last_hidden_state[:, -1]
        assert torch.allclose(E[:, t], m.energy_head(h).squeeze(-1), atol=1e-5)


@pytest.mark.parametrize("detach", [True, False])
def test_the_energy_model_is_causal(detach):
    m = model(steps=3, detach=detach)
    assert is_causal(m, V, T)


def reference_unroll(m: EnergyBasedTransformer, x, labels, y0, K, step_space):
    """y_{i+1} = p_i - alpha dE/dp(p_i), p_i = softmax(y_i), or y_i - alpha dE/dy(y_i), written out; per-step CE of
    y_i at t against x_{t+1}."""
    ys, y = [], y0
    for _ in range(K):
        y = y.detach().requires_grad_()
        if step_space == "probabilities":
            y = y.softmax(-1)
            E = m.distribution_energy(x, y).sum()
        else:
            E = m.energy(x, y).sum()
        (g,) = torch.autograd.grad(E, y, create_graph=True)
        y = y - m.alpha * g
        ys.append(y)
    return [F.cross_entropy(y[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100) for y in ys]


@pytest.mark.parametrize("step_space", ["probabilities", "logits"])
def test_training_loss_is_the_mean_of_the_per_step_cross_entropies(step_space):
    K = 3
    m = model(steps=K, alpha=0.7, step_space=step_space)
    x, y0 = ids(), logits()
    labels = x.clone()
    labels[:, :3] = -100  # positions left out of the loss stay out at every step
    out = m(x, labels=labels, y_hat=y0)
    ces = reference_unroll(m, x, labels, y0, K, step_space)
    assert len(out.step_losses) == K
    for got, want in zip(out.step_losses, ces):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(out.loss, torch.stack(ces).mean(), atol=1e-5)
    assert len({round(c.item(), 4) for c in ces}) == K  # the steps differ, so a mean is not a last step in disguise
    # the loss trains the energy through its gradient, and the step size
    out.loss.backward()
    assert m.alpha.grad is not None and m.alpha.grad.abs() > 0
    assert m.energy_head.weight.grad.abs().sum() > 0
    # evaluation reports the prediction's loss, the last step's; final_step_loss trains on it
    assert torch.allclose(m.eval()(x, labels=labels, y_hat=y0).loss, ces[-1], atol=1e-5)
    last = model(steps=K, alpha=0.7, step_space=step_space, final_step_loss=True)
    assert torch.allclose(last(x, labels=labels, y_hat=y0).loss, ces[-1], atol=1e-5)


def test_think_keeps_the_lowest_final_energy_candidate_per_position():
    m = model().eval()
    x, n = ids(), 4
    y0 = torch.randn(n, 3, T, V, generator=torch.Generator().manual_seed(5))
    picked, E = think(m, x, steps=3, y_hat=y0)
    each = [think(m, x, steps=3, y_hat=y0[c:c + 1]) for c in range(n)]
    energies = torch.stack([e for _, e in each])  # [n, B, T]
    assert torch.allclose(E, energies.min(0).values, atol=1e-5)
    best = energies.argmin(0)
    want = torch.stack([lg for lg, _ in each]).gather(0, best[None, ..., None].expand(1, 3, T, V))[0]
    assert torch.allclose(picked, want, atol=1e-5)
    assert (best != best[0, 0]).any()  # different positions keep different candidates
    # more steps than trained run the same update further
    assert not torch.allclose(think(m, x, steps=5, y_hat=y0[:1])[0], each[0][0], atol=1e-4)


def test_regularisers_act_in_training_only():
    x, y0 = ids(), logits()
    plain = model(steps=2)
    noisy = model(steps=2, langevin_std=1.0, step_size_scale=2.0)
    assert not torch.allclose(noisy(x, y_hat=y0).logits, plain(x, y_hat=y0).logits, atol=1e-4)
    # Langevin noise perturbs the logits, before the softmax: a step of size 0 still returns a distribution
    p = model(steps=2, langevin_std=1.0, alpha=0.0)(x, y_hat=y0).logits
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5) and not torch.allclose(p, y0.softmax(-1))
    noisy.eval(), plain.eval()
    assert torch.allclose(noisy(x, y_hat=y0).logits, plain(x, y_hat=y0).logits, atol=1e-6)
    assert torch.equal(noisy(x).logits, noisy(x).logits)  # eval: a fixed initial draw
    varied = model(steps=2, extra_steps=3)
    counts = {len(varied(x, labels=x).step_losses) for _ in range(12)}
    assert counts <= {2, 3, 4, 5} and len(counts) > 1
    assert len(varied.eval()(x, labels=x).step_losses) == 2


def test_replay_buffer_restarts_rows_from_their_final_logits():
    m = model(steps=1, replay_size=4, replay_fraction=1.0, step_space="logits")
    with torch.no_grad():
        m.alpha.fill_(0.0)  # the logits stay where they start, so the loss shows where each row started
    x1, y1 = ids(1), logits(1)
    m(x1, labels=x1, y_hat=y1)
    assert len(m.replay) == 3
    x2, y2 = ids(2, rows=1), logits(2, rows=1)
    out = m(x2, labels=x2, y_hat=y2)
    assert out.logits.shape[0] == 1  # only the fresh rows come back
    # the batch's loss covers the fresh row and one replayed row that restarted from its stored logits
    ce = lambda y, lab: F.cross_entropy(y[:, :-1].reshape(-1, V), lab[:, 1:].reshape(-1), reduction="none")
    candidates = [torch.cat([ce(y2, x2), ce(y1[i:i + 1], x1[i:i + 1])]).mean() for i in range(3)]
    assert any(torch.allclose(out.loss, c, atol=1e-5) for c in candidates)
