"""DeepConf (2508.15260): confidence measures by hand, votes, the early-stop processor, the online loop."""

import copy
import math

import numpy as np
import pytest
import torch

from paperzoo.core.reasoner import reasoner
from paperzoo.core.sampling import sample
from paperzoo.decoding import count_forward_passes
from paperzoo.decoding.deepconf import (
    Trace,
    bottom_group_confidence,
    cut_below,
    deepconf_offline,
    deepconf_online,
    deepconf_online_batch,
    deepconf_online_replay,
    deepconf_vote,
    group_confidences,
    lowest_group_confidence,
    majority_vote,
    sample_traces,
    tail_confidence,
    token_confidence,
    top_eta_mask,
    trace_confidence,
    weighted_vote,
)


@pytest.fixture(scope="module")
def smoke():
    return reasoner("smoke")


def test_token_confidence_by_hand():
    top = torch.tensor([[-0.1, -2.3, -4.6], [-1.0, -1.0, -1.0]])
    assert torch.allclose(token_confidence(top), torch.tensor([7.0 / 3, 1.0]))


def test_peaked_distribution_is_more_confident_than_flat():
    peaked = torch.log_softmax(torch.tensor([10.0, 0, 0, 0, 0]), -1).topk(3).values
    flat = torch.log_softmax(torch.zeros(5), -1).topk(3).values
    assert token_confidence(peaked) > token_confidence(flat)
    assert math.isclose(float(token_confidence(flat)), math.log(5), rel_tol=1e-6)


def test_group_tail_and_bottom_confidences_by_hand():
    C = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert torch.allclose(group_confidences(C, 2), torch.tensor([1.5, 2.5, 3.5, 4.5]))
    assert torch.allclose(group_confidences(C, 9), torch.tensor([3.0]))  # shorter than a window: the mean
    assert lowest_group_confidence(C, 2) == 1.5
    assert bottom_group_confidence(C, 2) == 1.5  # 10% of 4 groups rounds down; at least one group
    assert bottom_group_confidence(C, 2, fraction=0.5) == 2.0
    assert tail_confidence(C, 2) == 4.5 and tail_confidence(C, 10) == 3.0
    assert trace_confidence(C, "mean") == 3.0
    assert trace_confidence(C, "tail", tail=1) == 5.0


def test_group_confidences_match_a_plain_sliding_window():
    C = torch.rand(50, generator=torch.Generator().manual_seed(0)) * 5
    for window in (1, 3, 7, 50):
        plain = [sum(C[i:i + window].tolist()) / window for i in range(len(C) - window + 1)]
        assert torch.allclose(group_confidences(C, window), torch.tensor(plain), atol=1e-5)


def test_confidence_rejects_bad_input():
    with pytest.raises(ValueError):
        group_confidences(torch.tensor([1.0]), 0)
    with pytest.raises(ValueError):
        group_confidences(torch.tensor([]), 4)
    with pytest.raises(ValueError):
        trace_confidence(torch.tensor([1.0]), "median")
    with pytest.raises(ValueError):
        top_eta_mask([1.0], 0)


def test_weighted_and_majority_votes_by_hand():
    v = weighted_vote([5, 7, 5, None, 7], [1.0, 3.0, 1.5, 9.0, 0.5])
    assert v.answer == 7 and v.weights == {5: 2.5, 7: 3.5} and v.kept == [0, 1, 2, 4]
    assert math.isclose(v.consensus, 3.5 / 6.0)
    assert majority_vote([5, 7, 5, None, 7]).answer == 5  # 2 - 2 tie: the first seen wins
    assert majority_vote([None, None]).answer is None and majority_vote([None]).consensus == 0.0


def test_top_eta_keeps_the_top_percent_as_numpy_percentile():
    scores = list(range(1, 11))  # percentile 90 = 9.1, percentile 10 = 1.9
    assert top_eta_mask(scores, 10) == [False] * 9 + [True]
    assert top_eta_mask(scores, 90) == [False] + [True] * 9
    assert all(top_eta_mask(scores, 100))


def _trace(answer, confidence, n=6):
    return Trace([1] * n, f"Answer: {answer}", torch.full((n,), float(confidence)), answer)


