
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from paperzoo.compression.layer_pruning import (
    angular_distance, angular_distances, block_distances, deepest_block, drop_layers, heal,
    most_redundant_block, prune, residual_stream_at_last_token)
from paperzoo.core.models import decoder_layers
from paperzoo.core.training import TrainConfig
from tiny_models import ARCHS, tiny

IDS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))


def test_angular_distance_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert angular_distance(e1, e1).item() == pytest.approx(0.0, abs=1e-7)
    assert angular_distance(e1, e2).item() == pytest.approx(0.5)
    assert angular_distance(e1, torch.tensor([1.0, 1.0])).item() == pytest.approx(0.25)
    assert angular_distance(e1, -3 * e1).item() == pytest.approx(1.0)
    # scale invariant
    assert angular_distance(2 * e1, torch.tensor([5.0, 5.0])).item() == pytest.approx(0.25)


def test_all_pairs_match_hidden_states_from_separate_passes():
    model = tiny("llama")
    D = angular_distances(model, [IDS[:2], IDS[2:]])
    # HF's hidden_states[i] is the input of layer i for i < L (the last entry is after the final norm).
    hs = model(input_ids=IDS, output_hidden_states=True).hidden_states
    L = model.config.num_hidden_layers
    for n in range(1, L):
        for l in range(0, L - n):
            expected = angular_distance(hs[l][:, -1], hs[l + n][:, -1]).mean()
            assert D[l, l + n].item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(D, D.T) and torch.all(D.diagonal() < 1e-6)


def test_last_token_respects_right_padding():
    model = tiny("llama")
    mask = torch.ones_like(IDS)
    mask[0, 8:] = 0
    x = residual_stream_at_last_token(model, IDS, mask)
    alone = residual_stream_at_last_token(model, IDS[:1, :8])
    assert torch.allclose(x[:, 0], alone[:, 0], atol=1e-5)


def _make_identity(layer):
    """Zero the two writes into the residual stream: the block becomes the identity map."""
    for name, p in layer.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.zeros_(p)


