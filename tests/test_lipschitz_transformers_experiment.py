import numpy as np
import pytest
import torch

from paperzoo.architectures.lipschitz_transformers import (
    Constraint, LipschitzTransformer, LipschitzTransformerConfig, enforce)
from paperzoo.experiments.architectures.lipschitz_transformers import frontier_dominates, logit_ceiling, loss_spikes

torch.set_num_threads(1)


def test_logit_ceiling_bounds_and_nearly_meets_a_model_at_its_caps():
    """Q = K = the identity (at the cap) and a token repeated at norm sqrt(D): the first layer's logit at
    position 0 is s/d ||x_h||^2, which reaches the ceiling when x lies in one head's slice."""
    config = LipschitzTransformerConfig(vocab_size=5, seq_len=4, hidden_size=16, num_layers=2, num_heads=4,
                                        softmax_scale=2.0)
    torch.manual_seed(0)
    model = LipschitzTransformer(config)
    enforce(model, Constraint("normalize", w_max=1.0, power_iterations=200))
    worst = 0.0
    for _ in range(20):  # tokens of norm sqrt(D), the embedding's bound
        x = torch.randn(8, 4, 16)
        model.blocks(x / x.norm(dim=-1, keepdim=True) * 4.0)
        worst = max(worst, model.max_attention_logit())
    ceiling = logit_ceiling(config, 1.0)
    assert worst <= ceiling
    with torch.no_grad():
        model.attn[0].q.weight.copy_(torch.eye(16)); model.attn[0].k.weight.copy_(torch.eye(16))
    x = torch.zeros(1, 1, 16)
    x[0, 0, 0] = 4.0  # sqrt(D), all in head 0's slice
    model.blocks(x)
    assert model.attn[0].max_logit == pytest.approx(ceiling) and ceiling == pytest.approx(2.0 / 4 * 16)
    # with w_max = 3 the stream grows (b = 1/4, R0 = 4): after layer 0's attention 0.75*4 + 0.25*(9*2/3)*4 = 9,
    # after its MLP 0.75*9 + 0.25*9*9 = 27, so layer 1 sets the ceiling: 2/4 * 9 * 27^2
    assert logit_ceiling(config, 3.0) == pytest.approx(2.0 / 4 * 9 * 27**2)


def test_loss_spikes_are_relative_to_the_recent_median():
    losses = np.linspace(4.0, 2.0, 200)
    assert loss_spikes(losses) == []  # fast early descent is not a spike
    spiky = losses.copy()
    spiky[120] *= 1.5
    spiky[150] = np.nan
    assert loss_spikes(spiky) == [120, 150]
    spiky[120] = losses[120] * 1.2  # under the 30% margin
    assert loss_spikes(spiky) == [150]


def test_frontier_dominance_needs_every_point_covered():
    rng = np.random.default_rng(0)
    good, bad = (rng.random(400) < 0.6).astype(float), (rng.random(400) < 0.3).astype(float)
    same = good.copy()
    # higher accuracy at a lower bound covers; at equal bound with equal accuracy it does not
    assert frontier_dominates([(good, 2.0)], [(bad, 3.0)]) is True
    assert frontier_dominates([(good, 2.0)], [(bad, 3.0), (bad, 1.0)]) is None  # one AdamW point uncovered
    assert frontier_dominates([(same, 2.0)], [(good, 2.0)]) is None
    # a lower bound at no-lower accuracy covers
    assert frontier_dominates([(same, 1.0)], [(good, 2.0)]) is True
    # AdamW's low-bound point is a trade-off against Muon's (higher accuracy, higher bound): undecided
    assert frontier_dominates([(good, 5.0)], [(bad, 1.0)]) is None
    # an uncovered AdamW point that beats a Muon point: fails
    assert frontier_dominates([(bad, 5.0), (good, 50.0)], [(good, 4.0)]) is False