def test_offline_vote_prefers_confident_traces_over_the_majority():
    traces = [_trace(5, 1.0), _trace(5, 1.1), _trace(5, 1.2), _trace(7, 4.0), _trace(7, 4.5), _trace(None, 9.0)]
    assert majority_vote([t.answer for t in traces]).answer == 5
    # the 5 traces with an answer: percentile 60 = 1.2 + 0.4 * (4.0 - 1.2) = 2.32 keeps the two confident ones
    vote = deepconf_vote(traces, eta=40, window=2)
    assert vote.answer == 7 and sorted(vote.kept) == [3, 4]
    assert math.isclose(vote.weights[7], 8.5) and 5 not in vote.weights
    assert sorted(deepconf_vote(traces, eta=50, window=2).kept) == [2, 3, 4]  # the median itself is kept
    # with everything kept the weighted vote still prefers the confident minority: 8.5 > 3.3
    assert deepconf_vote(traces, eta=100, window=2).answer == 7


def test_recorded_confidences_equal_those_from_raw_logits(smoke):
    """The processor sees generate's raw logits: its C_i equal those from core.sampling's raw logits.

    Greedy, so both draw the same tokens (core.sampling has its own loop, whose random stream differs from
    generate's once rows leave the batch)."""
    m, tok = smoke.model, smoke.tokenizer
    prompts = ["Q: 12+34\n<think>", "Q: 3x+4=10\n<think>"]
    ref = sample(m, tok, prompts, num_samples=1, max_new_tokens=20, temperature=0, top_k_logprobs=20, seed=3)
    got = sample_traces(m, tok, prompts, None, window=4, top_k=20, max_new_tokens=20, temperature=0, seed=3)
    for r, g in zip(ref, got):
        assert g.tokens == r.tokens and not g.stopped
        assert torch.allclose(g.confidences, token_confidence(r.top_logprobs), atol=1e-5)


def test_early_stop_cuts_a_trace_exactly_where_its_group_confidence_first_drops(smoke):
    m, tok = smoke.model, smoke.tokenizer
    eos, window = tok.eos_token_id, 3
    cut_somewhere = 0
    for seed in range(6):
        full = sample_traces(m, tok, ["Q: 12+34\n<think>"], None, window=window, max_new_tokens=30, seed=seed)[0]
        groups = group_confidences(full.confidences, window)
        bar = float(groups.median())  # some window of this trace is below it
        cut = sample_traces(m, tok, ["Q: 12+34\n<think>"], torch.tensor([bar]), window=window, max_new_tokens=30,
                            seed=seed)[0]
        below = [i for i, g in enumerate(groups.tolist()) if g < bar]
        if full.num_tokens >= window and below:
            stop = below[0] + window - 1  # the position whose window is the first below the bar
            if stop < full.num_tokens - 1 or full.tokens[-1] != eos:
                cut_somewhere += 1
                assert cut.stopped and cut.num_tokens == stop + 1 and cut.tokens[-1] == eos
                assert cut.tokens[:-1] == full.tokens[:stop]  # same random stream: a prefix of the full trace
                assert torch.allclose(cut.confidences, full.confidences[:stop + 1], atol=1e-6)
                replayed = cut_below(full, bar, window, eos)  # the replay cuts where the live run cut
                assert replayed.stopped and replayed.tokens == cut.tokens and replayed.answer is None
                continue
        assert cut.tokens == full.tokens and cut_below(full, bar, window, eos) is full
    assert cut_somewhere > 0


def test_an_unreachable_bar_cuts_every_trace_at_the_first_full_window(smoke):
    traces = sample_traces(smoke.model, smoke.tokenizer, ["Q: 12+34\n<think>"] * 4, torch.full((4,), math.inf),
                           window=5, max_new_tokens=30, seed=0)
    for t in traces:
        assert t.tokens[-1] == smoke.tokenizer.eos_token_id
        if t.num_tokens < 5:  # a natural EOS before the first full window: never cut
            assert not t.stopped
        else:
            assert t.stopped and t.num_tokens == 5


def test_online_stops_right_after_warmup_on_consensus(smoke):
    g = deepconf_online(smoke.model, smoke.tokenizer, "Q: 12+34\n<think>", budget=10, warmup=3, window=4,
                        max_new_tokens=20, answer_of=lambda text: "same")
    assert g.stats["traces_generated"] == 3 and g.stats["consensus"] == 1.0 and g.stats["answer"] == "same"
    assert g.stats["tokens_spent"] == g.stats["warmup_tokens"]
    assert g.forward_passes > 0 and g.text


