"""Overthinking (2412.21187): rounds, the two efficiency metrics by hand, FCS(+Reflection), SimPO."""

import pytest
import torch
import torch.nn.functional as F

from paperzoo.core.reasoner import problems
from paperzoo.core.sampling import completion_logprobs
from paperzoo.decoding.overthinking_efficiency import (
    SolutionRounds,
    length_preference_pair,
    outcome_efficiency,
    process_efficiency,
    rounds_of,
    simpo_loss,
    simpo_step,
    split_rounds,
    streamline,
)
from paperzoo.experiments.decoding.overthinking_efficiency import (
    checks,
    preconditions,
    overthinking_text,
    round_is_correct,
    scratchpad_key,
)
from tests.tiny_models import tiny


def test_split_rounds_is_lossless_and_splits_at_line_starts():
    text = "2+3=5\nWait, check:\n2+3=5\nWait, no Wait here\nWait again\n"
    rounds = split_rounds(text)
    assert "".join(rounds) == text
    assert rounds == ["2+3=5\n", "Wait, check:\n2+3=5\n", "Wait, no Wait here\n", "Wait again\n"]
    assert split_rounds("no marker at all") == ["no marker at all"]
    with pytest.raises(ValueError):
        split_rounds("x", marker="")


def test_efficiencies_by_hand():
    # Response A: rounds of 10, 20, 30 tokens; first correct in round 2 -> T_hat = 30 of 60; rounds 1,2 distinct.
    a = SolutionRounds((10, 20, 30), (False, True, True), (True, True, False), True)
    # Response B: no correct round -> sigma = 0; single distinct round of 40.
    b = SolutionRounds((40,), (False,), (True,), False)
    assert outcome_efficiency([a]) == pytest.approx(0.5)
    assert outcome_efficiency([a, b]) == pytest.approx(0.25)
    assert process_efficiency([a]) == pytest.approx(0.5)
    assert process_efficiency([a, b]) == pytest.approx(0.75)
    one = SolutionRounds((7,), (True,), (True,), True)
    assert outcome_efficiency([one]) == 1.0 and process_efficiency([one]) == 1.0
    # sigma = "at least one solution in the response is correct" (paper, 2.2), not the final answer:
    # right in round 1 (10 of 40 tokens), talked out of it later, final answer wrong -> 10/40, not 0
    revised = SolutionRounds((10, 30), (True, False), (True, True), False)
    assert outcome_efficiency([revised]) == pytest.approx(0.25)


def test_bad_rounds_raise():
    with pytest.raises(ValueError):
        SolutionRounds((1, 2), (True,), (True, True), True)
    with pytest.raises(ValueError):
        outcome_efficiency([])
    with pytest.raises(ValueError):
        process_efficiency([SolutionRounds((0,), (True,), (True,), True)])


def test_rounds_of_marks_repeats_as_not_distinct():
    r = rounds_of(["a=1\n", "Wait, check:\na=1\n", "Wait, check:\nb=1\n"], len, lambda t: t.endswith("=1\n"),
                  scratchpad_key, True)
    assert r.distinct == (True, False, True) and r.first_correct == 0 and r.tokens == (4, 17, 17)


def test_overthinking_trace_metrics_on_a_real_problem():
    q = problems(1, "train", tiers=[2])[0]
    text = overthinking_text(q, 3)[len(q.prompt):]
    thinking = text.split("</think>")[0]
    rounds = split_rounds(thinking)
    assert len(rounds) == 4 and all(round_is_correct(q, t) for t in rounds)
    assert len({scratchpad_key(t) for t in rounds}) == 1  # the same solution four times
    resp = rounds_of(rounds, len, lambda t: round_is_correct(q, t), scratchpad_key, True)
    assert outcome_efficiency([resp]) == pytest.approx(len(rounds[0]) / len(thinking))
    assert process_efficiency([resp]) == pytest.approx(len(rounds[0]) / len(thinking))


def test_streamline_keeps_up_to_the_second_correct_solution():
    resp = "x=3\nWait, check:\nx=4\nWait, check:\nx=5\nWait, check:\nx=4\nWait, check:\nx=4\n</think>Answer: 4"
    ok = lambda t: t.strip().endswith("=4")
    # FCS: up to the first round that reaches the answer
    assert streamline(resp, ok, "</think>", correct_solutions=1) == "x=3\nWait, check:\nx=4\n</think>Answer: 4"
    # FCS + Reflection: up to the *second* round that reaches it (a wrong round in between is kept)
    assert streamline(resp, ok, "</think>") == \
        "x=3\nWait, check:\nx=4\nWait, check:\nx=5\nWait, check:\nx=4\n</think>Answer: 4"
    # only one correct round: FCS + Reflection is the FCS response
    single = "x=4\nWait, check:\nx=5\n</think>Answer: 4"
    assert streamline(single, ok, "</think>") == "x=4\n</think>Answer: 4"
    assert streamline(resp, lambda t: False, "</think>") is None
    assert streamline("no delimiter", ok, "</think>") is None
    with pytest.raises(ValueError, match="correct_solutions"):
        streamline(resp, ok, "</think>", correct_solutions=0)


