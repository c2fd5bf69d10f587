"""The base LM's card: round-to-nearest sensitivity, outliers per layer, throughput, the perplexity target."""

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paperzoo.core import base_card
from paperzoo.core.evaluation import evaluate


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def _blocks(n: int = 6, T: int = 24) -> torch.Tensor:
    return torch.randint(0, 96, (n, T), generator=torch.Generator().manual_seed(1))


def test_outliers_find_a_planted_weight_and_the_activations_it_causes():
    model = _tiny()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[5, 7] = 40.0
        model.model.layers[1].mlp.up_proj.weight.mul_(200.0)
    rows = base_card.outliers(model, _blocks())
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    ratios = [r["weight_max_over_rms"] for r in rows]
    assert max(range(4), key=ratios.__getitem__) == 2 and ratios[2] > 5 * ratios[0]
    down = [r["down_proj_input_max"] for r in rows]
    assert max(range(4), key=down.__getitem__) == 1  # the scaled up-projection feeds layer 1's down-projection
    act = [r["activation_max"] for r in rows]
    assert act[1] > 5 * act[0]  # the residual stream carries the large MLP output from layer 1 on
    assert act[3] > 5 * act[0]  # the last block's output is read before the final norm


def _trained():
    """A tiny model that has learned to count (mod 96), so rounding its weights has something to break."""
    from paperzoo.core.training import TrainConfig, train

    start = torch.randint(0, 96, (64, 1), generator=torch.Generator().manual_seed(2))
    blocks = (start + torch.arange(24)) % 96
    model = _tiny()
    train(model, blocks, TrainConfig(steps=40, batch_size=16, seq_len=24, lr=3e-3), desc="counting")
    return model, blocks[:8]


def test_rtn_perplexity_is_the_model_at_high_precision_and_worse_at_two_bits():
    model, blocks = _trained()
    full = evaluate(model, blocks)["perplexity"]
    ppl = base_card.rtn_perplexities(model, blocks, bits=(2, 4, 16))
    assert math.isclose(ppl["16-bit"], full, rel_tol=1e-3)
    assert full < 10 and ppl["2-bit"] > 1.05 * ppl["4-bit"] and math.isclose(ppl["4-bit"], full, rel_tol=0.02)
    assert base_card.rtn_perplexities(model, blocks, bits=(4,), group_size=48) == {"4-bit": None}  # 48 does not divide 64


def test_flops_per_token_follow_palm():
    model = _tiny()
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - c.vocab_size * c.hidden_size
    assert base_card.flops_per_token(model, 24) == 6 * n + 12 * c.num_hidden_layers * c.hidden_size * 24


def test_the_perplexity_target_applies_to_small_only():
    assert base_card.judge("small", 109.9)["validation perplexity"]["pass"]
    assert not base_card.judge("small", 110.1)["validation perplexity"]["pass"]
    assert base_card.judge("smoke", 500.0) == {}


def test_card_records_curve_throughput_and_rtn(monkeypatch):
    model, blocks = _tiny(), _blocks()
    history = {"val": [{"step": 5, "perplexity": 90.0}, {"step": 10, "perplexity": 80.0}], "tokens_per_second": 1000.0}
    card = base_card.card(model, blocks, history, "small", peak=1e12)
    assert card["validation_curve"] == [{"step": 5, "perplexity": 90.0}, {"step": 10, "perplexity": 80.0}]
    assert card["mfu"] == round(1000.0 * base_card.flops_per_token(model, 24) / 1e12, 3)
    assert set(card["rtn_perplexity"]) == {"2-bit", "3-bit", "4-bit"} and len(card["outliers"]) == 4
    assert card["targets"]["validation perplexity"]["pass"]
    assert base_card.card(model, blocks, history, "small", peak=None)["mfu"] is None