def test_online_spends_the_budget_without_consensus_and_counts_every_token(smoke):
    counter = iter(range(10_000))
    gens = deepconf_online_batch(smoke.model, smoke.tokenizer, ["Q: 12+34\n<think>", "Q: 5x-3=12\n<think>"],
                                 budget=7, warmup=3, eta=90, window=4, max_new_tokens=20,
                                 answer_of=lambda text: next(counter))  # every trace a different answer
    for g in gens:
        assert g.stats["traces_generated"] == 7 and g.stats["online_traces"] == 4
        assert not g.stats["consensus_reached"]
        assert g.stats["warmup_tokens"] < g.stats["tokens_spent"] <= 7 * 20
        assert 0 <= g.stats["stopped_early"] <= 4 and g.stats["batch_prompts"] == 2


def test_online_with_parallel_draws_never_exceeds_the_budget(smoke):
    counter = iter(range(10_000))
    g = deepconf_online(smoke.model, smoke.tokenizer, "Q: 12+34\n<think>", budget=8, warmup=3, eta=90, window=4,
                        max_new_tokens=12, parallel=4, answer_of=lambda text: next(counter))
    assert g.stats["traces_generated"] == 8  # 3 warm-up, then draws of 4 and 1


def test_online_replay_by_hand():
    """Warm-up bar, cuts, confidence-weighted votes, draws of `parallel` and the budget, on known confidences."""
    def t(conf, answer):
        return Trace(list(range(1, len(conf) + 1)), str(answer), torch.tensor(conf, dtype=torch.float), answer)

    warm = [t([5, 5, 5], "a"), t([5, 5, 5], "b"), t([1, 1, 1], "c")]  # bar: 10th percentile of 5, 5, 1 = 1.8
    later = [t([5, 1, 1, 5, 5], "a"), t([5, 5, 5, 5], "a"), t([5, 5, 5], "a"), t([5, 5, 5], "a"), t([5, 5], "d")]
    (g,) = deepconf_online_replay([warm + later], eos_token_id=0, budget=7, warmup=3, eta=90, tau=0.95, window=2,
                                  parallel=2)
    st = g.stats
    assert st["threshold"] == pytest.approx(1.8) and st["traces_generated"] == 7 and st["online_traces"] == 4
    assert st["trace_stopped"] == [False, False, False, True, False, False, False]  # window (1, 1) < 1.8 at token 2
    assert st["tokens_spent"] == 3 + 3 + 3 + 3 + 4 + 3 + 3  # the cut trace: two tokens and the forced EOS
    assert st["trace_voted"] == [True, True, False, False, True, True, True]
    assert st["answer"] == "a" and st["votes"] == {"a": 20.0, "b": 5.0} and st["consensus"] == pytest.approx(0.8)
    assert not st["consensus_reached"] and g.forward_passes == 0
    (g,) = deepconf_online_replay([warm + later], eos_token_id=0, budget=7, warmup=3, eta=90, tau=0.75, window=2,
                                  parallel=2)
    assert g.stats["traces_generated"] == 7 and g.stats["consensus_reached"]  # 0.67 after the first draw of two
    (g,) = deepconf_online_replay([warm + later], eos_token_id=0, budget=8, warmup=3, eta=90, tau=0.6, window=2,
                                  parallel=2)
    assert g.stats["traces_generated"] == 5  # consensus 10/15 >= 0.6 after one draw
    with pytest.raises(ValueError, match="budget"):
        deepconf_online_replay([warm + later], eos_token_id=0, budget=9, warmup=3)


def test_offline_returns_the_voted_trace(smoke):
    g = deepconf_offline(smoke.model, smoke.tokenizer, "Q: 12+34\n<think>", num_traces=6, eta=50, window=4,
                         tail=4, max_new_tokens=16, answer_of=lambda text: len(text) % 2)
    assert g.stats["answer"] == len(g.text) % 2 and g.stats["traces_generated"] == 6
    assert g.stats["tokens_spent"] >= g.num_tokens > 0