def test_planted_identity_block_is_found():
    model = tiny("llama")
    for i in (2, 3, 4):
        _make_identity(model.model.layers[i])
    D = angular_distances(model, [IDS])
    assert D[2, 5].item() == pytest.approx(0.0, abs=1e-6)
    assert most_redundant_block(D, 3) == 2
    result = prune(model, [IDS], 3)
    assert result.report["removed_layers"] == [2, 3, 4]
    assert torch.allclose(result.model(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5)


def test_block_distances_and_deepest_block():
    D = torch.arange(49, dtype=torch.float64).view(7, 7)
    assert block_distances(D, 2).tolist() == [D[l, l + 2].item() for l in range(5)]
    assert deepest_block(12, 3) == 8  # removes 8, 9, 10 and keeps layer 11, the last


@pytest.mark.parametrize("arch", ARCHS)
def test_drop_zero_layers_leaves_logits_unchanged(arch):
    model = tiny(arch)
    assert torch.equal(drop_layers(model, 0, 0)(input_ids=IDS).logits, model(input_ids=IDS).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropping_equals_skipping_those_layers(arch, tmp_path):
    model = tiny(arch)
    _, layers = decoder_layers(model)
    skip = {2, 3}
    hooks = [layers[i].register_forward_hook(
        lambda mod, args, out, _i=i: (args[0],) + tuple(out[1:]) if isinstance(out, tuple) else args[0]) for i in skip]
    expected = model(input_ids=IDS).logits
    for h in hooks:
        h.remove()
    pruned = drop_layers(model, 2, 2)
    assert len(decoder_layers(pruned)[1]) == 4 and pruned.config.num_hidden_layers == 4
    assert len(decoder_layers(model)[1]) == 6, "the original model must be left intact"
    got = pruned(input_ids=IDS).logits
    assert torch.allclose(got, expected, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 4
    assert torch.equal(reloaded(input_ids=IDS).logits, got)
    # KV caching must address the renumbered layers: cached and uncached greedy decoding agree.
    a = reloaded.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True)
    b = reloaded.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_drop_layers_rejects_out_of_range():
    with pytest.raises(ValueError):
        drop_layers(tiny("llama"), 4, 3)


@pytest.mark.parametrize("arch, expected", [
    ("llama", {"gate_proj", "up_proj", "down_proj"}), ("gpt2", {"c_fc", "c_proj"})])
def test_healing_targets_only_feed_forward_layers(arch, expected):
    from paperzoo.compression.layer_pruning import feed_forward_modules

    names = feed_forward_modules(tiny(arch))
    assert {n.rsplit(".", 1)[1] for n in names} == expected
    assert len(names) == 6 * len(expected) and not any("attn" in n for n in names)


def test_heal_lowers_training_loss_and_returns_a_plain_model():
    model = drop_layers(tiny("llama"), 1, 3)
    data = torch.randint(0, 8, (16, 12), generator=torch.Generator().manual_seed(0))  # an easy 8-token language
    before = model(input_ids=data, labels=data).loss.item()
    healed = heal(model, data, TrainConfig(steps=30, batch_size=8, seq_len=12, lr=1e-2), rank=4)
    assert type(healed) is type(model)
    attention = [n for n, _ in model.named_parameters() if "self_attn" in n]
    assert all(torch.equal(model.get_parameter(n), healed.get_parameter(n)) for n in attention)
    assert not any("lora" in n for n, _ in healed.named_parameters())
    # a random 32-d head caps how far logits can move; the drop from ~4.16 is still clear
    assert healed(input_ids=data, labels=data).loss.item() < before - 0.1


def tiny_opt(layers: int = 6):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=layers,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_prune_takes_a_tokenizers_batch_encoding(arch):
    from transformers import BatchEncoding

    model = tiny_opt() if arch == "opt" else tiny(arch)
    mask = torch.ones_like(IDS)
    mask[1, 9:] = 0
    batch = BatchEncoding({"input_ids": IDS, "attention_mask": mask})
    assert torch.equal(angular_distances(model, [batch]), angular_distances(model, [{"input_ids": IDS, "attention_mask": mask}]))
    result = prune(model, [batch], n=2)
    assert len(decoder_layers(result.model)[1]) == 4 and result.report["layers_after"] == 4
    with pytest.raises(ValueError, match="iterable of batches"):
        prune(model, batch, n=2)  # one batch, not a list of batches


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_prune_checks_n_before_any_work(arch):
    model = tiny_opt() if arch == "opt" else tiny(arch)
    for n in (0, -1, 6, 7, 1.5, "2", True, None):
        with pytest.raises(ValueError, match=r"n \(layers to remove\) must be an integer from 1 to 5 .*got"):
            prune(model, [IDS], n=n)
    assert prune(model, [IDS], n=5).report["layers_after"] == 1
    assert prune(model, [IDS], n=__import__("numpy").int64(1)).report["layers_after"] == 5
    with pytest.raises(ValueError):
        deepest_block(6, 6)
    with pytest.raises(ValueError):
        drop_layers(model, 0, 6)  # every layer


def test_a_one_layer_model_and_a_too_small_vocabulary_are_refused_clearly():
    with pytest.raises(ValueError, match="at least 2 decoder layers; this one has 1"):
        prune(tiny_opt(layers=1), [IDS], n=1)
    with pytest.raises(ValueError, match="token id 64.*vocabulary is larger than the model's"):
        prune(tiny("gpt2"), [torch.full((2, 5), 64)], n=1)


def test_opt_is_healed_on_its_feed_forward_layers():
    from paperzoo.compression.layer_pruning import feed_forward_modules

    model = tiny_opt()
    names = feed_forward_modules(model)
    assert {n.rsplit(".", 1)[1] for n in names} == {"fc1", "fc2"} and len(names) == 12
    pruned = drop_layers(model, 2, 3)
    healed = heal(pruned, IDS, TrainConfig(steps=2, batch_size=2, seq_len=12, lr=1e-3), rank=2)
    assert type(healed) is type(model) and len(decoder_layers(healed)[1]) == 3
    a = healed.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    b = healed.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_experiment_runs_on_opt_and_refuses_what_it_cannot_prune(smoke_lm, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    from paperzoo.core.experiment import ExperimentError, run_experiment

    V = len(smoke_lm.tokenizer)
    opt = OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=4, num_attention_heads=4,
                                   max_position_embeddings=128, word_embed_proj_dim=32))
    record = run_experiment("layer-pruning", "smoke", model=_save(opt, smoke_lm.tokenizer, tmp_path / "opt"),
                            out=tmp_path / "results")
    assert record["metrics"]["num_layers"] == 4 and set(record["checks"].values()) <= {True, False, None}
    one = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=128))
    with pytest.raises(ExperimentError, match="at least 3 decoder layers.*has 1"):
        run_experiment("layer-pruning", "smoke", model=_save(one, smoke_lm.tokenizer, tmp_path / "one"), out=tmp_path)
    small_vocab = GPT2LMHeadModel(GPT2Config(vocab_size=V // 4, n_embd=16, n_layer=4, n_head=2, n_positions=128))
    # refused when the model is loaded (core.models) or, failing that, before the experiment's work
    with pytest.raises(ValueError, match=r"vocabulary is smaller than the tokenizer's|embeds \d+ tokens but its tokenizer"):
        run_experiment("layer-pruning", "smoke", model=_save(small_vocab, smoke_lm.tokenizer, tmp_path / "v"),
                       out=tmp_path)


def test_sharpness_by_hand():
    from paperzoo.experiments.compression.layer_pruning import sharpness

    straight = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])  # n = 0..3, two sequences
    S, items = sharpness([0, 1, 2, 3], straight)
    assert S == pytest.approx(1.0) and np.allclose(items, 0.0)
    jump = np.array([[1.0], [1.0], [1.0], [4.0]])  # the whole rise in the last step: S = number of steps
    S, items = sharpness([0, 1, 2, 3], jump)
    assert S == pytest.approx(3.0) and items.mean() == pytest.approx((S - 1) / 3)
    uneven = np.array([[1.0], [2.0], [7.0]])  # n = 0, 1, 6: slopes 1 and 1, a straight line
    assert sharpness([0, 1, 6], uneven)[0] == pytest.approx(1.0)
    assert sharpness([0, 1, 2], np.array([[2.0], [1.5], [1.0]]))[0] == 1.0  # falling: nothing sharp


