import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from paperzoo.core.reasoning import reasoning_tokenizer
from paperzoo.core.reasoner import reasoner
from paperzoo.core.sampling import sample, encode_left_padded
from paperzoo.decoding import count_forward_passes
from paperzoo.decoding.genarm_reward_decoding import (
    GenARMLogitsProcessor,
    encode_responses,
    genarm_decode,
    genarm_generate,
    genarm_loss,
    guided_logprobs,
    lora_arm,
    response_logprobs,
    sequence_reward,
    train_arm,
)
from paperzoo.experiments.decoding.genarm_reward_decoding import checks, pairwise_accuracy, preconditions, win_rate
from tests.tiny_models import tiny

PROMPTS = ["Q: 1+2\n<think>", "Q: 10+20-3\n<think>"]  # 8 and 12 tokens: the first row is padded


def gpt2(tok, seed: int):
    """Learned absolute positions: a left-padded row read at the wrong positions gives other logits."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_response_logprobs_match_a_manual_sum_with_left_padding(arch):
    tok = reasoning_tokenizer()
    model = tiny("llama") if arch == "llama" else gpt2(tok, 0)
    model.resize_token_embeddings(len(tok))
    prompts, responses = ["Q: 1+2\n", "Q: 10+20-3\n"], ["3</think>", "27"]
    enc_ids, attn, resp = encode_responses(tok, prompts, responses)
    assert attn[0, 0] == 0  # the first row really is padded
    with torch.no_grad():
        got = response_logprobs(model, enc_ids, attn, resp)
    for b, (p, y) in enumerate(zip(prompts, responses)):
        x = ids(tok, p)
        full = torch.tensor([x + ids(tok, y)])
        logp = torch.log_softmax(model(full).logits[0, :-1], -1)
        want = sum(float(logp[t - 1, full[0, t]].detach()) for t in range(len(x), full.shape[1]))
        assert abs(float(got[b]) - want) < 1e-4
    assert torch.allclose(sequence_reward(model, tok, prompts, responses, beta_r=0.1), 0.1 * got, atol=1e-5)
    # batched after sorting by length: the rewards still come back in the caller's order
    assert torch.allclose(sequence_reward(model, tok, prompts[::-1], responses[::-1], batch_size=1), got.flip(0),
                          atol=1e-5)


@torch.no_grad()
def test_processor_equals_a_cache_free_reference_on_a_left_padded_batch():
    """Step by step, the processor's log pi~ equals log softmax(log pi_base + alpha log pi_r) of each row alone."""
    tok = reasoning_tokenizer()
    base, arm = gpt2(tok, 0), gpt2(tok, 1)
    enc = encode_left_padded(tok, PROMPTS)
    alpha = 1.5
    proc = GenARMLogitsProcessor(arm, alpha, enc["attention_mask"])
    seq, rows = enc["input_ids"], [ids(tok, p) for p in PROMPTS]
    for _ in range(4):
        scores = torch.stack([base(input_ids=torch.tensor([r])).logits[0, -1] for r in rows])  # base, row alone
        got = proc(seq, scores)
        for b, r in enumerate(rows):
            want = guided_logprobs(scores[b], arm(input_ids=torch.tensor([r])).logits[0, -1], alpha)
            assert torch.allclose(got[b], want, atol=1e-4), b
        assert not torch.allclose(got, torch.log_softmax(scores, -1), atol=1e-3)  # the ARM really contributes
        nxt = got.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
        rows = [r + [int(t)] for r, t in zip(rows, nxt)]


@torch.no_grad()
def reference_samples(base, arm, tok, prompts, alpha, max_new_tokens, seed):
    """GenARM sampled without caches, padding or generate: each row's full sequence through both models."""
    eos = tok.eos_token_id
    rows, done = [ids(tok, p) for p in prompts], [False] * len(prompts)
    out = [[] for _ in prompts]
    torch.manual_seed(seed)
    for _ in range(max_new_tokens):
        logp = torch.stack([guided_logprobs(base(input_ids=torch.tensor([r])).logits[0, -1],
                                            arm(input_ids=torch.tensor([r])).logits[0, -1], alpha) for r in rows])
        nxt = torch.multinomial(torch.softmax(logp, -1), 1).squeeze(1).tolist()
        for b, t in enumerate(nxt):
            t = eos if done[b] else t
            rows[b].append(t)
            if not done[b]:
                out[b].append(t)
            done[b] = done[b] or t == eos
        if all(done):
            break
    return out


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_guided_sampling_equals_the_reference_with_alpha_above_zero(padding_side):
    tok = reasoning_tokenizer()
    tok.padding_side = padding_side  # load_causal_lm returns right-padding tokenizers
    base, arm = gpt2(tok, 0), gpt2(tok, 1)
    gens = genarm_generate(base, arm, tok, PROMPTS, alpha=2.0, max_new_tokens=8, seed=5)
    want = reference_samples(base, arm, tok, PROMPTS, 2.0, 8, seed=5)
    assert [g.tokens for g in gens] == want
    plain = genarm_generate(base, arm, tok, PROMPTS, alpha=0.0, max_new_tokens=8, seed=5)
    assert [g.tokens for g in plain] != want  # alpha = 2 changed what was sampled
    assert tok.padding_side == padding_side


