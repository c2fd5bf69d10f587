"""Budget forcing (2501.19393): forced stops land exactly at the budget, suppression holds, no-op equals greedy."""

import copy
import math
from contextlib import contextmanager

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from paperzoo.core.reasoning import END_THINK, THINK, reasoning_tokenizer
from paperzoo.core.reasoner import reasoner
from paperzoo.decoding import greedy_decode
from paperzoo.decoding.budget_forcing import budget_force, budget_force_batch, scaling, scaling_weights

PROMPTS = ["Q: 12+34\n<think>", "Q: 5x-3=12\n<think>", "Q: 91-17+40-3\n<think>"]


@pytest.fixture(scope="module")
def smoke():
    return reasoner("smoke")


@contextmanager
def logit_bias(model, token: int, bias: float):
    """Add `bias` to one token's logit through a hook on the unmodified model's output layer."""
    def hook(module, args, output):
        output = output.clone()
        output[..., token] += bias
        return output

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_no_cap_and_no_extensions_is_plain_greedy_decoding(smoke):
    gens = budget_force_batch(smoke.model, smoke.tokenizer, PROMPTS, max_new_tokens=40, max_answer_tokens=1000)
    for prompt, g in zip(PROMPTS, gens):  # batched with left padding, against generate one prompt at a time
        assert g.tokens == greedy_decode(smoke.model, smoke.tokenizer, prompt, max_new_tokens=40).tokens
    with logit_bias(smoke.model, smoke.tokenizer.convert_tokens_to_ids(END_THINK), 4.0):  # a run that answers
        for prompt in PROMPTS:
            g = budget_force(smoke.model, smoke.tokenizer, prompt, max_new_tokens=40, max_answer_tokens=1000)
            assert g.tokens == greedy_decode(smoke.model, smoke.tokenizer, prompt, max_new_tokens=40).tokens


def test_no_op_equals_greedy_on_a_gpt2():
    tok = reasoning_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)).eval()
    for prompt in PROMPTS:
        got = budget_force(model, tok, prompt, max_new_tokens=20, max_answer_tokens=1000)
        assert got.tokens == greedy_decode(model, tok, prompt, max_new_tokens=20).tokens


@pytest.mark.parametrize("budget", [0, 1, 7])
def test_forced_stop_puts_the_delimiter_exactly_at_the_budget(smoke, budget):
    tok = smoke.tokenizer
    d = tok.convert_tokens_to_ids(END_THINK)
    with logit_bias(smoke.model, d, -1e4):  # a model that would never stop thinking by itself
        gens = budget_force_batch(smoke.model, tok, PROMPTS, max_thinking_tokens=budget, max_answer_tokens=5)
    for g in gens:
        assert g.tokens[budget] == d and d not in g.tokens[:budget]
        assert g.stats["delimiter_at"] == budget and g.stats["thinking_tokens"] == budget
        assert g.stats["forced_stop"] and 1 <= g.stats["answer_tokens"] <= 5
        assert len(g.tokens) == budget + 1 + g.stats["answer_tokens"]


def test_suppression_replaces_the_delimiter_with_wait_exactly_n_times(smoke):
    tok = smoke.tokenizer
    d, wait = tok.convert_tokens_to_ids(END_THINK), ids(tok, "Wait")
    with logit_bias(smoke.model, d, 1e4):  # a model that always wants to stop thinking
        for N in range(4):
            g = budget_force(smoke.model, tok, PROMPTS[0], num_extensions=N, max_answer_tokens=3)
            assert g.tokens[: 4 * N] == wait * N and g.tokens[4 * N] == d
            assert g.stats["extensions"] == N and g.stats["thinking_tokens"] == 4 * N
            assert not g.stats["forced_stop"] and g.tokens.count(d) - g.tokens[4 * N + 1:].count(d) == 1