def test_length_preference_pair_is_the_shortest_streamlined_against_the_longest():
    ok_round = lambda t: t.strip().endswith("=4")
    ok = lambda t: t.endswith("Answer: 4")
    r1 = "x=4\nWait, check:\nx=4\nWait, check:\nx=4\n</think>Answer: 4"  # FCS+R: 2 rounds
    r2 = "x=2\nWait, check:\nx=4\nWait, check:\nx=4\nWait, check:\nx=4\nWait, check:\nx=4\n</think>Answer: 4"
    wrong = "x=4\n" + "Wait, check:\nx=9\n" * 9 + "</think>Answer: 9"  # longest, but discarded: wrong answer
    chosen, rejected = length_preference_pair([r2, wrong, r1], ok, ok_round, "</think>", len)
    assert chosen == "x=4\nWait, check:\nx=4\n</think>Answer: 4"  # the shortest streamlined, from r1
    assert rejected == r2  # the longest correct sample
    assert length_preference_pair([wrong], ok, ok_round, "</think>", len) is None
    one_round = "x=4\n</think>Answer: 4"  # nothing to streamline away
    assert length_preference_pair([one_round], ok, ok_round, "</think>", len) is None


def test_simpo_loss_by_hand():
    # margin = 2 * (-4/2) - 2 * (-9/3) - 1 = -4 + 6 - 1 = 1
    loss = simpo_loss(torch.tensor([-4.0]), torch.tensor([2]), torch.tensor([-9.0]), torch.tensor([3]), 2.0, 1.0)
    assert float(loss) == pytest.approx(-float(F.logsigmoid(torch.tensor(1.0))))
    # a longer chosen response with the same per-token likelihood gets the same loss (length-normalised)
    a = simpo_loss(torch.tensor([-2.0]), torch.tensor([4]), torch.tensor([-3.0]), torch.tensor([3]))
    b = simpo_loss(torch.tensor([-4.0]), torch.tensor([8]), torch.tensor([-3.0]), torch.tensor([3]))
    assert torch.allclose(a, b)
    with pytest.raises(ValueError):
        simpo_loss(torch.tensor([-1.0]), torch.tensor([0]), torch.tensor([-1.0]), torch.tensor([1]))


def test_completion_logprobs_match_unpadded_forward():
    model = tiny("qwen2")
    prompts, completions = [[3, 4, 5], [7]], [[9, 10], [11, 12, 13, 14]]
    got, n = completion_logprobs(model, prompts, completions, pad_id=0)
    assert n.tolist() == [2, 4]
    for i in range(2):
        ids = torch.tensor([prompts[i] + completions[i]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        assert torch.allclose(got[i], logp[torch.arange(len(tgt)), tgt][len(prompts[i]) - 1 :].sum(), atol=1e-4)


def test_simpo_steps_raise_the_preferred_short_response():
    model = tiny("llama")
    prompts, chosen, rejected = [[3, 4]], [[9, 10, 0]], [[9, 10, 20, 21, 22, 0]]

    def margin():
        with torch.no_grad():
            lp, n = completion_logprobs(model, prompts * 2, chosen + rejected, 0)
        return float(lp[0] / n[0] - lp[1] / n[1])

    before = margin()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        simpo_step(model, opt, prompts, chosen, rejected, pad_id=0)
    assert margin() > before


def _arm(tokens, correct, rounds=4.0, outcome=0.25, n=40):
    spread = [0.0, 1.0] * (n // 2)
    return {"tokens": [tokens + 2 * d for d in spread], "correct": [1.0] * round(correct * n) + [0.0] * (n - round(correct * n)),
            "rounds": [rounds] * n, "outcome": [outcome + 0.01 * d for d in spread]}


def _metrics(before_tokens=100, after_tokens=60, acc_base=0.5, acc_before=0.5, acc_after=0.5, acc_control=0.5,
             rounds=4.0, outcome_after=0.5, pairs=40):
    return {"min_pairs": 32, "pairs": pairs, "per_problem": {
        "original reasoner": _arm(40, acc_base, rounds=1.0, outcome=1.0),
        "overthinking": _arm(before_tokens, acc_before, rounds),
        "SimPO control": _arm(before_tokens, acc_control, rounds),
        "after SimPO": _arm(after_tokens, acc_after, 2.0, outcome_after)}}


def test_checks_by_hand():
    assert all(v is True for v in checks(_metrics()).values())
    c = list(checks(_metrics(after_tokens=75, acc_after=0.3)).values())
    assert c[0] is False and c[1] is False  # 25% fewer tokens; accuracy 20 points lower
    c = list(checks(_metrics(after_tokens=60, acc_after=0.45, outcome_after=0.25)).values())
    assert c[1] is None and c[2] is None  # a 5-point drop on 40 problems: undecided; no change in efficiency


def test_preconditions_by_hand():
    assert all(v is True for v in preconditions(_metrics()).values())
    assert list(preconditions(_metrics(acc_before=0.2)).values())[0] is False  # the overthinker lost the skill
    assert list(preconditions(_metrics(rounds=1.2)).values())[1] is False  # no overthinking to remove
    assert list(preconditions(_metrics(acc_control=0.05)).values())[2] is False  # SimPO itself breaks the model
    assert list(preconditions(_metrics(pairs=3)).values())[3] is False


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(torch.tensor([-1.0]), torch.tensor([1]), torch.tensor([-1.0]), torch.tensor([1]), beta=0.0)
    with pytest.raises(ValueError, match="responses"):
        outcome_efficiency([])
    with pytest.raises(ValueError, match="prompts, chosen and rejected"):
        simpo_step(tiny("llama"), None, [[1]], [[2]], [], pad_id=0)