def test_alpha_zero_samples_exactly_what_the_base_samples():
    r = reasoner("smoke")
    arm = copy.deepcopy(r.model)
    with torch.no_grad():
        for p in arm.parameters():
            p.add_(torch.randn_like(p))
    prompts = ["Q: 12+7\n<think>", "Q: 3+4-1\n<think>"]
    gens = genarm_generate(r.model, arm, r.tokenizer, prompts, alpha=0.0, max_new_tokens=12, seed=3)
    plain = sample(r.model, r.tokenizer, prompts, max_new_tokens=12, temperature=1.0, seed=3)  # the base alone
    assert [g.tokens for g in gens] == [x.tokens for x in plain]
    # both models are called once per generated position (the ARM's first call covers the prompt)
    assert gens[0].stats["arm_forward_passes"] == gens[0].stats["base_forward_passes"] == \
        max(len(x.tokens) for x in plain)


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


def test_lora_arm_trains_only_its_adapter_and_raises_the_preferred_margin():
    r = reasoner("smoke")
    before_base = {n: p.clone() for n, p in r.model.named_parameters()}
    arm = lora_arm(r.model, rank=4, alpha=8.0, dropout=0.0)
    trainable = [n for n, p in arm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n} == {"q_proj", "k_proj", "v_proj"}
    pairs = [("Q: 1+2\n<think>", "1+2=3</think>Answer: 3", "1+2=4</think>Answer: 4")] * 8
    x, y = [pairs[0][0]] * 2, [pairs[0][1], pairs[0][2]]
    margin_before = sequence_reward(arm, r.tokenizer, x, y)
    losses = train_arm(arm, r.tokenizer, pairs, beta_r=0.5, epochs=6, batch_size=4, lr=3e-2, warmup_steps=1)
    assert len(losses) == 12 and losses[-1] < losses[0]
    after = sequence_reward(arm, r.tokenizer, x, y)
    assert float(after[0] - after[1]) > float(margin_before[0] - margin_before[1])
    assert all(torch.equal(p, before_base[n]) for n, p in r.model.named_parameters())  # the base is untouched
    merged = arm.merge_and_unload()
    assert torch.allclose(sequence_reward(merged, r.tokenizer, x, y), after, atol=1e-4)
    # a peft ARM is accepted by genarm_generate as it is
    again = lora_arm(r.model, rank=2)
    g = genarm_generate(r.model, again, r.tokenizer, ["Q: 1+1\n<think>"], alpha=1.0, max_new_tokens=4)
    assert g[0].stats["arm_forward_passes"] == g[0].stats["base_forward_passes"] > 0


def test_micro_batches_take_the_steps_of_whole_batches():
    """Length-sorted micro-batches against a plain loop over whole batches: same losses, same weights after 2 steps."""
    from transformers import get_cosine_schedule_with_warmup

    r = reasoner("smoke")
    tok = r.tokenizer
    pairs = [("Q: 1+2\n<think>", "1+2=3</think>Answer: 3", "1+2=4</think>Answer: 4"),
             ("Q: 10+20-3\n<think>", "10+20=30 30-3=27</think>Answer: 27", "1</think>Answer: 1"),
             ("Q: 5-1\n<think>", "5-1=4</think>Answer: 4", "5-1=3 so it is 3</think>Answer: 3"),
             ("Q: 7+7\n<think>", "7+7=14</think>Answer: 14", "7+7=15</think>Answer: 15"),
             ("Q: 9-2-1\n<think>", "9-2=7 7-1=6</think>Answer: 6", "9-2=7 7-1=5</think>Answer: 5")] * 2
    lr, beta = 1e-2, 0.5
    ref = copy.deepcopy(r.model).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(opt, 0, 2)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    ref_losses = []
    for batch in (order[:5], order[5:]):
        x = [pairs[i][0] for i in batch]
        logp = response_logprobs(ref, *encode_responses(tok, x + x, [pairs[i][1] for i in batch] +
                                                        [pairs[i][2] for i in batch]))
        loss = genarm_loss(logp[:5], logp[5:], beta)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        opt.step()
        schedule.step()
        ref_losses.append(float(loss))
    arm = copy.deepcopy(r.model)
    losses = train_arm(arm, tok, pairs, beta_r=beta, epochs=1, batch_size=5, lr=lr, micro_batch=2, seed=0)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    diff = max(float((a - b).abs().max()) for a, b in zip(arm.parameters(), ref.parameters()))
    assert diff < 1e-2 * lr  # Adam's first steps are about lr * sign(g): rounding in near-zero g moves < 1% of lr