def test_suppression_never_lets_the_delimiter_through_early_when_sampling(smoke):
    tok = smoke.tokenizer
    d = tok.convert_tokens_to_ids(END_THINK)
    with logit_bias(smoke.model, d, 3.0):  # the delimiter is likely but not certain at each step
        for seed in range(4):
            g = budget_force(smoke.model, tok, PROMPTS[1], num_extensions=3, temperature=1.0, seed=seed,
                             max_new_tokens=60, max_answer_tokens=3)
            at = g.stats["delimiter_at"]
            if at is not None:
                assert g.stats["extensions"] == 3 and d not in g.tokens[:at]
                assert tok.decode(g.tokens[:at]).count("Wait") >= 3
            else:
                assert d not in g.tokens


def test_the_cap_wins_inside_a_continuation(smoke):
    tok = smoke.tokenizer
    d = tok.convert_tokens_to_ids(END_THINK)
    with logit_bias(smoke.model, d, 1e4):
        g = budget_force(smoke.model, tok, PROMPTS[0], max_thinking_tokens=6, num_extensions=5, max_answer_tokens=2)
    assert tok.decode(g.tokens[:7]) == "WaitWa" + END_THINK
    assert g.stats["forced_stop"] and g.stats["extensions"] == 2 and g.stats["thinking_tokens"] == 6


def test_empty_continuation_suppresses_the_delimiter_alone(smoke):
    tok = smoke.tokenizer
    d = tok.convert_tokens_to_ids(END_THINK)
    with logit_bias(smoke.model, d, 1e4):
        g = budget_force(smoke.model, tok, PROMPTS[0], num_extensions=3, continuation="", max_answer_tokens=2)
        logits = smoke.model(**tok(PROMPTS[0], return_tensors="pt", add_special_tokens=False)).logits[0, -1]
    logits[d] = -math.inf
    assert g.tokens[0] == int(logits.argmax()) and d not in g.tokens[:3] and g.tokens[3] == d
    assert g.stats["extensions"] == 3 and g.stats["thinking_tokens"] == 3


def test_answer_prefix_follows_the_delimiter_and_eos_while_thinking_ends_the_run(smoke):
    tok = smoke.tokenizer
    d = tok.convert_tokens_to_ids(END_THINK)
    with logit_bias(smoke.model, d, -1e4):
        g = budget_force(smoke.model, tok, PROMPTS[0], max_thinking_tokens=2, answer_prefix="Final:",
                         max_answer_tokens=8)
    assert tok.decode(g.tokens[2:9]) == END_THINK + "Final:"
    with logit_bias(smoke.model, tok.eos_token_id, 1e4):
        g = budget_force(smoke.model, tok, PROMPTS[0], num_extensions=2)
    assert g.tokens == [tok.eos_token_id] and g.stats["delimiter_at"] is None and g.stats["finished"]


def test_forward_passes_are_counted_one_per_fed_token(smoke):
    with logit_bias(smoke.model, smoke.tokenizer.convert_tokens_to_ids(END_THINK), -1e4):
        g = budget_force(smoke.model, smoke.tokenizer, PROMPTS[0], max_thinking_tokens=5, max_answer_tokens=4)
    # the prompt pass yields the first token; every later token needs one pass; the last one none
    assert 6 < g.num_tokens <= 10 and g.forward_passes == g.num_tokens


def test_bad_arguments_raise(smoke):
    m, tok = smoke.model, smoke.tokenizer
    with pytest.raises(ValueError, match="single token"):
        budget_force(m, tok, PROMPTS[0], end_of_thinking="Answer:")
    with pytest.raises(ValueError, match="max_thinking_tokens"):
        budget_force(m, tok, PROMPTS[0], max_thinking_tokens=-1)
    with pytest.raises(ValueError, match="num_extensions"):
        budget_force(m, tok, PROMPTS[0], num_extensions=-2)
    with pytest.raises(ValueError, match="max_answer_tokens"):
        budget_force(m, tok, PROMPTS[0], max_answer_tokens=0)
    with pytest.raises(ValueError, match="prompts"):
        budget_force_batch(m, tok, PROMPTS[0])  # a string, not a list of prompts
    assert THINK not in PROMPTS[0].replace("<think>", "")  # the prompts end with the opening delimiter only


