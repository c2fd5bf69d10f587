import copy
import math
from types import SimpleNamespace

import pytest
import torch
from tiny_models import ARCHS, tiny

from paperzoo.decoding import greedy_decode
from paperzoo.decoding.svip_draft_length import (
    SVIP,
    FixedLength,
    entropy,
    greedy_verification,
    rejection_verification,
    speculative_decode,
    transformers_assisted_decode,
)
from paperzoo.experiments.decoding.svip_draft_length import (
    checks,
    entropy_acceptance,
    fixed_frontier_draft_passes,
    preconditions,
)

EOS = 63


class SpaceTokenizer:
    """Token ids written as numbers separated by spaces, for the 64-token tiny models."""

    eos_token_id = EOS

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([[int(t) for t in text.split()]])}

    def decode(self, tokens):
        return " ".join(map(str, tokens))


PROMPTS = ["1 2 3 4", "17 5 40 40 2 9", "33"]


def noisy_copy(model, scale, seed=0):
    """A draft that agrees with the target often but not always."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn_like(p))
    return draft


# --- the stopping rule -------------------------------------------------------------------------------------------

def test_svip_stopping_rule_by_hand():
    svip = SVIP()  # c = 0.15, tau = 0.3: stop when H_q > 0.3^2 / 0.15 = 0.6 nats
    coin = torch.tensor([0.5, 0.5])  # H = ln 2 = 0.693; sqrt(0.15 * 0.693) = 0.322 > 0.3
    skewed = torch.tensor([0.9, 0.1])  # H = 0.325; sqrt(0.15 * 0.325) = 0.221
    assert entropy(coin).item() == pytest.approx(math.log(2))
    assert entropy(skewed).item() == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))
    assert svip.stop(entropy(coin).item()) and not svip.stop(entropy(skewed).item())
    assert svip.acceptance_bound(math.log(2)) == pytest.approx(1 - math.sqrt(0.15 * math.log(2)))
    assert not svip.stop(0.599) and svip.stop(0.601)
    assert SVIP(tau=0.5).stop(1.7) and not SVIP(tau=0.5).stop(1.6)  # threshold 0.25 / 0.15 = 1.667 nats
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() == 0.0 and not svip.stop(0.0)


def test_draft_lengths_in_the_loop_follow_the_rule():
    target = tiny("llama", 0)
    draft = noisy_copy(target, 0.3)
    tok = SpaceTokenizer()
    tau = 0.78  # near sqrt(0.15 * H) of these nearly uniform drafts, so rounds stop at different lengths
    policy = SVIP(tau=tau, max_length=6)
    lengths = []
    for prompt in PROMPTS:
        g = speculative_decode(target, draft, tok, prompt, policy, max_new_tokens=40)
        budgets_left = 40
        for entropies, n in zip(g.stats["round_entropies"], g.stats["round_accepted"]):
            lengths.append(len(entropies))
            if not entropies:  # the last token of max_new_tokens comes from the target alone
                assert budgets_left == 1
                continue
            assert not any(policy.stop(h) for h in entropies[:-1])  # no earlier token tripped the rule
            hit_cap = len(entropies) in (policy.max_length, budgets_left - 1)
            assert policy.stop(entropies[-1]) or hit_cap or EOS in g.tokens
            budgets_left -= n + 1
    assert len(set(lengths)) > 1  # the rule really varied the draft length


def test_fixed_length_drafts_exactly_gamma():
    target = tiny("qwen2", 0)
    g = speculative_decode(target, tiny("qwen2", 1), SpaceTokenizer(), "1 2 3", FixedLength(3), max_new_tokens=21)
    lengths = [len(e) for e in g.stats["round_entropies"]]
    assert all(k == 3 for k in lengths[:-1]) and lengths[-1] <= 3


# --- verification ------------------------------------------------------------------------------------------------

def test_greedy_verification_by_hand():
    logits = torch.full((4, 6), -1.0)
    for row, best in enumerate([3, 1, 0, 5]):
        logits[row, best] = 2.0
    assert greedy_verification([3, 1, 2], logits) == (2, 0)  # third draft differs: target's own token instead
    assert greedy_verification([3, 1, 0], logits) == (3, 5)  # all accepted: bonus token from the last row
    assert greedy_verification([4, 1, 0], logits) == (0, 3)
    assert greedy_verification([], logits[:1]) == (0, 3)


def test_rejection_verification_samples_the_target_distribution():
    p = torch.tensor([[0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[0.2, 0.2, 0.6]])
    g = torch.Generator().manual_seed(0)
    N = 8_000
    counts, accepted = torch.zeros(3), 0
    for _ in range(N):
        x = int(torch.multinomial(q[0], 1, generator=g))
        n, nxt = rejection_verification([x], q, p, g)
        first = x if n == 1 else nxt
        counts[first] += 1
        accepted += n
    # the first output token is distributed as p, whatever q proposes
    assert torch.allclose(counts / N, p[0], atol=0.02)
    # acceptance rate = sum_x min(p, q) = 1 - TV(p, q) = 0.5 (paper, eq. 2)
    assert accepted / N == pytest.approx(torch.minimum(p[0], q[0]).sum().item(), abs=0.02)


def test_rejection_verification_accepts_everything_when_draft_equals_target():
    p = torch.softmax(torch.randn(4, 7), -1)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        drafts = [int(torch.multinomial(p[i], 1, generator=g)) for i in range(3)]
        assert rejection_verification(drafts, p[:3], p, g)[0] == 3


# --- the loop: lossless greedy, costs --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_speculative_output_is_the_targets_greedy_output(arch):
    target = tiny(arch, 0)
    tok = SpaceTokenizer()
    runs = [(noisy_copy(target, 0.3), [FixedLength(0), FixedLength(1), FixedLength(4), SVIP(tau=0.78)]),
            (tiny(arch, 1), [FixedLength(3), SVIP()])]
    accepted = drafted = 0
    for prompt in PROMPTS[:2]:
        reference = greedy_decode(target, tok, prompt, max_new_tokens=20)
        for draft, policies in runs:
            for policy in policies:
                g = speculative_decode(target, draft, tok, prompt, policy, max_new_tokens=20)
                assert g.tokens == reference.tokens, (arch, policy, prompt)
                assert g.forward_passes == g.stats["rounds"] <= g.num_tokens
                assert g.stats["draft_passes"] == g.stats["drafted_tokens"]  # one draft pass per drafted token
                if policy == FixedLength(0):
                    assert g.forward_passes == g.num_tokens and g.stats["draft_passes"] == 0
                accepted += g.stats["accepted_tokens"]
                drafted += g.stats["drafted_tokens"]
    assert 0 < accepted < drafted  # both the accepting and the rejecting paths (cache cropping) were exercised


def test_greedy_speculative_output_on_the_smoke_reasoner():
    from paperzoo.core.reasoner import draft_reasoner, problems, reasoner

    target, draft = reasoner("smoke"), draft_reasoner("smoke")
    for problem in problems(3, "test"):
        reference = greedy_decode(target.model, target.tokenizer, problem.prompt, max_new_tokens=24)
        for policy in (FixedLength(2), FixedLength(5), SVIP(), SVIP(tau=1.0)):
            g = speculative_decode(target.model, draft.model, target.tokenizer, problem.prompt, policy, 24)
            assert g.tokens == reference.tokens and g.text == reference.text
            assert g.forward_passes <= g.num_tokens
        assisted = transformers_assisted_decode(target.model, draft.model, target.tokenizer, problem.prompt, 24)
        assert assisted.tokens == reference.tokens


def test_a_perfect_draft_needs_one_target_pass_per_round_of_gamma_plus_one():
    target = tiny("mistral", 0)
    draft = copy.deepcopy(target)
    g = speculative_decode(target, draft, SpaceTokenizer(), "5 6 7", FixedLength(4), max_new_tokens=25)
    if EOS not in g.tokens:
        assert g.stats["acceptance_rate"] == 1.0 and g.forward_passes == 5  # 25 tokens in rounds of 4 + 1


def test_speculative_sampling_runs_and_is_reproducible():
    target = tiny("llama", 0)
    tok = SpaceTokenizer()
    same = speculative_decode(target, copy.deepcopy(target), tok, "1 2", FixedLength(3), 20, do_sample=True, seed=0)
    assert same.stats["acceptance_rate"] == 1.0  # p == q: every draft is accepted
    a = speculative_decode(target, tiny("llama", 1), tok, "1 2", SVIP(tau=0.8), 20, do_sample=True, temperature=0.7,
                           seed=3)
    b = speculative_decode(target, tiny("llama", 1), tok, "1 2", SVIP(tau=0.8), 20, do_sample=True, temperature=0.7,
                           seed=3)
    assert a.tokens == b.tokens and a.num_tokens == 20


def test_bad_input_is_refused():
    target, tok = tiny("llama", 0), SpaceTokenizer()
    with pytest.raises(ValueError, match="gamma"):
        FixedLength(-1)
    with pytest.raises(ValueError, match="tau"):
        SVIP(tau=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_decode(target, target, tok, "1", max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        speculative_decode(target, target, tok, "1", do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="vocabulary"):
        from transformers import LlamaConfig, LlamaForCausalLM

        other = LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1))
        speculative_decode(target, other, tok, "1")
    with pytest.raises(ValueError, match="distributions"):
        rejection_verification([1, 2], torch.ones(1, 3) / 3, torch.ones(3, 3) / 3)


# --- the experiment's predicate ------------------------------------------------------------------------------------

def _metrics(svip_tps, svip_accept, svip_target, svip_draft, low=0.9, high=0.4):
    """Pooled rows for the frontier (reported), from the same figures as before."""
    def row(tps, accept, target, draft):
        return {"tokens_per_second": tps, "acceptance_rate": accept, "target_passes_per_token": target,
                "draft_passes_per_token": draft}

    return {"methods": {"greedy (own loop)": row(100, None, 1.0, 0.0), "fixed-2": row(90, 0.8, 0.5, 1.0),
                        "fixed-4": row(85, 0.6, 0.4, 1.6), "fixed-5": row(80, 0.5, 0.35, 2.0),
                        "fixed-8": row(70, 0.4, 0.3, 2.4), "svip": row(svip_tps, svip_accept, svip_target, svip_draft)},
            "entropy_acceptance": {"low_third": low, "high_third": high}}


def _per_problem(n=30, svip_accept=0.8, const_accept=0.5, svip_seconds=1.0, const_seconds=1.3, target_ratio=0.5):
    """Per-problem figures: 20 drafted tokens each; SVIP and fixed-5 emit the same 40 tokens."""
    def arm(accept, seconds, spread=0.0, phase=0):
        return {"tokens": [40] * n, "target_passes": [int(40 * target_ratio)] * n, "draft_passes": [20] * n,
                "drafted": [20] * n, "accepted": [round(20 * accept + spread * ((i % 3) - 1)) for i in range(n)],
                "seconds": [seconds * (1 + 0.05 * (((i + phase) % 5) - 2)) for i in range(n)]}

    return {"svip": arm(svip_accept, svip_seconds, spread=1, phase=2), "fixed-5": arm(const_accept, const_seconds)}


def _full(cost=0.2, low=None, high=None, above=0.4, identical=True, **kw):
    n = kw.get("n", 30)
    low = [0.9, 0.8, 1.0, 0.85, 0.95, 0.9] * 5 if low is None else low
    high = [0.3, 0.4, 0.2, 0.5, 0.35, 0.3] * 5 if high is None else high
    return {"per_problem": _per_problem(**kw), "draft_to_target_cost": cost, "own_loop_identical_to_greedy": identical,
            "entropy_acceptance": {"per_problem_low": low, "per_problem_high": high, "above_threshold_share": above}}


def test_frontier_interpolates_between_fixed_lengths():
    m = _metrics(100, 0.9, 0.45, 1.0)
    assert fixed_frontier_draft_passes(m, 0.45) == pytest.approx(1.3)  # halfway between fixed-2 and fixed-4
    assert fixed_frontier_draft_passes(m, 0.75) == pytest.approx(0.5)  # halfway between plain decoding and fixed-2
    assert fixed_frontier_draft_passes(m, 0.2) is None  # beyond the longest fixed draft


def test_checks_by_hand():
    names = list(checks(_full()))
    assert list(checks(_full()).values()) == [True, True, True]  # 1.3 s against 1.148 s: more than 14.8% faster
    assert checks(_full(const_seconds=1.0))[names[2]] is False  # no faster at all: clearly short of 14.8%
    assert checks(_full(const_seconds=1.15))[names[2]] is None  # about 15% faster: within noise of 14.8%
    assert checks(_full(cost=0.5))[names[2]] is None  # draft too dear relative to the target: undecided
    assert checks(_full(svip_accept=0.52))[names[1]] is None  # within noise of fixed-5's acceptance
    assert checks(_full(svip_accept=0.3))[names[1]] is False
    assert checks(_full(low=[0.5, 0.4, 0.6] * 10, high=[0.45, 0.5, 0.55] * 10))[names[0]] is None
    assert checks(_full(low=[0.3, 0.4, 0.2] * 10, high=[0.8, 0.9, 0.7] * 10))[names[0]] is False
    assert checks(_full(low=[], high=[]))[names[0]] is None


def test_preconditions_by_hand():
    assert all(preconditions(_full()).values())
    pre = list(preconditions(_full(identical=False, target_ratio=0.9, above=1.0)).values())
    assert pre == [False, False, False]  # not lossless; drafts rarely accepted; every draft above the threshold
    assert list(preconditions(_full(above=None)).values())[2] is None


def test_entropy_acceptance_counts_only_verified_drafts():
    g = SimpleNamespace(stats={"round_entropies": [[0.1, 0.2, 3.0, 4.0], [0.3, 2.0]], "round_accepted": [2, 2]})
    out = entropy_acceptance([g])
    # round 1: 0.1 and 0.2 accepted, 3.0 rejected, 4.0 never verified; round 2: both accepted
    assert out["drafts"] == 5
    assert out["low_third"] == 1.0 and out["high_third"] == 0.0  # thirds of 5 sorted drafts: 2, 2, 1 (3.0: rejected)
    assert out["per_problem_low"] == [1.0] and out["per_problem_high"] == [0.0]  # one problem, drafts in both
    assert entropy_acceptance([g], threshold=1.0)["above_threshold_share"] == pytest.approx(2 / 5)


def test_entropy_thirds_per_problem():
    a = SimpleNamespace(stats={"round_entropies": [[0.1, 3.0]], "round_accepted": [1]})  # low accepted, high not
    b = SimpleNamespace(stats={"round_entropies": [[0.2, 0.3, 5.0]], "round_accepted": [3]})  # all accepted
    c = SimpleNamespace(stats={"round_entropies": [[2.0]], "round_accepted": [0]})  # middle only
    out = entropy_acceptance([a, b, c])
    # 6 drafts sorted: 0.1 0.2 | 0.3 2.0 | 3.0 5.0; a has low (0.1, ok) and high (3.0, rejected); b: 0.2 ok, 5.0 ok
    assert out["per_problem_low"] == [1.0, 1.0] and out["per_problem_high"] == [0.0, 1.0]


def test_a_prompt_past_the_models_positions_is_refused_naming_the_limit():
    from transformers import GPT2Config, GPT2LMHeadModel

    target, tok = tiny("gpt2", 0), SpaceTokenizer()  # learned positions: 64
    roomy = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=256)).eval()
    long_prompt = " ".join(["1"] * 70)
    with pytest.raises(ValueError, match="target model has 64"):
        speculative_decode(target, roomy, tok, long_prompt, FixedLength(2), max_new_tokens=4)
    with pytest.raises(ValueError, match="draft model has 64"):
        speculative_decode(roomy, target, tok, long_prompt, FixedLength(2), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_decode(target, target, tok, "1 2 3", SVIP(), max_new_tokens=62)
    with pytest.raises(ValueError, match="target model has 64"):
        transformers_assisted_decode(target, roomy, tok, long_prompt, max_new_tokens=4)
    with pytest.raises(ValueError, match="policy"):
        speculative_decode(target, target, tok, "1 2", policy=5)
