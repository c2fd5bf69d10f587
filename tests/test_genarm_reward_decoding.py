import copy
import math

import pytest
import torch

from paperzoo.core.reasoning import reasoner
from paperzoo.decoding.genarm_reward_decoding import (
    encode_responses,
    genarm_decode,
    genarm_generate,
    genarm_loss,
    guided_logprobs,
    response_logprobs,
    sequence_reward,
    train_arm,
)
from paperzoo.experiments.decoding.genarm_reward_decoding import checks, win_rate
from tests.tiny_models import tiny


def test_guided_distribution_by_hand():
    # vocabulary of 3: pi_base = (0.5, 0.3, 0.2), pi_r = (0.1, 0.6, 0.3), alpha = 2
    base = torch.tensor([0.5, 0.3, 0.2]).log() + 7.0  # logits: any shift
    arm = torch.tensor([0.1, 0.6, 0.3]).log() - 3.0
    unnorm = [0.5 * 0.1**2, 0.3 * 0.6**2, 0.2 * 0.3**2]
    expected = torch.tensor([u / sum(unnorm) for u in unnorm])
    got = guided_logprobs(base, arm, 2.0).exp()
    assert torch.allclose(got, expected, atol=1e-6)
    assert abs(float(got.sum()) - 1) < 1e-6


def test_alpha_zero_is_the_base_distribution():
    torch.manual_seed(0)
    base, arm = torch.randn(4, 11), torch.randn(4, 11) * 5
    assert torch.allclose(guided_logprobs(base, arm, 0.0), torch.log_softmax(base, -1), atol=1e-6)
    assert not torch.allclose(guided_logprobs(base, arm, 1e-1), torch.log_softmax(base, -1), atol=1e-3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        guided_logprobs(torch.zeros(5), torch.zeros(6), 1.0)
    with pytest.raises(ValueError):
        guided_logprobs(torch.zeros(5), torch.zeros(5), -1.0)
    with pytest.raises(ValueError):
        genarm_loss(torch.zeros(2), torch.zeros(3), 0.1)
    with pytest.raises(ValueError):
        genarm_loss(torch.zeros(2), torch.zeros(2), 0.0)


def test_loss_by_hand():
    logp_w, logp_l = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    beta_r = 0.5
    # -mean log sigma(0.5 * (2, -6)) = mean(log(1 + e^-1), log(1 + e^3))
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(3.0))) / 2
    assert abs(float(genarm_loss(logp_w, logp_l, beta_r)) - expected) < 1e-6


def test_response_logprobs_match_a_manual_sum_with_left_padding():
    tok = reasoner("smoke").tokenizer
    model = tiny("llama")
    model.resize_token_embeddings(len(tok))
    prompts, responses = ["Q: 1+2\n", "Q: 10+20-3\n"], ["3</think>", "27"]
    ids, attn, resp = encode_responses(tok, prompts, responses)
    with torch.no_grad():
        got = response_logprobs(model, ids, attn, resp)
    for b, (p, y) in enumerate(zip(prompts, responses)):
        x = tok(p, add_special_tokens=False)["input_ids"]
        full = torch.tensor([x + tok(y, add_special_tokens=False)["input_ids"]])
        logp = torch.log_softmax(model(full).logits[0, :-1], -1)
        want = sum(float(logp[t - 1, full[0, t]].detach()) for t in range(len(x), full.shape[1]))
        assert abs(float(got[b]) - want) < 1e-4
    assert torch.allclose(sequence_reward(model, tok, prompts, responses, beta_r=0.1), 0.1 * got, atol=1e-5)


def test_alpha_zero_samples_exactly_what_the_base_samples():
    r = reasoner("smoke")
    arm = copy.deepcopy(r.model)
    with torch.no_grad():
        for p in arm.parameters():
            p.add_(torch.randn_like(p))
    prompts = ["Q: 12+7\n<think>", "Q: 3+4-1\n<think>"]
    gens = genarm_generate(r.model, arm, r.tokenizer, prompts, alpha=0.0, max_new_tokens=12, seed=3)
    enc = r.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(3)
    plain = r.model.generate(**enc, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             eos_token_id=0, pad_token_id=0)[:, enc["input_ids"].shape[1]:]
    for g, row in zip(gens, plain.tolist()):
        assert g.tokens == row[:len(g.tokens)]
    # both models are called once per generated position (the ARM's first call covers the prompt)
    assert gens[0].stats["arm_forward_passes"] == gens[0].stats["base_forward_passes"] == plain.shape[1]


def test_guided_sampling_follows_a_dominant_reward_model():
    # an ARM that puts almost all mass on one character steers GenARM there at large alpha
    r = reasoner("smoke")
    target = r.tokenizer("7", add_special_tokens=False)["input_ids"][0]
    arm = copy.deepcopy(r.model)
    bias = torch.zeros(arm.config.vocab_size)
    bias[target] = 20.0
    arm.lm_head.register_forward_hook(lambda m, i, o: torch.zeros_like(o) + bias)  # pi_r(target) ~ 1
    g = genarm_decode(r.model, arm, r.tokenizer, "Q: 1+1\n<think>", alpha=5.0, max_new_tokens=10, seed=0)
    assert g.tokens == [target] * 10
    with pytest.raises(ValueError):
        genarm_decode(r.model, arm, r.tokenizer, "", alpha=1.0)


def test_training_raises_the_preferred_margin():
    r = reasoner("smoke")
    arm = copy.deepcopy(r.model)
    pairs = [("Q: 1+2\n<think>", "1+2=3</think>Answer: 3", "1+2=4</think>Answer: 4")] * 4
    before = sequence_reward(arm, r.tokenizer, [p[0] for p in pairs[:1]] * 2, [pairs[0][1], pairs[0][2]])
    losses = train_arm(arm, r.tokenizer, pairs, beta_r=0.5, steps=15, batch_size=4, lr=3e-3)
    after = sequence_reward(arm, r.tokenizer, [p[0] for p in pairs[:1]] * 2, [pairs[0][1], pairs[0][2]])
    assert losses[-1] < losses[0]
    assert float(after[0] - after[1]) > float(before[0] - before[1])


def test_win_rate_and_checks_by_hand():
    # pairs (guided, base): win, loss, tie, tie -> (1 + 0 + 0.5 + 0.5) / 4
    assert win_rate([True, False, True, False], [False, True, True, False]) == 0.5
    assert win_rate([True, True], [False, True]) == 0.75
    m = {"win_rate": 0.6, "accuracy": {"genarm": 0.5, "sharpened_control": 0.45},
         "best_of_n": {"matched": {"accuracy": 0.5}}}
    assert all(checks(m).values())
    m["win_rate"] = 0.5
    assert list(checks(m).values()) == [False, True, True]
    m["accuracy"]["sharpened_control"] = 0.5
    m["best_of_n"]["matched"]["accuracy"] = 0.51
    assert list(checks(m).values()) == [False, False, False]