def test_scaling_metric_by_hand():
    # slopes: (0.3 - 0.1) / 10 = 0.02, (0.4 - 0.1) / 20 = 0.015, (0.4 - 0.3) / 10 = 0.01 -> mean 0.015
    assert math.isclose(scaling([(10, 0.3), (0, 0.1), (20, 0.4)]), 0.015)
    assert scaling([(5, 0.2), (5, 0.9)]) is None
    assert scaling([(0, 0.5), (10, 0.4)]) < 0


def test_right_padded_tokenizer_gives_the_same_output(smoke):
    """load_causal_lm returns right-padding tokenizers; budget forcing pads on the left itself."""
    right = copy.deepcopy(smoke.tokenizer)
    right.padding_side = "right"
    d = smoke.tokenizer.convert_tokens_to_ids(END_THINK)
    with logit_bias(smoke.model, d, 2.0):  # some rows stop thinking, so extensions are exercised
        kw = dict(max_thinking_tokens=12, num_extensions=2, max_answer_tokens=4, max_new_tokens=30)
        left = budget_force_batch(smoke.model, smoke.tokenizer, PROMPTS, **kw)
        got = budget_force_batch(smoke.model, right, PROMPTS, **kw)
    assert [g.tokens for g in got] == [g.tokens for g in left]
    assert right.padding_side == "right"


def test_right_padding_on_a_gpt2_with_learned_positions():
    """Absolute positions: a row padded on the left must still count its positions from its first token."""
    tok = reasoning_tokenizer()
    tok.padding_side = "right"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)).eval()
    gens = budget_force_batch(model, tok, PROMPTS, max_new_tokens=12, max_answer_tokens=1000)
    for prompt, g in zip(PROMPTS, gens):
        assert g.tokens == greedy_decode(model, tok, prompt, max_new_tokens=12).tokens