def test_training_a_whole_model_still_works():
    r = reasoner("smoke")
    arm = copy.deepcopy(r.model)
    pairs = [("Q: 1+2\n<think>", "1+2=3</think>Answer: 3", "1+2=4</think>Answer: 4")] * 4
    losses = train_arm(arm, r.tokenizer, pairs, beta_r=0.5, epochs=15, batch_size=4, lr=3e-3)
    assert losses[-1] < losses[0]


def test_bad_arguments_are_refused_before_any_work():
    r = reasoner("smoke")
    m, tok = r.model, r.tokenizer
    limit = m.config.max_position_embeddings
    with count_forward_passes(m) as passes:
        with pytest.raises(ValueError, match="alpha"):
            genarm_generate(m, m, tok, PROMPTS, alpha=-1.0)
        with pytest.raises(ValueError, match="max_new_tokens"):
            genarm_generate(m, m, tok, PROMPTS, max_new_tokens=0)
        with pytest.raises(ValueError, match=f"has {limit}"):
            genarm_generate(m, m, tok, ["Q: " + "1+" * limit + "1\n<think>"], max_new_tokens=4)
        with pytest.raises(ValueError, match="max_new_tokens"):
            genarm_generate(m, m, tok, PROMPTS, max_new_tokens=limit)
        with pytest.raises(ValueError, match="prompts"):
            genarm_generate(m, m, tok, [])
        with pytest.raises(ValueError, match="epochs"):
            train_arm(m, tok, [("a", "b", "c")], epochs=0)
        with pytest.raises(ValueError, match="beta_r"):
            train_arm(m, tok, [("a", "b", "c")], beta_r=0)
        with pytest.raises(ValueError, match="preference pair"):
            train_arm(m, tok, [])
        with pytest.raises(ValueError, match="rank"):
            lora_arm(m, rank=0)
    assert passes.count == 0


def test_win_rate_pairwise_accuracy_checks_and_preconditions_by_hand():
    import numpy as np

    # pairs (guided, base): win, loss, tie, tie -> (1 + 0 + 0.5 + 0.5) / 4
    assert win_rate([True, False, True, False], [False, True, True, False]) == 0.5
    assert win_rate([True, True], [False, True]) == 0.75
    # problem 0: right rewards 3, 1 against wrong 2 -> 1/2; problem 1: no wrong completion -> left out
    rewards = np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    right = np.array([[True, True, False], [True, True, True]])
    assert pairwise_accuracy(rewards, right) == [0.5]

    n = 40
    pp = {"genarm": [1.0] * 20 + [0.0] * 20, "sharpened_control": [1.0] * 8 + [0.0] * 32,
          "base": [1.0] * 10 + [0.0] * 30, "win": [1.0] * 12 + [0.5] * 28,
          "best_of_matched": [1.0] * 18 + [0.0] * 22, "arm_pairwise_accuracy": [0.8, 0.7, 0.9, 0.75, 0.85]}
    m = {"per_problem": pp, "accuracy": {"base": 0.25}}
    assert list(checks(m).values()) == [True, True, True]
    assert all(preconditions(m).values())
    pp.update(win=[1.0] * 2 + [0.5] * 36 + [0.0] * 2, sharpened_control=list(pp["genarm"]),
              best_of_matched=[1.0] * 21 + [0.0] * 19)
    assert list(checks(m).values()) == [None, None, True]  # within noise: undecided; one problem behind best-of-2
    pp.update(win=[0.0] * 12 + [0.5] * 28, sharpened_control=[1.0] * 32 + [0.0] * 8,
              best_of_matched=[1.0] * 36 + [0.0] * 4)
    assert list(checks(m).values()) == [False, False, False]  # clearly worse on all three
    pp["arm_pairwise_accuracy"] = [0.5, 0.45, 0.55, 0.5]  # at chance: nothing to judge
    m["accuracy"]["base"] = 0.02
    assert list(preconditions(m).values()) == [False, False]
    pp["arm_pairwise_accuracy"] = []
    assert list(preconditions(m).values())[0] is None
    assert n == len(pp["genarm"])
