import math

import numpy as np
import pytest
import torch
from tiny_models import tiny
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from paperzoo.compression.lynx_expert_selection import (
    LynxConfig,
    TinyMoEConfig,
    _active,
    apply_lynx,
    apply_matched_random,
    apply_static_top_k,
    compress,
    lynx_selection,
    matched_random_selection,
    moe_layers,
    static_top_k_selection,
)

IDS = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(1))
COMMON = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny_moe(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2, **overrides))
    elif arch == "qwen2_moe":  # shared expert, un-normalised top-k weights, layer 1 dense
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                                   shared_expert_intermediate_size=32, norm_topk_prob=False,
                                                   mlp_only_layers=[1], **overrides))
    elif arch == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                                                   norm_topk_prob=True, head_dim=8, **overrides))
    else:
        raise ValueError(arch)
    # HF initialises Qwen routers to zero (uniform routing); random routers make the routing non-trivial
    for layer in moe_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=0.5)
    return model.eval()


ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")

# Three tokens, four experts, top-2 (hand-worked in the comments of test_selection_by_hand).
P = torch.tensor([[[0.50, 0.35, 0.10, 0.05],
                   [0.05, 0.05, 0.70, 0.20],
                   [0.04, 0.20, 0.06, 0.70]]])


def routes(sel):
    return [[(int(i), round(float(w), 5)) for i, w in zip(ii, ww)] for ii, ww in zip(sel.indices[0], sel.weights[0])]


def hand(*tokens):
    return [[(e, round(w, 5)) for e, w in token] for token in tokens]


def test_selection_by_hand():
    # top-2: t0 -> (0: .50, 1: .35), ratio .7 >= 1/2: critical; t1 -> (2: .7, 3: .2), ratio .29: not;
    # t2 -> (3: .7, 1: .2), not. Importance w = [.50, .35, .70, .70] (t1's e3 and t2's e1 filtered out).
    no_cap = lynx_selection(P, 2, LynxConfig())
    assert no_cap.kept[0].tolist() == [True, True, True, True]
    assert routes(no_cap) == hand([(0, 0.5 / 0.85), (1, 0.35 / 0.85)], [(2, 0.7 / 0.9), (3, 0.2 / 0.9)],
                                  [(3, 0.7 / 0.9), (1, 0.2 / 0.9)])
    # cap 3: keep {2, 3, 0}; t0 loses e1 and takes e2, t2 loses e1 and takes e2
    three = lynx_selection(P, 2, LynxConfig(num_kept=3))
    assert three.kept[0].tolist() == [True, False, True, True]
    assert routes(three) == hand([(0, 0.5 / 0.6), (2, 0.1 / 0.6)], [(2, 0.7 / 0.9), (3, 0.2 / 0.9)],
                                 [(3, 0.7 / 0.76), (2, 0.06 / 0.76)])
    # cap 2: keep {2, 3}; even t0's top-1 is replaced
    two = lynx_selection(P, 2, LynxConfig(num_kept=2))
    assert two.kept[0].tolist() == [False, False, True, True]
    assert routes(two)[0] == hand([(2, 0.1 / 0.15), (3, 0.05 / 0.15)])[0]
    # the less lossy variant: t0's critical assignments survive the cap, the others are re-routed as before
    protected = lynx_selection(P, 2, LynxConfig(num_kept=2, protect_critical=True))
    assert routes(protected) == [routes(no_cap)[0], routes(two)[1], routes(two)[2]]
    # margin 0: only top-1s are critical, so w = [.5, 0, .7, .7] and t0's second expert goes
    strict = lynx_selection(P, 2, LynxConfig(affinity_margin=0.0))
    assert strict.kept[0].tolist() == [True, False, True, True]
    assert routes(strict)[0] == hand([(0, 0.5 / 0.6), (2, 0.1 / 0.6)])[0]
    # router without renormalisation (Qwen's default): raw probabilities
    raw = lynx_selection(P, 2, LynxConfig(num_kept=3), normalize=False)
    assert routes(raw)[0] == hand([(0, 0.5), (2, 0.1)])[0]


def test_kept_set_smaller_than_k_pads_with_zero_weight():
    p = torch.tensor([[[0.9, 0.05, 0.03, 0.02]]])  # one confident token: only its top-1 is critical
    sel = lynx_selection(p, 2, LynxConfig())
    assert sel.kept[0].tolist() == [True, False, False, False]
    assert routes(sel) == hand([(0, 1.0), (0, 0.0)])


