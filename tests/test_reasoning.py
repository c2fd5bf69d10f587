"""The verifiable-reasoning substrate: tasks, verifier, tokenizer, sampling statistics, the decoding baseline."""

import math

import pytest
import torch

from paperzoo.core import reasoning as R
from paperzoo.core.reasoner import draft_reasoner, problems, reasoner, trace
from paperzoo.core.sampling import GrowingCache, sample, token_statistics
from paperzoo.decoding import count_forward_passes, greedy_decode


def test_problems_take_tiers_in_turn_and_splits_are_disjoint_and_deterministic():
    train = {p.question for p in problems(3000, "train", distinct=False)}
    test = problems(300, "test")
    assert not train & {p.question for p in test}
    assert [p.question for p in problems(300, "test")] == [p.question for p in test]
    assert all(p.held_out for p in test)
    assert [p.tier for p in test[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [p.tier for p in problems(6, "test", tiers=[2, 0])] == [2, 0, 2, 0, 2, 0]
    assert len(problems(7, "test", tiers=[1, 3])) == 7
    for bad in ([], [4], [1, 1], [-1]):
        with pytest.raises(ValueError, match="tiers must be"):
            problems(1, tiers=bad)


def test_verifier_reads_the_last_answer_only():
    p = R.Problem("arithmetic", "2+3", 5, ("2+3=5",), 1)
    assert R.is_correct(p, p.solution + "<|endoftext|>")
    assert not R.is_correct(p, "2+3=5\n</think>Answer: 6")
    assert R.is_correct(p, "Answer: 4 wait</think>Answer: 5")
    assert not R.is_correct(p, "2+3=5\n</think>")  # no answer at all
    assert R.extract_answer("Answer: -12") == -12


def test_tokenizer_is_character_level_and_round_trips():
    tok = R.reasoning_tokenizer()
    p = problems(1, "train")[0]
    text = p.prompt + trace(p)
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
    return reasoner("smoke")


def test_sample_counts_tokens_to_eos_and_matches_a_manual_forward(smoke_reasoner):
    model, tok = smoke_reasoner.model, smoke_reasoner.tokenizer
    prompts = [p.prompt for p in problems(3, "test")]
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
    g = greedy_decode(model, tok, problems(1, "test")[0].prompt, max_new_tokens=10)
    assert g.forward_passes == g.num_tokens and g.wall_seconds > 0
    greedy = sample(model, tok, [problems(1, "test")[0].prompt], temperature=0, max_new_tokens=10)[0]
    assert greedy.tokens == g.tokens
    with count_forward_passes(model) as c:
        model(torch.tensor([[1, 2, 3]]))
        model(torch.tensor([[1]]))
    assert c.count == 2


def test_reasoner_is_cached_and_reused(smoke_reasoner):
    again = reasoner("smoke")
    assert again.name == smoke_reasoner.name
    for a, b in zip(again.model.parameters(), smoke_reasoner.model.parameters()):
        assert torch.equal(a, b)
    draft = draft_reasoner("smoke")
    assert draft.model.config.vocab_size == smoke_reasoner.model.config.vocab_size
    assert sum(p.numel() for p in draft.model.parameters()) < sum(p.numel() for p in smoke_reasoner.model.parameters())


def test_sample_greedy_equals_transformers_generate_and_rows_stop_independently(smoke_reasoner):
    """The compacting loop: greedy is generate's greedy token for token, also when rows end (and leave the batch)
    at different steps, and a row's tokens are those it gets alone."""
    from paperzoo.core.reasoner import REASONERS
    from paperzoo.core.sampling import encode_left_padded

    torch.manual_seed(2)  # a fresh model whose rows write varied tokens (seed 0's rows, and the smoke model's, repeat one)
    model, tok = REASONERS["smoke"].model.build().eval(), smoke_reasoner.tokenizer
    prompts = [p.prompt for p in problems(8, "test")]
    free = sample(model, tok, prompts, temperature=0, max_new_tokens=30)
    # a stop token the rows reach at different steps: make it EOS, so rows leave the batch one by one
    def ends(t):
        return {s.tokens.index(t) if t in s.tokens else None for s in free}

    stop = max({t for s in free for t in s.tokens}, key=lambda t: len(ends(t)))
    assert len(ends(stop)) >= 2
    tok.eos_token_id, old = stop, tok.eos_token_id
    try:
        mine = sample(model, tok, prompts, temperature=0, max_new_tokens=30, batch_size=8)
        enc = encode_left_padded(tok, prompts)
        ref = model.generate(**enc, max_new_tokens=30, do_sample=False, eos_token_id=stop, pad_token_id=0)
        for s, row in zip(mine, ref[:, enc["input_ids"].shape[1]:].tolist()):
            assert s.tokens == (row[: row.index(stop) + 1] if stop in row else row)
            assert s.finished == (stop in row)
        alone = [sample(model, tok, [p], temperature=0, max_new_tokens=30)[0].tokens for p in prompts]
        assert [s.tokens for s in mine] == alone
    finally:
        tok.eos_token_id = old


def test_sampling_rules_temperature_and_top_p():
    from paperzoo.core.sampling import _next_tokens

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    torch.manual_seed(0)
    assert _next_tokens(logits, 0, 1.0).eq(0).all()
    drawn = _next_tokens(logits, 1.0, 0.7)  # top-p 0.7 keeps {0, 1} (0.5 + 0.3 >= 0.7), renormalised
    assert set(drawn.tolist()) == {0, 1} and abs(drawn.eq(0).float().mean() - 0.5 / 0.8) < 0.03
    drawn = _next_tokens(logits, 1.0, 1e-6)  # at least the most likely token stays
    assert drawn.eq(0).all()
    hot = _next_tokens(logits, 2.0, 1.0)  # temperature 2 flattens: p ~ sqrt(p)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert abs(hot.eq(3).float().mean() - expected[3] / expected.sum()) < 0.03


def test_growing_cache_holds_what_a_dynamic_cache_holds():
    """Prefill, steps, a batch selection (rows leave), a crop, and a regrowth past the first buffer."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    grow, plain = GrowingCache(), DynamicCache()

    def step(length, batch):
        k, v = torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4, generator=g)
        return [cache.update(k, v, 0) for cache in (grow, plain)]

    step(5, 3)
    for _ in range(300):  # past the first buffer (the prefill's 5 columns and 256 spare)
        step(1, 3)
    for cache in (grow, plain):
        cache.batch_select_indices(torch.tensor([0, 2]))
        cache.crop(-3)
    (keys, values), (plain_keys, plain_values) = step(2, 2)
    assert grow.get_seq_length() == plain.get_seq_length() == 304
    torch.testing.assert_close(keys, plain_keys, rtol=0, atol=0)
    torch.testing.assert_close(values, plain_values, rtol=0, atol=0)


def test_guided_greedy_drops_finished_rows_from_both_caches(smoke_reasoner):
    """With a guide model, rows that end at different steps leave both caches: each row's tokens are the argmax of
    the combined logits of its own full sequence, as alone and without any cache."""
    from paperzoo.core.reasoner import REASONERS

    torch.manual_seed(2)
    model, tok = REASONERS["smoke"].model.build().eval(), smoke_reasoner.tokenizer
    torch.manual_seed(3)
    guide = REASONERS["smoke"].model.build().eval()

    def combine(b, g):
        return torch.log_softmax(b.float(), -1) + 0.7 * torch.log_softmax(g.float(), -1)

    prompts = [p.prompt for p in problems(6, "test")]
    free = sample(model, tok, prompts, temperature=0, max_new_tokens=20, guide=guide, combine=combine)
    stop = max({t for s in free for t in s.tokens},
               key=lambda t: len({s.tokens.index(t) if t in s.tokens else None for s in free}))
    tok.eos_token_id, old = stop, tok.eos_token_id
    try:
        mine = sample(model, tok, prompts, temperature=0, max_new_tokens=20, guide=guide, combine=combine)
        assert len({len(s.tokens) for s in mine}) >= 2  # rows did leave at different steps
        with torch.no_grad():
            for p, s in zip(prompts, mine):
                row = tok(p, add_special_tokens=False)["input_ids"]
                want = []
                while len(want) < 20 and (not want or want[-1] != stop):
                    ids = torch.tensor([row + want])
                    want.append(int(combine(model(input_ids=ids).logits[0, -1], guide(input_ids=ids).logits[0, -1])
                                    .argmax()))
                assert s.tokens == want
    finally:
        tok.eos_token_id = old
    with pytest.raises(ValueError, match="guide"):
        sample(model, tok, prompts, guide=guide)
