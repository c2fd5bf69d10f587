import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import ARCHS, tiny
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from paperzoo.core.models import TinyLMConfig
from paperzoo.core.reasoning import RESERVED, reasoning_tokenizer
from paperzoo.core.training import TrainConfig, train
from paperzoo.decoding import greedy_decode
from paperzoo.decoding.mtp_gated_lora import (
    GatedMTP,
    MTPConfig,
    attach,
    block_layout,
    mask_token_ids,
    mtp_batch,
    mtp_decode,
    mtp_losses,
    train_mtp,
)

MASKS = [60, 61, 62, 63]  # ids used as mask tokens on the 64-token tiny models
IDS = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(1))


def perturb(mtp: GatedMTP, seed: int = 0) -> GatedMTP:
    """Non-zero LoRA B, mask embeddings and sampler, so a leak of any of them would show."""
    g = torch.Generator().manual_seed(seed)
    for name, p in mtp.named_parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return mtp


def gated_tiny(arch: str, k: int = 4) -> tuple[torch.nn.Module, GatedMTP]:
    base = tiny(arch)
    return base, perturb(GatedMTP(copy.deepcopy(base), MASKS[:k], MTPConfig(k=k, rank=4)))


def reasoning_lm(seed: int = 0):
    tok = reasoning_tokenizer()
    torch.manual_seed(seed)
    return TinyLMConfig(len(tok), 32, 2, 2, 64, 256).build().eval(), tok


def test_gated_lora_by_hand():
    """y_t = W x_t + g_t (alpha/r) B A x_t on a 2-d layer: W = I, A = [1 1], B = [1 2]^T, alpha/r = 2."""
    config = LlamaConfig(vocab_size=16, hidden_size=2, intermediate_size=2, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    mtp = GatedMTP(LlamaForCausalLM(config).eval(), [15], MTPConfig(k=1, rank=1, alpha=2.0))
    layer = mtp.base.model.layers[0].self_attn.q_proj
    layer.base_layer.weight.data = torch.eye(2)
    layer.lora_A["default"].weight.data = torch.tensor([[1.0, 1.0]])
    layer.lora_B["default"].weight.data = torch.tensor([[1.0], [2.0]])
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    with torch.no_grad(), mtp.gated(torch.tensor([[0.0, 1.0, 0.0]])):
        y = layer(x)
    # row 1: A x = 7, B A x = [7, 14], times 2 = [14, 28], plus W x = [3, 4]
    assert torch.equal(y, torch.tensor([[[1.0, 2.0], [17.0, 32.0], [5.0, 6.0]]]))
    with torch.no_grad():
        assert torch.equal(layer(x), x)  # closed gate outside the context


@pytest.mark.parametrize("arch", ARCHS)
def test_closed_gate_gives_identical_logits(arch):
    base, mtp = gated_tiny(arch)
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
        assert torch.equal(mtp(IDS).logits, expected)
        assert torch.equal(mtp(IDS, gate=torch.zeros(IDS.shape)).logits, expected)
        assert torch.equal(mtp.base(input_ids=IDS).logits, expected)  # a plain call, outside GatedMTP
        # mask-token ids as ordinary tokens: with the gate closed they are ordinary tokens
        with_mask_ids = IDS.clone()
        with_mask_ids[:, 3] = MASKS[0]
        assert torch.equal(mtp(with_mask_ids).logits, base(input_ids=with_mask_ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_open_gate_everywhere_equals_plain_peft_lora(arch):
    base, mtp = gated_tiny(arch)
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=32.0, target_modules="all-linear"))
    lora = {n.replace(".default", ""): p for n, p in mtp.model.named_parameters() if "lora_" in n}
    plain_lora = {n.replace(".default", ""): p for n, p in plain.named_parameters() if "lora_" in n}
    assert lora.keys() == plain_lora.keys() and lora
    for n, p in plain_lora.items():
        p.data = lora[n].data.clone()
    with torch.no_grad():
        got = mtp(IDS, gate=torch.ones(IDS.shape)).logits
        assert torch.equal(got, plain(input_ids=IDS).logits)
        assert not torch.allclose(got, base(input_ids=IDS).logits, atol=1e-3)  # the LoRA update is really there


def test_ordinary_positions_ignore_appended_masks():
    base, mtp = gated_tiny("llama")
    ids = torch.cat([IDS, torch.tensor([MASKS] * 2)], dim=1)
    gate = torch.zeros(ids.shape)
    gate[:, IDS.shape[1]:] = 1
    with torch.no_grad():
        out = mtp(ids, gate=gate)
        assert torch.allclose(out.logits[:, : IDS.shape[1]], base(input_ids=IDS).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(out.logits[:, -4:], base(input_ids=ids).logits[:, -4:], atol=1e-3)


def test_block_layout_by_hand():
    # 3 ordinary tokens, blocks of k = 2 after tokens 0 and 2
    pos, allowed = block_layout(3, torch.tensor([[0, 2]]), 2)
    assert pos.tolist() == [[0, 1, 2, 1, 2, 3, 4]]
    assert allowed.int().tolist() == [[
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0],  # m1 after x0: x0, itself
        [1, 0, 0, 1, 1, 0, 0],  # m2 after x0: x0, m1, itself
        [1, 1, 1, 0, 0, 1, 0],  # m1 after x2
        [1, 1, 1, 0, 0, 1, 1],
    ]]
    pos, allowed = block_layout(1, torch.tensor([[0]]), 1, past=2)
    assert pos.tolist() == [[2, 3]] and allowed.int().tolist() == [[[1, 1, 1, 0], [1, 1, 1, 1]]]


def test_training_batch_targets_by_hand():
    _, mtp = gated_tiny("llama", k=2)
    x = torch.tensor([[10, 11, 12, 13, 14]])
    b = mtp_batch(mtp, x)  # all anchors 0, 1, 2
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 14, 60, 61, 60, 61, 60, 61]]
    assert b["gate"].tolist() == [[0] * 5 + [1] * 6]
    # mask j after anchor a predicts x[a + 1 + j]; its source a + j holds the previous token
    assert b["target"].tolist() == [[12, 13, 13, 14, 14, -100]]
    assert b["source"][0, :5].tolist() == [1, 2, 2, 3, 3]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 1, 2, 2, 3, 3, 4]]


