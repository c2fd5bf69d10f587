import types

import numpy as np
import pytest
import torch

from paperzoo.experiments.phenomena.attention_intrinsic_dimension import (
    HiddenModularOperation, cell_correlation, checks, preconditions, spearman)
from paperzoo.phenomena.attention_intrinsic_dimension import (
    attention_counts, attention_intrinsic_dimension, linear_regions_along_line, minkowski_bound)
from tiny_models import tiny


def uniform_rows(supports, keys=10) -> torch.Tensor:
    """One token's attention per head, uniform over the first k keys of each head: [1 layer, 1, heads, 1, keys]."""
    A = torch.zeros(1, 1, len(supports), 1, keys)
    for h, k in enumerate(supports):
        A[0, 0, h, 0, :k] = 1.0 / k if k else 0.0
    return A


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_uniform_attention_over_k_tokens_counts_k_below_one_over_k_and_nothing_above(k):
    A = uniform_rows([k])
    for tau in (0.0, 0.5 / k, 0.99 / k):
        assert attention_counts(A, tau).item() == k
    for tau in (1.0 / k, 1.01 / k, 1.5 / k):
        assert attention_counts(A, tau).item() == 0


def test_minkowski_bound_sums_k_minus_one_over_heads_and_an_empty_head_adds_nothing():
    A = uniform_rows([3, 1, 5])
    A = torch.cat([A, torch.full((1, 1, 1, 1, 10), 0.1)], dim=2)  # a fourth head, uniform over 10 keys
    k = attention_counts(A, tau=0.15)  # the fourth head has no weight above 0.15
    assert k.flatten().tolist() == [3, 1, 5, 0]
    assert minkowski_bound(k).item() == 2 + 0 + 4 + 0
    assert minkowski_bound(attention_counts(A, tau=0.05)).item() == 2 + 0 + 4 + 9


def test_relative_threshold_is_a_fraction_of_the_row_maximum():
    A = torch.tensor([0.5, 0.3, 0.04, 0.16]).view(1, 1, 1, 1, 4)
    assert attention_counts(A, 0.2).item() == 2  # 0.5, 0.3
    assert attention_counts(A, 0.2, relative=True).item() == 3  # above 0.1: 0.5, 0.3, 0.16


def relu_net(first_w, first_b, second_w=None, second_b=None):
    w = torch.tensor(first_w, dtype=torch.float32).view(-1, 1)
    layers = [torch.nn.Linear(1, len(w)), torch.nn.ReLU()]
    with torch.no_grad():
        layers[0].weight.copy_(w)
        layers[0].bias.copy_(torch.tensor(first_b))
    if second_w is not None:
        second = torch.nn.Linear(len(w), len(second_w))
        with torch.no_grad():
            second.weight.copy_(torch.tensor(second_w))
            second.bias.copy_(torch.tensor(second_b))
        layers += [second, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(layers[-2].out_features, 1))


def test_linear_regions_of_a_one_layer_relu_net_with_known_breakpoints():
    net = relu_net([1.0, 1.0, -1.0], [-0.2, -0.5, 0.7])  # kinks at x = 0.2, 0.5, 0.7
    x = lambda v: torch.tensor([v])  # noqa: E731
    assert linear_regions_along_line(net, x(0.0), x(1.0)) == 4
    assert linear_regions_along_line(net, x(1.0), x(0.0)) == 4
    assert linear_regions_along_line(net, x(0.0), x(0.4)) == 2
    assert linear_regions_along_line(net, x(0.8), x(0.9)) == 1


def test_linear_regions_of_a_two_layer_relu_net_with_known_breakpoints():
    # layer 1: h1 = relu(x - 0.5), h2 = relu(0.3 - x); layer 2: relu(h1 - 0.2) kinks at x = 0.7, relu(h2 - 0.1) at x = 0.2.
    # Between 0.3 and 0.5 both h are 0, so layer 2 is flat there (no crossing from it).
    net = relu_net([1.0, -1.0], [-0.5, 0.3], [[1.0, 0.0], [0.0, 1.0]], [-0.2, -0.1])
    assert linear_regions_along_line(net, torch.tensor([0.0]), torch.tensor([1.0])) == 5  # 0.2, 0.3, 0.5, 0.7


def grid_regions(net, x0, x1, n=200_001) -> int:
    """Independent count: distinct consecutive activation patterns on a fine grid of the segment."""
    patterns = []
    hooks = [m.register_forward_hook(lambda m, i, o: patterns.append(o > 0)) for m in net if isinstance(m, torch.nn.ReLU)]
    t = torch.linspace(0, 1, n, dtype=torch.float64)[:, None]
    with torch.no_grad():
        net.double()(x0.double() + t * (x1 - x0).double())
    for h in hooks:
        h.remove()
    pattern = torch.cat(patterns, dim=1)
    return 1 + int((pattern[1:] != pattern[:-1]).any(dim=1).sum())


def test_linear_regions_of_a_deep_random_net_match_a_fine_grid():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 1))
    x0, x1 = torch.randn(6), torch.randn(6)
    exact = linear_regions_along_line(net, x0, x1)
    assert exact > 10 and exact == grid_regions(net, x0, x1)