def test_steps_are_independent():
    q = torch.softmax(torch.randn(5, 7, 8, generator=torch.Generator().manual_seed(0)), -1)
    joint = lynx_selection(q, 2, LynxConfig(num_kept=3))
    for g in range(5):
        alone = lynx_selection(q[g : g + 1], 2, LynxConfig(num_kept=3))
        assert torch.equal(alone.indices[0], joint.indices[g]) and torch.equal(alone.kept[0], joint.kept[g])
    assert (joint.kept.sum(-1) <= 3).all()
    # every token is routed only inside its step's kept set
    assert torch.gather(joint.kept[:, None, :].expand(-1, 7, -1), -1, joint.indices).all()


def test_static_top_k_by_hand():
    sel = static_top_k_selection(P, 1)
    assert routes(sel) == hand([(0, 1.0)], [(2, 1.0)], [(3, 1.0)])
    assert sel.kept[0].tolist() == [True, False, True, True]


@pytest.mark.parametrize("arch", ARCHS)
def test_disabled_reduction_leaves_logits_identical(arch):
    model = tiny_moe(arch)
    ref = model(input_ids=IDS).logits
    with apply_lynx(model, LynxConfig(num_kept=1), prefill_tokens=IDS.shape[1]):  # every position is prefill
        assert torch.equal(model(input_ids=IDS).logits, ref)
    with apply_lynx(model, LynxConfig(num_kept=1)):  # generation mode: a multi-token forward is prefill
        assert torch.equal(model(input_ids=IDS).logits, ref)
    assert torch.equal(model(input_ids=IDS).logits, ref), "removing the hooks must restore the model"


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_every_expert_leaves_logits_identical(arch):
    model = tiny_moe(arch)
    ref = model(input_ids=IDS).logits
    N = moe_layers(model)[0].num_experts
    for config in (LynxConfig(affinity_margin=math.inf), LynxConfig(num_kept=N, affinity_margin=math.inf)):
        with apply_lynx(model, config, prefill_tokens=0) as hooks:
            assert torch.equal(model(input_ids=IDS).logits, ref)
            assert hooks.mean_active_experts() == hooks.mean_full_experts()