def test_training_layout_reproduces_inference_latents():
    """A mask block in the packed training batch sees exactly what it sees when appended at inference."""
    _, mtp = gated_tiny("llama", k=3)
    x = IDS[:1, :8]
    b = mtp_batch(mtp, x, anchors=3)
    from paperzoo.decoding.mtp_gated_lora import attention_mask_4d

    with torch.no_grad():
        packed = mtp(b["input_ids"], gate=b["gate"], position_ids=b["position_ids"],
                     attention_mask=attention_mask_4d(b["allowed"], mtp.base)).z
        for slot in range(3):
            a = int(b["position_ids"][0, 8 + 3 * slot]) - 1  # the anchor of this block
            ids = torch.cat([x[:, : a + 1], torch.tensor([MASKS[:3]])], dim=1)
            gate = torch.zeros(ids.shape)
            gate[:, -3:] = 1
            alone = mtp(ids, gate=gate).z
            assert torch.allclose(packed[0, 8 + 3 * slot: 11 + 3 * slot], alone[0, -3:], atol=1e-4, rtol=1e-4)


def test_losses_at_initialisation():
    _, mtp = gated_tiny("llama", k=2)
    torch.nn.init.zeros_(mtp.sampler.W2.weight)
    torch.nn.init.zeros_(mtp.sampler.W2.bias)
    losses = mtp_losses(mtp, IDS, anchors=4)
    # the residual sampler starts as the plain mask head
    assert losses["ce_sampler"].item() == pytest.approx(losses["ce_mask"].item(), abs=1e-6)
    assert losses["lcm"].item() > 0
    expected = losses["ce_mask"] + losses["ce_sampler"] + losses["lcm"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["loss"].backward()
    assert mtp.mask_embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in mtp.base.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("strategy", ["linear", "quadratic"])
def test_greedy_mtp_decoding_reproduces_greedy_output(strategy):
    model, tok = reasoning_lm()
    mtp = perturb(attach(copy.deepcopy(model), tok, MTPConfig(k=3, rank=4)))
    for prompt in ("Q: 12+34\n<think>", "Q: 7x+3=24\n<think>", "hello"):
        ref = greedy_decode(model, tok, prompt, 24)
        got = mtp_decode(mtp, tok, prompt, 24, strategy=strategy)
        assert got.tokens == ref.tokens and got.text == ref.text
        assert got.stats["drafts_proposed"] > 0 and got.forward_passes <= ref.forward_passes


def _oracle(ref: list[int], prompt_len: int, wrong_at: int | None):
    """Drafts that are the true greedy continuation, with draft `wrong_at` replaced by another token."""
    def propose(z, prev, so_far):
        n = len(so_far) - prompt_len  # tokens generated so far; `prev` is the last of them
        assert prev == ref[n - 1]
        drafts = ref[n : n + z.shape[0]]
        if wrong_at is not None and len(drafts) > wrong_at:
            drafts[wrong_at] = (drafts[wrong_at] + 1) % 50 + 20
        return drafts
    return propose


@pytest.mark.parametrize("strategy, wrong_at, passes", [
    ("quadratic", None, 4), ("linear", None, 4),  # 1 + 4 + 4 + 1 tokens
    ("quadratic", 1, 6),  # 1 + 2 + 2 + 2 + 2 + 1: a fresh block always follows the accepted prefix
    ("linear", 1, 7),  # 1 + 2 + 1 + 2 + 1 + 2 + 1: after a rejection the next pass has no drafts
])
def test_pass_counts_with_planted_drafts(strategy, wrong_at, passes):
    model, tok = reasoning_lm()
    mtp = attach(copy.deepcopy(model), tok, MTPConfig(k=3, rank=4))
    prompt = "Q: 12+34\n<think>"
    ref = greedy_decode(model, tok, prompt, 10).tokens
    assert len(ref) == 10 and tok.eos_token_id not in ref  # the test needs 10 tokens without EOS
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    got = mtp_decode(mtp, tok, prompt, 10, strategy=strategy, propose=_oracle(ref, n_prompt, wrong_at))
    assert got.tokens == ref
    assert got.forward_passes == passes
    if wrong_at is None:
        assert got.stats["acceptance_rate"] == 1.0


def test_stops_at_eos_like_greedy():
    model, tok = reasoning_lm()
    prompt = "Q: 12+34\n<think>"
    ref = greedy_decode(model, tok, prompt, 12).tokens
    tok.eos_token = tok.convert_ids_to_tokens(ref[5])  # make the sixth generated token the end
    expected = greedy_decode(model, tok, prompt, 12)
    assert expected.tokens[-1] == tok.eos_token_id
    mtp = perturb(attach(copy.deepcopy(model), tok, MTPConfig(k=3, rank=4)))
    for strategy in ("linear", "quadratic"):
        assert mtp_decode(mtp, tok, prompt, 12, strategy=strategy).tokens == expected.tokens


def test_mask_tokens_are_reserved_tokens_or_new_ids():
    tok = reasoning_tokenizer()
    assert mask_token_ids(tok, 3) == tok.convert_tokens_to_ids(list(RESERVED[:3]))
    with pytest.raises(ValueError, match="fewer than k"):
        mask_token_ids(tok, 9)
    model, tok = reasoning_lm()
    vocab = len(tok)
    mtp = perturb(attach(copy.deepcopy(model), tok, MTPConfig(k=10, rank=4)))  # 8 reserved + 2 new ids
    ids = mtp.mask_ids.tolist()
    assert ids[:8] == tok.convert_tokens_to_ids(list(RESERVED)) and ids[8:] == [vocab, vocab + 1]
    assert len(tok) == vocab and mtp.base.get_input_embeddings().weight.shape[0] == vocab  # nothing resized
    x = torch.randint(11, vocab, (1, 9))
    with torch.no_grad():
        assert torch.equal(mtp(x).logits, model(input_ids=x).logits)
        with pytest.raises(ValueError, match="only as mask tokens"):
            mtp(torch.tensor([[12, vocab + 1]]))  # a new id with the gate closed
    prompt = "Q: 12+34\n<think>"
    assert mtp_decode(mtp, tok, prompt, 16).tokens == greedy_decode(model, tok, prompt, 16).tokens


def test_bad_input_is_rejected():
    _, mtp = gated_tiny("llama")
    with pytest.raises(ValueError, match="gate must have the shape"):
        mtp(IDS, gate=torch.ones(1, 3))
    with pytest.raises(ValueError, match="distinct mask token ids"):
        GatedMTP(tiny("llama"), [60, 60, 61, 62], MTPConfig(k=4))
    model, tok = reasoning_lm()
    with pytest.raises(ValueError, match="strategy"):
        mtp_decode(attach(model, tok, MTPConfig(k=2, rank=2)), tok, "hi", 4, strategy="cubic")
    for bad in ({"k": 0}, {"rank": 0}, {"alpha": 0.0}, {"lora_dropout": 1.0}, {"lcm_weight": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MTPConfig(**bad)


def test_fine_tuning_on_a_predictable_language_gives_many_tokens_per_pass():
    """A cyclic alphabet: the base model continues it; after MTP fine-tuning the drafts are mostly accepted."""
    model, tok = reasoning_lm()
    alphabet = "abcdefghij"
    gen = torch.Generator().manual_seed(0)
    texts = [(alphabet * 8)[int(s):][:40] for s in torch.randint(0, 10, (64,), generator=gen)]
    blocks = torch.tensor([tok(t, add_special_tokens=False)["input_ids"] for t in texts])
    train(model, blocks, TrainConfig(steps=60, batch_size=16, seq_len=40, lr=1e-2), desc="cyclic base")
    prompt = "cdefg"
    ref = greedy_decode(model, tok, prompt, 20)
    assert ref.text == (alphabet * 4)[7:27]  # the base model has learnt the cycle
    mtp = attach(copy.deepcopy(model), tok, MTPConfig(k=4, rank=8, alpha=16.0))
    untrained = mtp_decode(mtp, tok, prompt, 20)
    history = train_mtp(mtp, blocks, TrainConfig(steps=80, batch_size=8, seq_len=40, lr=1e-2))
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    got = mtp_decode(mtp, tok, prompt, 20)
    assert got.tokens == ref.tokens
    assert got.stats["tokens_per_pass"] > 3.0 > untrained.stats["tokens_per_pass"]


def test_predicate_by_hand():
    from paperzoo.experiments.decoding.mtp_gated_lora import checks, preconditions

    def domain(per_prompt, identical=1.0):
        row = {"tokens_per_pass_per_prompt": per_prompt, "identical_share": identical, "speedup": 0.5}
        return {"linear": dict(row), "quadratic": dict(row)}

    m = {"domains": {"reasoning": domain([4.5, 4.8, 5.0, 4.6, 4.9]), "prose": domain([2.2, 2.4, 2.3, 2.5])},
         "training": {"reasoning": {"train_loss": [5.0] * 10 + [2.0] * 10}, "prose": {"train_loss": [5.0] * 20}}}
    assert list(checks(m).values()) == [True, True, True]  # wall-clock (0.5x) is no check
    assert list(preconditions(m).values()) == [True, False]  # prose loss never fell
    m["domains"]["reasoning"] = domain([3.0, 5.0, 3.2, 4.8, 3.5])  # mean 3.9, but 3.0 .. 5.0: undecided
    m["domains"]["prose"] = domain([1.2, 1.4, 1.3, 1.5], identical=0.97)  # clearly below 2
    assert list(checks(m).values()) == [False, None, False]
    m["domains"]["reasoning"] = domain([3.5, 3.4, 3.6, 3.5, 3.5])  # the old verdict's 3.5: clearly below 4
    assert list(checks(m).values())[1] is False
    m["domains"]["prose"]["linear"]["identical_share"] = 0.5  # linear verification must be exact too
    m["domains"]["prose"]["quadratic"]["identical_share"] = 1.0
    assert list(checks(m).values())[0] is False


def test_each_draft_is_conditioned_on_the_draft_before_it():
    """s(z_j, e(y_{j-1})): draft j reads the previous draft, not the bonus token every time."""
    _, mtp = gated_tiny("llama", k=4)
    mtp.sampler.W1.weight.data[:, 32:] *= 100  # the tiny model's embeddings are small: make e(prev) count
    z = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    bonus = 7
    with torch.no_grad():
        got = mtp.propose(z, bonus)
        prev, want = bonus, []
        for j in range(4):
            prev = int(mtp.sampler_logits(z[j], torch.tensor(prev)).argmax())
            want.append(prev)
        always_bonus = [int(mtp.sampler_logits(z[j], torch.tensor(bonus)).argmax()) for j in range(4)]
    assert got == want
    assert always_bonus != want  # so a sampler that always read the bonus token would be told apart


@pytest.mark.parametrize("strategy", ["linear", "quadratic"])
def test_decoding_hands_the_sampler_the_bonus_token_then_its_own_drafts(strategy):
    """The drafter of each pass starts from the pass's bonus token, the last token of the output so far."""
    model, tok = reasoning_lm(seed=3)  # a random model whose greedy output does not repeat one token
    mtp = perturb(attach(copy.deepcopy(model), tok, MTPConfig(k=3, rank=4)))
    seen = []

    def spy(z, prev, so_far):
        seen.append((prev, so_far[-1], so_far[-2]))
        return mtp.propose(z, prev)

    got = mtp_decode(mtp, tok, "hello", 16, strategy=strategy, propose=spy)
    assert len(set(got.tokens)) > 8 and any(last != before for _, last, before in seen)
    assert seen and all(prev == last for prev, last, _ in seen)
    assert got.tokens == mtp_decode(mtp, tok, "hello", 16, strategy=strategy).tokens


def test_losses_by_hand_at_every_anchor():
    """Mask (a, j): CE towards x[a+1+j]; sampler fed x[a+j]; LCM towards the NTP latent at position a + j."""
    _, mtp = gated_tiny("llama", k=3)
    x, T, k = IDS[:1, :8], 8, 3
    from paperzoo.decoding.mtp_gated_lora import attention_mask_4d

    losses = mtp_losses(mtp, x)  # anchors=None: every anchor 0 .. T - 3, in order
    b = mtp_batch(mtp, x)
    with torch.no_grad():
        out = mtp(b["input_ids"], gate=b["gate"], position_ids=b["position_ids"],
                  attention_mask=attention_mask_4d(b["allowed"], mtp.base))
        z, logits = out.z[0], out.logits[0]
        lcm, ce, ce_s = [], [], []
        for slot, a in enumerate(range(T - 2)):
            for j in range(1, k + 1):
                if a + 1 + j >= T:
                    continue
                at = T + slot * k + j - 1
                target = x[0, a + 1 + j : a + 2 + j]
                lcm.append(((z[at] - z[a + j]) ** 2).mean())
                ce.append(torch.nn.functional.cross_entropy(logits[at : at + 1], target))
                ce_s.append(torch.nn.functional.cross_entropy(mtp.sampler_logits(z[at : at + 1], x[0, a + j : a + j + 1]),
                                                              target))
    assert losses["lcm"].item() == pytest.approx(torch.stack(lcm).mean().item(), rel=1e-4)
    assert losses["ce_mask"].item() == pytest.approx(torch.stack(ce).mean().item(), rel=1e-4)
    assert losses["ce_sampler"].item() == pytest.approx(torch.stack(ce_s).mean().item(), rel=1e-4)
    # the LCM target one position off either way is another number: the test tells them apart
    off = [((z[T + s * k + j - 1] - z[a + j + d]) ** 2).mean() for d in (-1, 1)
           for s, a in enumerate(range(T - 2)) for j in range(1, k + 1) if a + 1 + j < T]
    assert abs(torch.stack(off).mean().item() - losses["lcm"].item()) > 1e-3


def tiny_opt(vocab: int = 64, seed: int = 0):
    """OPT: learned positions, and feed-forward layers that flatten the batch to [B * N, d]."""
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64,
                                    word_embed_proj_dim=32)).eval()


def test_opt_is_supported():
    base = tiny_opt()
    mtp = perturb(GatedMTP(copy.deepcopy(base), MASKS, MTPConfig(k=4, rank=4)))
    ids = torch.cat([IDS, torch.tensor([MASKS] * 2)], dim=1)
    gate = torch.zeros(ids.shape)
    gate[:, IDS.shape[1]:] = 1
    with torch.no_grad():
        assert torch.equal(mtp(IDS).logits, base(input_ids=IDS).logits)  # closed gate: the base, bit for bit
        out = mtp(ids, gate=gate)
        assert torch.allclose(out.logits[:, : IDS.shape[1]], base(input_ids=IDS).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(out.logits[:, -4:], base(input_ids=ids).logits[:, -4:], atol=1e-3)
    tok = reasoning_tokenizer()
    model = tiny_opt(len(tok))
    mtp = perturb(attach(copy.deepcopy(model), tok, MTPConfig(k=3, rank=4)))
    losses = mtp_losses(mtp, torch.randint(11, len(tok), (2, 12)), anchors=4)
    losses["loss"].backward()  # trains through OPT's flattened layers
    for strategy in ("linear", "quadratic"):
        for prompt in ("Q: 12+34\n<think>", "hello"):
            assert mtp_decode(mtp, tok, prompt, 16, strategy=strategy).tokens == greedy_decode(model, tok, prompt, 16).tokens


def test_a_prompt_past_the_models_positions_is_refused_naming_the_limit():
    model, tok = reasoning_lm()
    mtp = attach(copy.deepcopy(model), tok, MTPConfig(k=3, rank=2))
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"has {limit}"):
        mtp_decode(mtp, tok, "Q: " + "1+" * limit + "1\n<think>", 8)
    with pytest.raises(ValueError, match="look-ahead"):  # the last block's k masks need positions too
        mtp_decode(mtp, tok, "hello", limit - 5 - 1)
    with pytest.raises(ValueError, match="shorter blocks"):
        train_mtp(mtp, torch.zeros(2, limit, dtype=torch.long), TrainConfig(steps=1, batch_size=1, seq_len=limit, lr=1e-3))


def test_the_experiment_runs_on_a_users_opt(smoke_lm, tmp_path):
    """issue 8, A.7: `run mtp-gated-lora --model OPT_DIR` used to stop on a gate shape mismatch."""
    from paperzoo.core.experiment import run_experiment

    model = tiny_opt(len(smoke_lm.tokenizer))
    model.config.max_position_embeddings = 64
    model.save_pretrained(tmp_path / "opt")
    smoke_lm.tokenizer.save_pretrained(tmp_path / "opt")
    record = run_experiment("mtp-gated-lora", "smoke", model=str(tmp_path / "opt"), out=tmp_path / "results")
    prose = record["metrics"]["domains"]["prose"]
    assert record["model"] == str(tmp_path / "opt") and prose["quadratic"]["identical_share"] == 1.0