def test_online_votes_only_uncut_confident_traces_each_weighted_by_its_confidence(smoke):
    """deepconf-online.py: warm-up traces vote if min_conf >= bar, later ones unless cut; weight = min_conf."""
    counter = iter(range(10_000))  # every trace its own answer, so each vote shows up on its own
    g = deepconf_online(smoke.model, smoke.tokenizer, "Q: 12+34\n<think>", budget=24, warmup=8, eta=50, window=3,
                        max_new_tokens=20, parallel=4, answer_of=lambda text: next(counter))
    st = g.stats
    n = st["traces_generated"]
    assert n > 8 and len(st["trace_stopped"]) == len(st["trace_confidence"]) == len(st["trace_voted"]) == n
    bar = st["threshold"]
    expected = [not cut and c >= bar for cut, c in zip(st["trace_stopped"], st["trace_confidence"])]
    assert any(st["trace_stopped"]), "the test needs online traces cut by the bar"
    assert any(c < bar for c in st["trace_confidence"][:8]), "and warm-up traces below it"
    assert st["trace_voted"] == expected  # cut traces and warm-up traces below the bar never vote
    voters = [i for i, v in enumerate(expected) if v]
    assert st["traces_voting"] == len(voters) == len(st["votes"])
    assert sorted(st["votes"].values()) == pytest.approx(sorted(st["trace_confidence"][i] for i in voters))
    assert all(w != 1.0 for w in st["votes"].values())  # weighted by confidence, not one vote each
    assert math.isclose(st["consensus"], max(st["votes"].values()) / sum(st["votes"].values()))


def test_batched_traces_equal_traces_of_each_prompt_alone(smoke):
    """Prompts of different lengths in one batch: padding must not change what any row generates."""
    prompts = ["Q: 12+34\n<think>", "Q: 3x+4=10\n<think>", "Q: 91-17+40-3\n<think>"]
    together = sample_traces(smoke.model, smoke.tokenizer, prompts, None, window=4, temperature=0, max_new_tokens=12)
    for prompt, t in zip(prompts, together):
        alone = sample_traces(smoke.model, smoke.tokenizer, [prompt], None, window=4, temperature=0,
                              max_new_tokens=12)[0]
        assert t.tokens == alone.tokens
        assert torch.allclose(t.confidences, alone.confidences, atol=1e-4)


def test_right_padded_tokenizer_gives_the_same_traces(smoke):
    """load_causal_lm returns right-padding tokenizers; DeepConf pads on the left itself."""
    right = copy.deepcopy(smoke.tokenizer)
    right.padding_side = "right"
    prompts = ["Q: 12+34\n<think>", "Q: 3x+4=10\n<think>"]  # 10 and 12 tokens: one row is padded
    a = sample_traces(smoke.model, smoke.tokenizer, prompts, None, window=4, max_new_tokens=16, seed=1)
    b = sample_traces(smoke.model, right, prompts, None, window=4, max_new_tokens=16, seed=1)
    assert [t.tokens for t in a] == [t.tokens for t in b]
    assert all(torch.equal(x.confidences, y.confidences) for x, y in zip(a, b))
    kw = dict(budget=6, warmup=2, window=4, max_new_tokens=12, seed=2)
    assert (deepconf_online_batch(smoke.model, right, prompts, **kw)[1].stats["trace_confidence"]
            == deepconf_online_batch(smoke.model, smoke.tokenizer, prompts, **kw)[1].stats["trace_confidence"])
    assert deepconf_offline(smoke.model, right, prompts[0], num_traces=3, window=4, tail=4,
                            max_new_tokens=12).stats["traces_generated"] == 3
    assert right.padding_side == "right"  # the caller's tokenizer is left as it was


def test_bad_arguments_raise_before_any_trace_is_sampled(smoke):
    m, tok = smoke.model, smoke.tokenizer
    with count_forward_passes(m) as passes:
        with pytest.raises(ValueError, match="metric"):
            deepconf_offline(m, tok, "Q: 1+1\n<think>", num_traces=4, metric="median")
        with pytest.raises(ValueError, match="eta"):
            deepconf_offline(m, tok, "Q: 1+1\n<think>", num_traces=4, eta=0)
        with pytest.raises(ValueError, match="window"):
            deepconf_offline(m, tok, "Q: 1+1\n<think>", num_traces=4, tail=0)
        with pytest.raises(ValueError, match="warmup"):
            deepconf_online(m, tok, "Q: 1+1\n<think>", budget=4, warmup=5)
        with pytest.raises(ValueError, match="tau"):
            deepconf_online(m, tok, "Q: 1+1\n<think>", budget=4, warmup=2, tau=0)
        with pytest.raises(ValueError, match="eta"):
            deepconf_online(m, tok, "Q: 1+1\n<think>", budget=4, warmup=2, eta=101)
        with pytest.raises(ValueError, match="temperature"):
            deepconf_online(m, tok, "Q: 1+1\n<think>", budget=4, warmup=2, temperature=-1)
        with pytest.raises(ValueError, match="top_k"):
            deepconf_offline(m, tok, "Q: 1+1\n<think>", num_traces=2, top_k=10_000)
        with pytest.raises(ValueError, match="prompts"):
            deepconf_online_batch(m, tok, [])
        with pytest.raises(ValueError, match="thresholds"):
            sample_traces(m, tok, ["Q: 1+1\n<think>"] * 2, torch.ones(3), window=4)
    assert passes.count == 0


