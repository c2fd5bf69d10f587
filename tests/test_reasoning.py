"""The verifiable-reasoning substrate: tasks, verifier, tokenizer, sampling statistics, the decoding baseline."""

import math

import pytest
import torch

from paperzoo.core import reasoning as R
from paperzoo.core.sampling import sample, token_statistics
from paperzoo.decoding import count_forward_passes, greedy_decode


def test_arithmetic_scratchpad_is_correct_line_by_line():
    for p in R.problems(200, "train", kinds=["arithmetic"]):
        assert eval(p.question) == p.answer  # the question is a plain Python expression
        value = None
        for line in p.steps:
            lhs, rhs = line.split("=")
            assert eval(lhs) == int(rhs) and (value is None or lhs.startswith(str(value)))
            value = int(rhs)
        assert value == p.answer and len(p.steps) == p.difficulty


def test_linear_equation_root_satisfies_the_equation():
    for p in R.problems(200, "train", kinds=["linear_equation"]):
        lhs, c = p.question.split("=")
        assert eval(lhs.replace("x", f"*{p.answer}")) == int(c)


def test_splits_are_disjoint_and_deterministic():
    train = {p.question for p in R.problems(3000, "train")}
    test = R.problems(300, "test")
    assert not train & {p.question for p in test}
    assert [p.question for p in R.problems(300, "test")] == [p.question for p in test]
    assert all(p.held_out for p in test)
    with pytest.raises(ValueError, match="unknown task"):
        R.problems(1, kinds=["sudoku"])


def test_verifier_reads_the_last_answer_only():
    p = R.Problem("arithmetic", "2+3", 5, ("2+3=5",), 1)
    assert R.is_correct(p, p.solution + "<|endoftext|>")
    assert not R.is_correct(p, "2+3=5\n</think>Answer: 6")
    assert R.is_correct(p, "Answer: 4 wait</think>Answer: 5")
    assert not R.is_correct(p, "2+3=5\n</think>")  # no answer at all
    assert R.extract_answer("Answer: -12") == -12


def test_tokenizer_is_character_level_and_round_trips():
    tok = R.reasoning_tokenizer()
    p = R.problems(1, "train")[0]
    text = R.training_text(p)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids(R.THINK)) == 1 and ids.count(tok.convert_tokens_to_ids(R.END_THINK)) == 1
    assert len(ids) == len(text) - len(R.THINK) - len(R.END_THINK) + 2  # one token per character, delimiters one each
    assert tok.eos_token_id == 0 and tok.padding_side == "left"


def test_token_statistics_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    lp, ent, top = token_statistics(logits, torch.tensor([1]), top_k=2)
    assert lp.item() == pytest.approx(math.log(0.25))
    assert ent.item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert top[0].tolist() == pytest.approx([math.log(0.5), math.log(0.25)])


@pytest.fixture(scope="module")
def smoke_reasoner():
    return R.reasoner("smoke")


def test_sample_counts_tokens_to_eos_and_matches_a_manual_forward(smoke_reasoner):
    model, tok = smoke_reasoner.model, smoke_reasoner.tokenizer
    prompts = [p.prompt for p in R.problems(3, "test")]
    out = sample(model, tok, prompts, num_samples=2, max_new_tokens=12, temperature=1.0, top_k_logprobs=3, seed=1)
    assert [s.prompt_index for s in out] == [0, 0, 1, 1, 2, 2]
    for s in out:
        assert 1 <= s.num_tokens <= 12 and s.logprobs.shape == s.entropies.shape == (s.num_tokens,)
        assert (0 not in s.tokens[:-1]) and s.finished == (s.tokens[-1] == 0)
        # the recorded log-probabilities are the model's own at temperature 1, recomputed by one forward pass
        ids = torch.tensor([tok(prompts[s.prompt_index], add_special_tokens=False)["input_ids"] + s.tokens])
        logp = torch.log_softmax(model(ids).logits[0, -s.num_tokens - 1 : -1].float(), -1)
        expected = logp.gather(-1, torch.tensor(s.tokens)[:, None])[:, 0]
        assert torch.allclose(s.logprobs, expected, atol=1e-4)
        assert torch.allclose(s.top_logprobs[:, 0], logp.max(-1).values, atol=1e-4)
    again = sample(model, tok, prompts, num_samples=2, max_new_tokens=12, temperature=1.0, seed=1)
    assert [s.tokens for s in again] == [s.tokens for s in out]


def test_greedy_decode_counts_one_pass_per_token(smoke_reasoner):
    model, tok = smoke_reasoner.model, smoke_reasoner.tokenizer
    g = greedy_decode(model, tok, R.problems(1, "test")[0].prompt, max_new_tokens=10)
    assert g.forward_passes == g.num_tokens and g.wall_seconds > 0
    greedy = sample(model, tok, [R.problems(1, "test")[0].prompt], temperature=0, max_new_tokens=10)[0]
    assert greedy.tokens == g.tokens
    with count_forward_passes(model) as c:
        model(torch.tensor([[1, 2, 3]]))
        model(torch.tensor([[1]]))
    assert c.count == 2


def test_reasoner_is_cached_and_reused(smoke_reasoner):
    again = R.reasoner("smoke")
    assert again.name == smoke_reasoner.name
    for a, b in zip(again.model.parameters(), smoke_reasoner.model.parameters()):
        assert torch.equal(a, b)
    draft = R.draft_reasoner("smoke")
    assert draft.model.config.vocab_size == smoke_reasoner.model.config.vocab_size
    assert sum(p.numel() for p in draft.model.parameters()) < sum(p.numel() for p in smoke_reasoner.model.parameters())