def test_a_prompt_past_the_models_positions_is_refused_naming_the_limit(smoke):
    limit = smoke.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"has {limit}"):
        budget_force(smoke.model, smoke.tokenizer, "Q: " + "1+" * limit + "1\n<think>", max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        budget_force(smoke.model, smoke.tokenizer, PROMPTS[0], max_new_tokens=limit)


def test_scaling_weights_split_scaling_into_per_problem_terms():
    thinking = [0.0, 3.5, 3.5, 10.0, 24.0]
    correct = torch.randint(0, 2, (5, 30), generator=torch.Generator().manual_seed(0)).float()  # [budgets, problems]
    w = torch.tensor(scaling_weights(thinking))
    per_problem = w @ correct
    accuracy = correct.mean(1).tolist()
    assert math.isclose(float(per_problem.mean()), scaling(list(zip(thinking, accuracy))), rel_tol=1e-5)
    assert scaling_weights([5.0, 5.0]) is None
    assert scaling_weights([0.0, 10.0]) == [-0.1, 0.1]  # one pair: the slope (f1 - f0) / 10


def test_steps_and_rechecks_by_hand():
    from paperzoo.experiments.decoding.budget_forcing import recheck, steps

    assert steps("37+48: 7+8=15 3+4+1=8 so 85\n85-19: 5-9+10=6 8-1-1=6 so 67\n7x=61-12: 1-2+10=9 6-1-1=4 so 49\n"
                 "x=49/7: 4/7=0r4 49/7=7r0 so 7\n12*7: 2*7=14 1*7+1=8 so 84\nx+12=742/7: so 106\n") == [
        ("37+48", 85, True), ("85-19", 67, False), ("61-12", 49, True), ("49/7", 7, True), ("12*7", 84, True),
        ("742/7", 106, True)]
    trace = "37+48: so 85\n85-19: so 67\nWait, 85-19: so 66, not 67.\n66+10: so 76\n"  # reasoner v4's re-check
    assert recheck(trace) == {"rechecked": True, "wrong": 1, "fixed": 1}
    assert recheck("37+48: so 85\nWait, 37+48: so 85, right.\n") == {"rechecked": True, "wrong": 0, "fixed": 0}
    assert recheck("37+48: so 85\n85-19: so 67\nWait 85-19: so 67\n") == {"rechecked": True, "wrong": 1, "fixed": 0}
    assert recheck("37+48: so 85\nWait 48+1: so 49\n") == {"rechecked": False, "wrong": 0, "fixed": 0}  # new
    assert recheck("37+48: so 85\n")["rechecked"] is False


def test_predicate_by_hand():
    from paperzoo.experiments.decoding.budget_forcing import checks, preconditions

    n = 40
    def row(kind, N, thinking, right, cap=128):
        correct = [1.0] * right + [0.0] * (n - right)
        return {"kind": kind, "N": N, "cap": cap, "thinking_tokens": thinking, "correct": correct,
                "accuracy": right / n}

    caps = [row("cap", 0, 0.0, 0, cap=0), row("cap", 0, 8.0, 6, cap=8), row("cap", 0, 30.0, 16, cap=None)]
    waits = [row("wait", 0, 30.0, 16), row("wait", 1, 34.0, 20), row("wait", 2, 38.0, 24), row("wait", 4, 46.0, 26)]
    m = {"rows": caps + waits, "control": 1.0,
         "recheck": {"extended": 100, "rechecked": 30, "wrong": 20, "fixed": 5}}
    assert list(checks(m).values()) == [True, True, True, None]  # +8 then +2: flattening, but within noise
    waits[3].update(correct=[1.0] * 24 + [0.0] * 16, accuracy=0.6)  # +8 then +0: flattening
    assert list(checks(m).values()) == [True, True, True, True]
    assert all(preconditions(m).values())
    waits[2].update(correct=[1.0] * 18 + [0.0] * 22, accuracy=0.45)
    waits[3].update(correct=[1.0] * 40, accuracy=1.0)  # +2 then +22: the later gain is clearly larger
    assert list(checks(m).values())[3] is False
    for w in waits:  # extensions change nothing: no scaling, nothing to flatten
        w.update(correct=[1.0] * 16 + [0.0] * 24, accuracy=0.4)
    m["control"] = 0.99
    assert list(checks(m).values()) == [False, True, None, None]  # no gain: undecided, not "not reproduced"
    for w, right in zip(waits, (16, 10, 8, 6)):  # extensions clearly hurt
        w.update(correct=[1.0] * right + [0.0] * (n - right), accuracy=right / n)
    assert list(checks(m).values())[2:] == [False, None]
    m["recheck"] = {"extended": 100, "rechecked": 2, "wrong": 4, "fixed": 0}
    assert list(preconditions(m).values()) == [False, None, True, True]  # 10 of the 16 right answers kept
    m["recheck"] = {"extended": 100, "rechecked": 50, "wrong": 30, "fixed": 1}
    assert list(preconditions(m).values())[:2] == [True, False]
    waits[1].update(correct=[0.0] * 8 + [1.0] * 12 + [0.0] * 20)  # 8 of the 16 kept (and 4 fixed): not most
    assert list(preconditions(m).values())[3] is False
    waits[1].update(correct=[1.0] * 9 + [0.0] * 31)  # 9 of 16: most
    assert list(preconditions(m).values())[3] is True
    m["rows"] = caps + [w for w in waits if w["N"] != 1]
    assert list(preconditions(m).values())[3] is None  # no single extension measured


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(smoke):
    """A row's tokens are the same in a batch as alone, when rows finish at different steps."""
    model, tok = smoke.model, smoke.tokenizer
    last = {}
    trigger = torch.tensor(ids(tok, "= "))  # the untrained smoke model writes spaces in most rows

    def remember(module, args, kwargs):
        last["ids"] = kwargs["input_ids"][:, -1]

    def end_after_equals(module, args, output):  # a row's own last token decides: rows end at different steps
        output = output.clone()
        output[:, -1, tok.convert_tokens_to_ids(END_THINK)] += 30.0 * torch.isin(last["ids"], trigger)
        return output

    hooks = [model.register_forward_pre_hook(remember, with_kwargs=True),
             model.get_output_embeddings().register_forward_hook(end_after_equals)]
    try:
        prompts = PROMPTS + ["Q: 7+8\n<think>", "Q: 40x=80\n<think>"]
        batch = budget_force_batch(model, tok, prompts, max_new_tokens=40, max_answer_tokens=3, num_extensions=1)
        alone = [budget_force_batch(model, tok, [p], max_new_tokens=40, max_answer_tokens=3, num_extensions=1)[0]
                 for p in prompts]
    finally:
        for h in hooks:
            h.remove()
    assert len({len(g.tokens) for g in batch}) > 1  # rows did finish at different steps
    assert [g.tokens for g in batch] == [g.tokens for g in alone]


def test_capped_and_extended_runs_resumed_from_others_equal_runs_from_scratch(smoke):
    """The experiment builds each budget and each extension from the runs before it (`resume`): same tokens."""
    from paperzoo.experiments.decoding.budget_forcing import capped, extended

    model, tok = smoke.model, smoke.tokenizer
    last = {}
    trigger = torch.tensor(ids(tok, "= "))

    def remember(module, args, kwargs):
        last["ids"] = kwargs["input_ids"][:, -1]

    def end_after_equals(module, args, output):  # a row's own last token decides: the delimiter comes back
        output = output.clone()
        output[:, -1, tok.convert_tokens_to_ids(END_THINK)] += 30.0 * torch.isin(last["ids"], trigger)
        return output

    prompts = PROMPTS + ["Q: 7+8\n<think>", "Q: 40x=80\n<think>", "Q: 3(x+1)=9\n<think>"]
    cap_all, A = 30, 3

    def force(rows, cap, N, continuation, resume=None):
        return budget_force_batch(model, tok, [prompts[i] for i in rows], max_thinking_tokens=cap, num_extensions=N,
                                  continuation=continuation, max_answer_tokens=A, max_new_tokens=cap_all + A + 2,
                                  resume=resume)

    hooks = [model.register_forward_pre_hook(remember, with_kwargs=True),
             model.get_output_embeddings().register_forward_hook(end_after_equals)]
    try:
        everything = list(range(len(prompts)))
        full = force(everything, None, 0, "Wait")
        assert len({g.stats["thinking_tokens"] for g in full}) > 1
        for cap in (0, 2, 5, cap_all):
            assert [g.tokens for g in capped(force, full, cap, "Wait")] == \
                [g.tokens for g in force(everything, cap, 0, "Wait")]
        for continuation in ("Wait", ""):
            gens = capped(force, full, cap_all, continuation)
            for N in (1, 2, 3):
                gens = extended(force, gens, cap_all, continuation)
                direct = force(everything, cap_all, N, continuation)
                assert [g.tokens for g in gens] == [g.tokens for g in direct]
                assert [g.stats["extensions"] for g in gens] == [g.stats["extensions"] for g in direct]
        assert any(g.stats["extensions"] == 3 for g in direct)  # the test reached three extensions somewhere
    finally:
        for h in hooks:
            h.remove()


def test_resume_counts_against_the_cap_and_opens_the_tokens(smoke):
    model, tok = smoke.model, smoke.tokenizer
    prefix = ids(tok, "12+34: 2+4=6")
    (g,) = budget_force_batch(model, tok, ["Q: 12+34\n<think>"], max_thinking_tokens=len(prefix) + 2,
                              max_answer_tokens=2, resume=[prefix])
    assert g.tokens[:len(prefix)] == prefix and g.stats["thinking_tokens"] == len(prefix) + 2
    assert g.tokens[len(prefix) + 2] == tok.convert_tokens_to_ids(END_THINK) and g.stats["forced_stop"]
    with pytest.raises(ValueError, match="resume"):
        budget_force_batch(model, tok, ["Q: 1+1\n<think>"], resume=[ids(tok, "1</think>")])
    with pytest.raises(ValueError, match="resume"):
        budget_force_batch(model, tok, ["Q: 1+1\n<think>", "Q: 2+2\n<think>"], resume=[prefix])