def test_a_prompt_past_the_models_positions_is_refused_naming_the_limit(smoke):
    limit = smoke.model.config.max_position_embeddings
    long_prompt = "Q: " + "1+" * limit + "1\n<think>"
    for call in (lambda: deepconf_offline(smoke.model, smoke.tokenizer, long_prompt, num_traces=2),
                 lambda: deepconf_online(smoke.model, smoke.tokenizer, long_prompt, budget=2, warmup=1),
                 lambda: sample_traces(smoke.model, smoke.tokenizer, [long_prompt], window=4)):
        with pytest.raises(ValueError, match=f"has {limit}"):
            call()
    with pytest.raises(ValueError, match="max_new_tokens"):  # a short prompt with a budget past the positions
        deepconf_offline(smoke.model, smoke.tokenizer, "Q: 1+1\n<think>", num_traces=2, max_new_tokens=limit)


def test_experiment_keeps_the_official_warmup_share():
    from paperzoo.decoding.deepconf import PAPER_WARMUP_SHARE
    from paperzoo.experiments.decoding.deepconf import SCALES

    assert PAPER_WARMUP_SHARE == 16 / 256
    for scale in SCALES.values():
        assert scale["warmup"] == max(1, round(PAPER_WARMUP_SHARE * scale["traces"]))


def test_predicate_by_hand():
    from paperzoo.experiments.decoding.deepconf import checks, preconditions

    n = 40
    maj = [1.0] * 10 + [0.0] * 30
    better = [1.0] * 22 + [0.0] * 18  # right on 12 more problems, wrong on none that majority gets
    same = list(maj)
    pp = {"majority_correct": maj, "majority_tokens": [100.0] * n,
          "offline_correct": {"low": same, "high": better},
          "online_correct": {"low": better, "high": same},
          "online_tokens": {"low": [40.0 + i % 3 for i in range(n)], "high": [90.0] * n},
          "auroc": [0.7, 0.8, 0.65, 0.75, 0.7, 0.9]}
    m = {"per_problem": pp, "majority_accuracy": 0.25, "outvoted_share": 0.3}
    assert list(checks(m).values()) == [True, True, True]  # high carries offline, low carries online
    assert all(preconditions(m).values())
    pp["offline_correct"] = {"low": same, "high": same}
    pp["online_correct"] = {"low": [1.0] * 11 + [0.0] * 29, "high": same}  # one problem more: within noise
    pp["online_tokens"]["low"] = [100.0] * n
    assert list(checks(m).values()) == [None, None, None]  # undecided, never "not reproduced"
    worse = [0.0] * n  # wrong on the ten problems majority voting gets right
    pp["offline_correct"] = {"low": worse, "high": worse}
    pp["online_correct"] = {"low": worse, "high": worse}
    pp["online_tokens"]["low"] = [150.0 + i % 3 for i in range(n)]
    assert list(checks(m).values()) == [False, False, False]
    pp["offline_correct"]["high"] = same  # one arm clearly worse, the other undecided: undecided
    assert list(checks(m).values())[0] is None
    pp["auroc"] = [0.4, 0.6, 0.5, 0.55]  # no separation beyond noise
    m.update(majority_accuracy=0.97, outvoted_share=0.0)
    assert list(preconditions(m).values()) == [False, False, False]
    pp["auroc"] = []
    assert list(preconditions(m).values())[0] is None


def test_auroc_by_hand():
    from paperzoo.experiments.decoding.deepconf import _auroc

    assert _auroc([3, 2, 1], [True, False, False]) == 1.0
    assert _auroc([1, 1], [True, False]) == 0.5
    assert math.isclose(_auroc([1, 3, 2], [True, True, False]), 0.5)
    assert _auroc([1, 2], [True, True]) is None
    assert np.isclose(_auroc([0.2, 0.9, 0.4, 0.6], [False, True, False, True]), 1.0)