def test_linear_regions_refuse_a_net_without_relu():
    with pytest.raises(ValueError, match="nn.ReLU"):
        linear_regions_along_line(torch.nn.Linear(2, 2), torch.zeros(2), torch.ones(2))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_on_a_tiny_hf_model_every_causal_row_counts_its_prefix_at_tau_zero(arch):
    model = tiny(arch)
    assert model.config._attn_implementation == "sdpa"  # returns no weights as loaded: the method must switch
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    r = attention_intrinsic_dimension(model, ids, tau=0.0)
    L, H = model.config.num_hidden_layers, 4
    assert r.k.shape == (L, 2, H, 9) and r.bound.shape == (L, 2, 9)
    # causal softmax: token i puts positive weight on exactly its i + 1 prefix tokens in every head
    assert torch.equal(r.k, torch.arange(1, 10).expand(L, 2, H, 9))
    assert torch.equal(r.bound, (H * torch.arange(9)).expand(L, 2, 9))
    assert model.config._attn_implementation == "sdpa"  # switched back
    # a positive tau counts exactly the eager weights above it
    model.set_attn_implementation("eager")
    attentions = model(input_ids=ids, output_attentions=True).attentions
    counts = torch.stack([(a > 0.2).sum(-1) for a in attentions])
    assert torch.equal(attention_intrinsic_dimension(model, {"input_ids": ids}, tau=0.2).k, counts)


def test_a_model_that_cannot_return_attention_weights_gets_a_one_line_error():
    class NoEager(torch.nn.Module):
        config = types.SimpleNamespace(_attn_implementation="flash")

        def set_attn_implementation(self, name):
            raise ValueError("eager is not supported")

    class NoWeights(torch.nn.Module):
        config = types.SimpleNamespace(_attn_implementation="eager")

        def forward(self, input_ids, output_attentions=False):
            return types.SimpleNamespace(attentions=())

    for model in (NoEager(), NoWeights()):
        with pytest.raises(ValueError, match="attention weights") as error:
            attention_intrinsic_dimension(model, torch.zeros(1, 3, dtype=torch.long), tau=0.1)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="tau"):
        attention_intrinsic_dimension(tiny("llama"), torch.zeros(1, 3, dtype=torch.long), tau=1.0)


def test_task_answers_are_the_hidden_operation_of_each_sequence():
    task = HiddenModularOperation(p=7, K=5)
    batch = task.sample(200, seed=3)
    t = batch.tokens
    assert t.shape == (200, 11) and (t[:, 0] == 56).all() and task.vocab_size == 57
    assert batch.scored.nonzero()[:, 1].unique().tolist() == [2, 4, 6, 8, 10]
    pair, c = t[:, 1::2] - 7, t[:, 2::2]
    assert (pair >= 0).all() and (pair < 49).all() and (c < 7).all()
    a, b = pair // 7, pair % 7
    ops = [(a + b) % 7, (a - b) % 7, (a * b) % 7]
    consistent = torch.stack([(c == o).all(dim=1) for o in ops])  # every example of a row follows one operation
    assert consistent.any(dim=0).all() and consistent.sum(dim=1).min() > 30
    assert task.query_positions == [1, 3, 5, 7, 9]


def test_spearman_and_its_bootstrap_by_hand():
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(np.array([1, 1, 1]), np.array([1, 2, 3])) == 0.0
    rng = np.random.default_rng(0)
    level = np.arange(6)[:, None]
    ids = level + rng.normal(0, 0.3, (6, 200))
    right = (rng.random((6, 200)) < 0.1 + 0.15 * level).astype(float)
    assert cell_correlation(ids, right).low > 0
    assert cell_correlation(ids, right[::-1]).high < 0


def metrics(id_gain=1.0, accuracy_gain=0.1, n=300, seed=0):
    """Hand-made records: 2 head counts x 3 example counts; ID and accuracy rise with both when the gains are > 0."""
    rng = np.random.default_rng(seed)
    models = {}
    for h, H in enumerate([1, 8]):
        models[str(H)] = {
            "id_last": [(h + j) * id_gain + rng.normal(0, 0.5, n) for j in range(3)],
            "right": [(rng.random(n) < 0.3 + accuracy_gain * (h + j)).astype(int) for j in range(3)],
        }
    return {"heads": [1, 8], "models": models, "chance": 0.2, "bootstrap_seed": 0}


def test_checks_and_preconditions_by_hand():
    m = metrics()
    assert list(preconditions(m).values()) == [True, True]
    assert list(checks(m).values()) == [True, True, True]
    flat = metrics(id_gain=0.0)
    assert list(checks(flat).values())[:2] == [None, None]
    reversed_accuracy = metrics(accuracy_gain=-0.1)
    assert list(checks(reversed_accuracy).values())[2] is False
    assert list(preconditions(reversed_accuracy).values())[1] is False
    chance = metrics(accuracy_gain=0.0)
    chance["chance"] = 0.5
    assert list(preconditions(chance).values()) == [False, False]
