"""Mixture-of-Recursions (2507.10524): routing, hierarchical filtering, recursion-wise attention, causality."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paperzoo.architectures.mixture_of_recursions import (
    MixtureOfRecursions, RecursionConfig, kv_cache_entries, mixture_of_recursions, unique_block_parameters)

V, T = 50, 18


def config(layers: int = 8) -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def model(seed: int = 0, layers: int = 8, **recursion) -> MixtureOfRecursions:
    torch.manual_seed(seed)
    return mixture_of_recursions(config(layers), **recursion)


def ids(seed: int = 0, rows: int = 3) -> torch.Tensor:
    return torch.randint(V, (rows, T), generator=torch.Generator().manual_seed(seed))


def unit_gates(m: MixtureOfRecursions, route_to: int | None = None) -> None:
    """Routers that score every token the same and give a gate of exactly 1 (sigmoid(60) == softmax peak == 1)."""
    with torch.no_grad():
        if m.recursion.routing == "expert":
            for router in m.routers:
                router.weight.zero_(), router.bias.fill_(60.0)
        else:
            m.router.weight.zero_(), m.router.bias.fill_(-60.0), m.router.bias[route_to].fill_(60.0)


@torch.no_grad()
def test_fixed_recursion_is_a_weight_tied_hf_llama():
    """routing="none" equals transformers' own LlamaForCausalLM whose middle layers are the shared block, N_r times."""
    m = model(routing="none").eval()
    hf = LlamaForCausalLM(config(8)).eval()
    hf.model.embed_tokens, hf.model.norm, hf.lm_head = m.embed_tokens, m.norm, m.lm_head
    hf.model.layers = torch.nn.ModuleList([m.first, *list(m.block) * 3, m.last])
    x = ids()
    assert torch.allclose(m(x).logits, hf(input_ids=x, use_cache=False).logits, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("training", [True, False])
def test_full_capacity_unit_gates_equal_fixed_recursion(training):
    fixed = model(routing="none")
    expert = model(routing="expert", capacities=(1.0, 1.0, 1.0))
    expert.load_state_dict(fixed.state_dict(), strict=False)
    unit_gates(expert)
    fixed.train(training), expert.train(training)
    x = ids()
    assert torch.allclose(expert(x).logits, fixed(x).logits, atol=1e-5)
    assert (expert(x).depths == 3).all()
    # a gate below 1 changes the outputs: the gate multiplies the block's update
    with torch.no_grad():
        expert.routers[1].bias.fill_(0.0)
    assert not torch.allclose(expert(x).logits, fixed(x).logits, atol=1e-3)


@torch.no_grad()
def test_token_choice_at_full_depth_with_unit_gate_equals_fixed_recursion():
    fixed = model(routing="none")
    token = model(routing="token")
    token.load_state_dict(fixed.state_dict(), strict=False)
    unit_gates(token, route_to=2)
    x = ids()
    assert torch.allclose(token(x).logits, fixed(x).logits, atol=1e-5)
    unit_gates(token, route_to=0)  # one recursion only
    assert (token(x).depths == 1).all()
    assert not torch.allclose(token(x).logits, fixed(x).logits, atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("seed", range(4))
def test_each_recursion_selects_within_the_previous_ones_tokens(seed):
    m = model(seed, routing="expert").train()
    # recursion 3 prefers exactly the tokens recursion 2 ranks lowest: an unfiltered top-k would pick them
    m.routers[2].weight.copy_(-m.routers[1].weight)
    m.routers[2].bias.copy_(-m.routers[1].bias)
    out = m(ids(seed))
    for r, (before, now) in enumerate(zip(out.selected, out.selected[1:]), start=1):
        assert not (now & ~before).any(), f"recursion {r + 1} processed tokens recursion {r} dropped"
    # k_r = floor(c_r T) tokens per row, c = (1, 2/3, 1/3)
    assert [s.sum(1).tolist() for s in out.selected] == [[T] * 3, [int(2 / 3 * T)] * 3, [int(1 / 3 * T)] * 3]
    assert torch.equal(out.depths, sum(s.long() for s in out.selected))


@torch.no_grad()
def test_attention_at_a_recursion_sees_only_its_active_tokens():
    """apply_block = the shared block run on each row's active tokens alone, at their own positions."""
    m = model(routing="expert").eval()
    h = torch.randn(2, T, 32)
    positions = m.rotary_emb(h, torch.arange(T)[None])
    active = torch.rand(2, T, generator=torch.Generator().manual_seed(1)) < 0.5  # rows with different counts
    out = m.apply_block(h, active, positions)
    for b in range(2):
        keep = active[b].nonzero().squeeze(1)
        x = h[b:b + 1, keep]
        pos = tuple(p[:, keep] for p in positions)
        mask = torch.ones(len(keep), len(keep), dtype=torch.bool).tril()[None, None]
        for layer in m.block:
            x = layer(x, attention_mask=mask, position_embeddings=pos)
        assert torch.allclose(out[b, keep], x[0], atol=1e-5)
        assert torch.equal(out[b, ~active[b]], h[b, ~active[b]])  # exited tokens are untouched
    # and a token inactive at this recursion cannot change what active ones compute there
    h2 = h.clone()
    h2[~active] = torch.randn(int((~active).sum()), 32)
    assert torch.allclose(m.apply_block(h2, active, positions)[active], out[active], atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("causal_router", ["aux_router", "aux_loss"])
def test_expert_choice_is_causal_at_inference_and_not_in_training(causal_router):
    m = model(routing="expert", causal_router=causal_router)
    with torch.no_grad():  # predictors that keep some tokens and drop others
        for router in (m.aux_routers if causal_router == "aux_router" else m.routers):
            router.weight.normal_(std=1.0)
    x = ids(rows=1)
    changed = x.clone()
    changed[:, T // 2:] = (changed[:, T // 2:] + 7) % V

    def prefix(mode: bool, tokens):
        m.train(mode)
        out = m(tokens)
        return out.logits[:, : T // 2], out.depths[:, : T // 2]

    logits, depths = prefix(False, x)
    assert 0 < depths.float().mean() < 3  # the predictor really routes
    assert torch.allclose(prefix(False, changed)[0], logits, atol=1e-6)
    # the training-time top-k ranks against the future: the prefix's routing depends on it
    futures = [torch.cat([x[:, : T // 2], torch.randint(V, (1, T - T // 2), generator=torch.Generator().manual_seed(s))], 1)
               for s in range(8)]
    assert any(not torch.equal(prefix(True, f)[1], prefix(True, x)[1]) for f in futures)


def test_auxiliary_bce_trains_only_the_auxiliary_router():
    m = model(routing="expert", causal_router="aux_router", aux_coeff=1.0).train()
    x = ids()
    out = m(x, labels=x)
    (out.loss - out.lm_loss).backward()  # the auxiliary BCE alone
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in m.aux_routers)
    assert all(p.grad is None or p.grad.abs().sum() == 0
               for p in [*m.block.parameters(), *m.first.parameters(), *m.routers.parameters()])


def test_balancing_loss_known_values():
    m = model(routing="token")
    with torch.no_grad():
        m.router.weight.zero_(), m.router.bias.zero_()  # uniform p: N_r * sum_j f_j / N_r = 1 whatever f is
    assert m(ids()).routing_loss.item() == pytest.approx(1.0, abs=1e-6)
    unit_gates(m, route_to=1)  # all tokens to depth 2 with p = 1: N_r * 1 * 1 = 3
    assert m(ids()).routing_loss.item() == pytest.approx(3.0, abs=1e-5)


def test_loss_includes_the_routing_loss_and_trains_the_router():
    m = model(routing="token", balance_coeff=0.5).train()
    x = ids()
    out = m(x, labels=x)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 0.5 * out.routing_loss.item(), rel=1e-6)
    out.loss.backward()
    assert m.router.weight.grad.abs().sum() > 0


def test_parameters_kv_and_config_checks():
    m = model(routing="expert", layers=14, num_recursions=4)
    assert len(m.block) == 3
    vanilla = LlamaForCausalLM(config(14))
    body = sum(p.numel() for p in vanilla.model.layers.parameters()) + sum(p.numel() for p in vanilla.model.norm.parameters())
    assert unique_block_parameters(m) / body == pytest.approx((2 * 1 + 3) / 14, rel=1e-3)  # 5 of 14 layers
    out = m.train()(ids())
    kv = kv_cache_entries(out.selected, block_layers=3)
    assert kv.tolist() == [2 * T + 3 * sum(int(c * T) for c in (1, 3 / 4, 2 / 4, 1 / 4))] * 3
    assert kv_cache_entries(out.selected, 3, sharing=True).tolist() == [5 * T] * 3
    with pytest.raises(ValueError):
        RecursionConfig(capacities=(1 / 3, 2 / 3, 1.0))
    with pytest.raises(ValueError):
        model(layers=7)


@torch.no_grad()
def test_the_experiments_gate_control_is_fixed_recursion_with_mor_gates():
    """The reported "fixed + gate" arm: every token at every recursion, each update scaled by a sigmoid gate."""
    from paperzoo.experiments.architectures import mixture_of_recursions as experiment

    s = experiment.SCALES["smoke"]
    fixed, gated = experiment.build("fixed", s).eval(), experiment.build(experiment.GATED, s)
    gated.load_state_dict(fixed.state_dict(), strict=False)
    x = torch.randint(s["vocab"], (2, s["seq_len"]), generator=torch.Generator().manual_seed(0))
    for training in (True, False):
        assert (gated.train(training)(x).depths == s["recursions"]).all()
    assert not torch.allclose(gated(x).logits, fixed(x).logits, atol=1e-3)  # gates of about 1/2 at initialisation
    unit_gates(gated)
    assert torch.allclose(gated(x).logits, fixed(x).logits, atol=1e-5)
