import math

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
    apply_lynx,
    apply_static_top_k,
    compress,
    lynx_selection,
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


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="no sparse-MoE"):
        apply_lynx(tiny("llama"))
    with pytest.raises(ValueError):
        lynx_selection(P, 2, LynxConfig(num_kept=0))
    with pytest.raises(ValueError):
        lynx_selection(P[0], 2, LynxConfig())
    with pytest.raises(ValueError):
        apply_lynx(tiny_moe("mixtral"), prefill_tokens=-1)


def test_compress_installs_lynx_on_a_copy():
    model = tiny_moe("mixtral")
    result = compress(model, LynxConfig(num_kept=2))
    assert result.report["reduced_layers"] == [0, 1, 2] and result.report["size_ratio"] == 1.0
    step = IDS[:, :1]  # one new token for each of 6 sequences: a decode step
    before = model(input_ids=step).logits
    assert not torch.allclose(result.model(input_ids=step).logits, before, atol=1e-4)
    assert torch.equal(model(input_ids=step).logits, before), "the original model must stay unhooked"


def test_predicate_by_hand():
    from paperzoo.experiments.compression.lynx_expert_selection import checks

    def metrics(acc_lynx, ppl_lynx, speedups):
        return {"quality": {"1": {}, "64": {"full": {"accuracy": 0.30, "perplexity": 100.0},
                                            "lynx": {"accuracy": acc_lynx, "perplexity": ppl_lynx},
                                            "top1": {"accuracy": 0.28, "perplexity": 110.0}}},
                "latency_implementation": "grouped_mm",
                "latency": {"grouped_mm": {str(b): {"speedup_lynx": v} for b, v in zip((1, 4, 16, 64), speedups)}}}

    assert list(checks(metrics(0.295, 105.0, [0.9, 1.0, 1.1, 1.25])).values()) == [True, True, True]
    # 1.1 points lost; perplexity above top-1; best speed-up 1.19x
    assert list(checks(metrics(0.289, 110.5, [0.9, 1.0, 1.19, 1.1])).values()) == [False, False, False]