def _rows(n_values, angular, deepest, randoms, healed_angular, healed_deepest, deepest_start=None):
    """Experiment rows whose every sequence has the given loss (+ a little per-sequence noise)."""
    rng = np.random.default_rng(0)

    def seq(x):
        return list(x + 0.01 * rng.standard_normal(30))

    rows = []
    for i, n in enumerate(n_values):
        rows.append({"n": n, "method": "angular", "start": 1, "pruned_sequence_loss": seq(angular[i]),
                     "healed_sequence_loss": seq(healed_angular[i])})
        rows.append({"n": n, "method": "deepest", "start": 1 if deepest_start is None else deepest_start,
                     "pruned_sequence_loss": seq(deepest[i]), "healed_sequence_loss": seq(healed_deepest[i])})
        rows += [{"n": n, "method": "random", "start": 0, "pruned_sequence_loss": seq(r)} for r in randoms[i]]
    return rows


def _metrics(**kw):
    rng = np.random.default_rng(1)
    defaults = dict(n_values=[1, 2, 3], angular=[3.1, 3.2, 6.0], deepest=[3.5, 3.8, 6.5], randoms=[[3.6], [4.0], [6.2]],
                    healed_angular=[3.05, 3.1, 3.15], healed_deepest=[3.1, 3.15, 3.2], deepest_start=4)
    defaults.update(kw)
    return {"blocks": _rows(**defaults), "unpruned_sequence_loss": list(3.0 + 0.01 * rng.standard_normal(30)),
            "unpruned_healed_sequence_loss": list(3.0 + 0.01 * rng.standard_normal(30)), "uniform_loss": 6.9}


def test_predicate_and_preconditions_by_hand():
    from paperzoo.experiments.compression.layer_pruning import checks, preconditions

    m = _metrics()  # the paper's world: a jump without healing, a gentle slope with it; healing closes the gap
    assert all(preconditions(m).values()) and list(checks(m).values()) == [True, True, True]
    # random blocks better than the angular one; a straight unhealed line against a healed jump; healing
    # leaves the deepest heuristic's gap as it was
    m = _metrics(randoms=[[3.0], [3.1], [5.0]], angular=[4.0, 5.0, 6.0], healed_angular=[3.05, 3.1, 4.5],
                 deepest=[4.5, 5.5, 6.5], healed_deepest=[3.55, 3.6, 5.0])
    assert list(checks(m).values()) == [False, False, False]
    # differences within noise are undecided, not failed: random = angular, two straight lines
    m = _metrics(randoms=[[4.0], [5.0], [6.0]], angular=[4.0, 5.0, 6.0], healed_angular=[3.5, 4.0, 4.5])
    assert list(checks(m).values())[:2] == [None, None]
    # the same blocks at every n: the heuristic is as good by construction
    assert list(checks(_metrics(deepest_start=None, deepest=[3.1, 3.2, 6.0],
                                healed_deepest=[3.05, 3.1, 3.15])).values())[2] is True
    # healing that does not lower the loss, and a recipe that hurts the unpruned model
    m = _metrics(healed_angular=[3.1, 3.2, 6.0])
    assert list(preconditions(m).values())[2] is False
    m = _metrics()
    m["unpruned_healed_sequence_loss"] = [x + 0.5 for x in m["unpruned_sequence_loss"]]
    assert list(preconditions(m).values())[3] is False
