
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