@pytest.mark.parametrize("arch", ARCHS)
def test_reduction_changes_decode_positions_only(arch):
    model = tiny_moe(arch)
    ref = model(input_ids=IDS).logits
    with apply_lynx(model, LynxConfig(num_kept=2), prefill_tokens=5) as hooks:
        out = model(input_ids=IDS).logits
    assert torch.allclose(out[:, :5], ref[:, :5], atol=1e-5)  # prefill: full routing (up to matmul blocking)
    assert not torch.allclose(out[:, 5:], ref[:, 5:], atol=1e-3)
    assert hooks.mean_active_experts() <= 2 < hooks.mean_full_experts()


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_steps_route_only_to_kept_experts(arch):
    model = tiny_moe(arch)
    seen = []
    layers = moe_layers(model)
    spies = [layer.experts.register_forward_pre_hook(lambda mod, args, _i=layer.index: seen.append((_i, args[1].clone())))
             for layer in layers]
    m = 3
    prompt = IDS[:, :4]
    with torch.no_grad(), apply_lynx(model, LynxConfig(num_kept=m), record=True) as hooks:
        out = model(input_ids=prompt, use_cache=True)
        seen.clear()  # the prefill used full routing
        for _ in range(5):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
    for s in spies:
        s.remove()
    assert len(seen) == 5 * len(layers)
    steps = {layer.index: 0 for layer in layers}
    for index, routed in seen:
        kept = hooks.stats[index].kept_history[steps[index]]
        steps[index] += 1
        assert kept.sum() <= m
        assert kept[routed.unique()].all(), f"layer {index} ran an expert outside its kept set"
    assert all(len(hooks.stats[i].kept_history) == 5 for i in steps)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_teacher_forced_decoding_equals_lockstep_generation(arch):
    model = tiny_moe(arch)
    config, P, steps = LynxConfig(num_kept=3), 5, 6
    with torch.no_grad(), apply_lynx(model, config):
        out = model(input_ids=IDS[:, :P], use_cache=True)
        seq, logits = IDS[:, :P], []
        for _ in range(steps):
            seq = torch.cat([seq, out.logits[:, -1:].argmax(-1)], 1)
            out = model(input_ids=seq[:, -1:], cache=out.cache, use_cache=True)
            logits.append(out.logits[:, -1])
    generated = torch.stack(logits, 1)  # predictions made by the decode steps at positions P .. P+steps-1
    with torch.no_grad(), apply_lynx(model, config, prefill_tokens=P):
        forced = model(input_ids=seq).logits[:, P:]
    assert torch.allclose(generated, forced, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(generated, model(input_ids=seq).logits[:, P:], atol=1e-3)


def test_only_chosen_layers_are_reduced():
    model = tiny_moe("mixtral")
    with apply_lynx(model, LynxConfig(num_kept=1, layers=(1,)), prefill_tokens=0) as hooks:
        model(input_ids=IDS)
    assert list(hooks.stats) == [1] and hooks.stats[1].mean_active == 1.0
    qwen = tiny_moe("qwen2_moe")
    assert [m.index for m in moe_layers(qwen)] == [0, 2]  # layer 1 is dense
    with pytest.raises(ValueError, match="no MoE block"):
        apply_lynx(qwen, LynxConfig(layers=(1,)))


def test_static_top1_baseline():
    model = tiny_moe("mixtral")
    with apply_static_top_k(model, 1, prefill_tokens=0) as hooks:
        a = model(input_ids=IDS).logits
    with apply_lynx(model, LynxConfig(affinity_margin=0.0, num_kept=None), prefill_tokens=0):
        # margin 0 and no cap: the kept set is the batch's top-1s, so tokens get second experts among them
        b = model(input_ids=IDS).logits
    assert not torch.allclose(a, b, atol=1e-4)
    assert hooks.mean_active_experts() < hooks.mean_full_experts()
    ref = model(input_ids=IDS).logits
    with apply_static_top_k(model, 1, prefill_tokens=4):  # padded to width k when mixed with prefill
        c = model(input_ids=IDS).logits
    assert torch.allclose(c[:, :4], ref[:, :4], atol=1e-5) and not torch.allclose(c[:, 4:], ref[:, 4:], atol=1e-4)
    with apply_static_top_k(model, 2, prefill_tokens=0):  # k = the model's own: nothing changes
        assert torch.equal(model(input_ids=IDS).logits, model(input_ids=IDS).logits)
    with pytest.raises(ValueError):
        apply_static_top_k(model, 3)


def test_unsupported_router_is_refused():
    model = tiny_moe("mixtral")
    router = moe_layers(model)[0].router

    def sigmoid_weights(module, args, output):  # e.g. a sigmoid router: not softmax-top-k
        logits, _, indices = output
        return logits, torch.sigmoid(logits.gather(-1, indices)), indices

    router.register_forward_hook(sigmoid_weights)
    with apply_lynx(model, LynxConfig(num_kept=2), prefill_tokens=0), pytest.raises(ValueError, match="softmax-top-k"):
        model(input_ids=IDS)


def test_matched_random_keeps_as_many_experts_as_lynx_chosen_at_random():
    q = torch.softmax(2 * torch.randn(40, 16, 8, generator=torch.Generator().manual_seed(0)), -1)
    config = LynxConfig(num_kept=3)
    lynx = lynx_selection(q, 2, config)
    draws = [matched_random_selection(q, 2, config, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    random = draws[0]
    assert torch.equal(random.kept.sum(-1), lynx.kept.sum(-1))  # the same kept-set size, step by step
    # ... and the same distinct experts actually used (every kept expert receives a token in both)
    assert torch.equal(_active(random.indices, random.weights, 8).sum(-1), _active(lynx.indices, lynx.weights, 8).sum(-1))
    requested = torch.zeros(40, 8, dtype=torch.bool).scatter_(-1, q.topk(2, -1).indices.reshape(40, -1), True)
    assert not (random.kept & ~requested).any()  # drawn among the experts the batch asks for
    assert torch.gather(random.kept[:, None, :].expand(-1, 16, -1), -1, random.indices).all()  # routed inside
    assert torch.equal(draws[0].kept, draws[1].kept) and not torch.equal(draws[0].kept, draws[2].kept)
    assert not torch.equal(random.kept, lynx.kept)  # chance, not router confidence, picks the experts
    # a token whose top-k survives keeps its router weights: the re-routing is Lynx's own
    same = (random.indices == q.topk(2, -1).indices).all(-1)
    top = q.topk(2, -1).values
    assert torch.allclose(random.weights[same], (top / top.sum(-1, keepdim=True))[same])
    with pytest.raises(ValueError, match="protect_critical"):
        matched_random_selection(q, 2, LynxConfig(num_kept=3, protect_critical=True), torch.Generator())


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_matched_random_in_a_model_uses_lynx_expert_counts(arch):
    model = tiny_moe(arch)
    config = LynxConfig(num_kept=3)
    with apply_lynx(model, config, prefill_tokens=4) as lynx:
        a = model(input_ids=IDS).logits
    with apply_matched_random(model, config, seed=0, prefill_tokens=4) as random:
        b = model(input_ids=IDS).logits
    assert lynx.mean_active_experts() == random.mean_active_experts() < lynx.mean_full_experts()
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5) and not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="no sparse-MoE"):
        apply_lynx(tiny("llama"))
    with pytest.raises(ValueError, match="no sparse-MoE"):
        compress(tiny("llama"))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_kept must be None or an integer >= 1"):
            LynxConfig(num_kept=bad)
    with pytest.raises(ValueError, match="affinity_margin must be a number >= 0"):
        LynxConfig(affinity_margin=float("nan"))
    with pytest.raises(ValueError, match="layers must be None or decoder-layer indices"):
        LynxConfig(layers=(-1,))
    with pytest.raises(ValueError, match="protect_critical must be True or False"):
        LynxConfig(protect_critical="yes")
    with pytest.raises(ValueError, match="steps, batch, experts"):
        lynx_selection(P[0], 2, LynxConfig())
    with pytest.raises(ValueError, match="k must be an integer from 1 to the 4 experts"):
        lynx_selection(P, 5, LynxConfig())
    with pytest.raises(ValueError, match="prefill_tokens must be None or an integer >= 0"):
        apply_lynx(tiny_moe("mixtral"), prefill_tokens=-1)
    with pytest.raises(ValueError, match="config must be a LynxConfig"):
        apply_lynx(tiny_moe("mixtral"), {"num_kept": 2})
    with pytest.raises(ValueError, match="k must be an integer from 1 to the model's top-k 2"):
        apply_static_top_k(tiny_moe("mixtral"), 1.0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        apply_matched_random(tiny_moe("mixtral"), LynxConfig(num_kept=2), seed=-3)
    with pytest.raises(ValueError, match=r"TinyMoEConfig\.top_k must be at most num_experts"):
        TinyMoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match=r"TinyMoEConfig\.num_layers must be an integer >= 1"):
        TinyMoEConfig(num_layers=0)


def test_the_moe_substrate_is_cached_with_its_card(smoke_lm, paperzoo_home):
    from transformers import MixtralForCausalLM

    from paperzoo.core import substrate
    from paperzoo.core.models import substrate_used
    from paperzoo.experiments.compression.lynx_expert_selection import SCALES, moe_lm

    assert "moe-lm" in substrate.BUILDERS
    substrate.build(["moe-lm"], "smoke")  # trains and caches
    entries = [p for p in (paperzoo_home / "models").iterdir() if p.name.startswith("moe-lm-smoke-")]
    assert len(entries) == 1
    with substrate_used() as cards:
        moe = moe_lm("smoke")  # loads the cached entry
    assert isinstance(moe.model, MixtralForCausalLM) and not moe.model.config.output_router_logits
    assert moe.tokenizer is not None and moe.seq_len == SCALES["smoke"]["seq_len"]
    card = next(c for c in cards if c["name"] == entries[0].name)
    assert card["parameters"] == sum(p.numel() for p in moe.model.parameters()) and "validation" in card
    assert "4 experts, top-2" in card["architecture"]
    assert [p.name for p in (paperzoo_home / "models").iterdir() if p.name.startswith("moe-lm-smoke-")] == [
        entries[0].name]  # loaded, not trained again
    with pytest.raises(ValueError, match="no 'large' scale"):
        moe_lm("large")


def test_compress_installs_lynx_on_a_copy():
    model = tiny_moe("mixtral")
    result = compress(model, LynxConfig(num_kept=2))
    assert result.report["reduced_layers"] == [0, 1, 2] and result.report["size_ratio"] == 1.0
    step = IDS[:, :1]  # one new token for each of 6 sequences: a decode step
    before = model(input_ids=step).logits
    assert not torch.allclose(result.model(input_ids=step).logits, before, atol=1e-4)
    assert torch.equal(model(input_ids=step).logits, before), "the original model must stay unhooked"


def _metrics(acc_lynx, nll_lynx, nll_random, noise=0.0, full_experts=7.5, n=128):
    """Per-row accuracy and NLL at batch 64 around the given means (rows differ, shared by every routing)."""
    rng = np.random.default_rng(0)
    acc_rows, nll_rows = rng.normal(0.0, 0.05, n), rng.normal(0.0, 0.3, n)

    def rows(base, mean, scale):
        return list(mean + base - base.mean() + rng.normal(0.0, noise * scale, n))

    def arm(acc, nll):
        return {"row_accuracy": rows(acc_rows, acc, 0.05), "row_nll": rows(nll_rows, nll, 0.3),
                "full_experts": full_experts}

    return {"num_kept": 4, "unigram_row_nll": rows(nll_rows, 7.0, 0.0),
            "quality": {"1": {}, "64": {"full": arm(0.30, 5.0), "lynx": arm(acc_lynx, nll_lynx),
                                        "random": arm(0.25, nll_random)}}}


def test_predicate_by_hand():
    from paperzoo.experiments.compression.lynx_expert_selection import checks, preconditions

    assert list(checks(_metrics(0.295, 5.05, 5.20)).values()) == [True, True]
    assert list(preconditions(_metrics(0.295, 5.05, 5.20)).values()) == [True, True]
    # 1.5 points lost; worse than random dropping at the same budget
    assert list(checks(_metrics(0.285, 5.25, 5.20)).values()) == [False, False]
    # exactly as good as random dropping: neither shown nor refuted
    assert list(checks(_metrics(0.295, 5.20, 5.20)).values())[1] is None
    # within a point on average, better than random on average, but rows disagree far more than that: undecided
    assert list(checks(_metrics(0.295, 5.05, 5.06, noise=2.0)).values()) == [None, None]
    # the MoE no better than a unigram model; batching that activates no more experts than Lynx keeps
    untrained = _metrics(0.295, 5.05, 5.20)
    untrained["quality"]["64"]["full"]["row_nll"] = untrained["unigram_row_nll"]
    assert list(preconditions(untrained).values()) == [False, True]
    assert list(preconditions(_metrics(0.295, 5.05, 5.20, full_experts=3.9)).values()) == [True, False]


def test_decode_quality_rows_and_the_unigram_reference():
    from paperzoo.experiments.compression.lynx_expert_selection import SCALES, decode_quality, unigram_row_nll

    model, s = tiny_moe("mixtral"), {**SCALES["smoke"], "num_kept": 3}
    rows = IDS.repeat(2, 1)
    q = decode_quality(model, rows, 4, 5, "lynx", s)
    assert len(q["row_nll"]) == len(q["row_accuracy"]) == 12
    assert q["loss"] == pytest.approx(np.mean(q["row_nll"]), rel=1e-4)
    with torch.no_grad():  # batch 4: rows 0-3, 4-7, 8-11; full routing per row equals the plain model
        full = decode_quality(model, rows, 4, 5, "full", s)
        logits = model(input_ids=rows).logits[:, 5:-1]
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows[:, 6:], reduction="none").mean(1)
    assert np.allclose(full["row_nll"], expected.tolist(), rtol=1e-4)
    # unigram: add-one counts over the training tokens, scored on the decode positions
    train = torch.tensor([[0, 0, 1, 2]])
    got = unigram_row_nll(train, torch.tensor([[0, 0, 1, 3]]), 1, 4)  # decode targets: 1, 3
    p = torch.tensor([3.0, 2.0, 2.0, 1.0]) / 8
    assert got == pytest.approx([-(p[1].log() + p[3].log()).item() / 2], rel=1e-4)


def test_the_record_names_the_moe_and_refuses_a_users_model(smoke_lm, tmp_path):
    from paperzoo.core.experiment import ExperimentError, run_experiment

    record = run_experiment("lynx-expert-selection", "smoke", out=tmp_path)
    assert record["model"].startswith("paperzoo moe-lm-smoke")  # what was measured, not the dense base LM
    assert any(card["name"].startswith("moe-lm-smoke-") for card in record["substrate"])
    assert record["seed_varies"] and set(record["preconditions"]) and set(record["checks"])
    with pytest.raises(ExperimentError, match="does not take --model"):
        run_experiment("lynx-expert-selection", "smoke", model=str(tmp_path), out=tmp_path)
