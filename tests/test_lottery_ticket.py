import copy

import pytest
import torch
from torch import nn

from paperzoo.compression import parameter_bits
from paperzoo.compression.lottery_ticket import (
    apply_mask,
    current_mask,
    dense_state,
    early_stop_iteration,
    find_winning_ticket,
    magnitude_prune,
    prunable_layers,
    prune,
    pruning_rates,
    random_reinit,
    remaining_fraction,
    rewind,
)
from paperzoo.experiments.compression.lottery_ticket import (
    batch_schedule,
    checks,
    digits_splits,
    glorot_normal,
    lenet,
    make_train_fn,
    preconditions,
)

X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 15), nn.ReLU(), nn.Linear(15, 3))


def effective(module: nn.Module) -> torch.Tensor:
    """The weight the forward pass uses (weight_orig * weight_mask for a masked layer)."""
    return module.weight_orig * module.weight_mask if hasattr(module, "weight_mask") else module.weight


def sgd_train_fn(calls: list | None = None, steps: int = 10):
    """Deterministic full-batch SGD with iterations 1..steps; records (start, stop) of each call."""
    def train_fn(model, start=0, stop=None):
        if calls is not None:
            calls.append((start, stop))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(start, steps if stop is None else stop):
            loss = nn.functional.cross_entropy(model(X), Y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {"loss": loss.item()}
    return train_fn


def reference_prune(mask: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """Sort the surviving |w| and drop the round(p * surviving) smallest: the paper's rule, written out."""
    surviving = mask.flatten().nonzero().squeeze(1)
    order = weight.abs().flatten()[surviving].argsort()
    out = mask.flatten().clone()
    out[surviving[order[: round(p * len(surviving))]]] = False
    return out.view_as(mask)


def test_magnitude_prune_removes_exactly_the_smallest_fraction_of_surviving_weights():
    model = mlp()
    rates = pruning_rates(model, 0.2)
    assert rates == {"0": 0.2, "2": 0.2, "4": 0.1}  # the output layer at half the rate
    expected = {name: reference_prune(torch.ones_like(model.get_submodule(name).weight, dtype=torch.bool),
                                      model.get_submodule(name).weight, p) for name, p in rates.items()}
    mask = magnitude_prune(model, rates)
    for name, p in rates.items():
        n = model.get_submodule(name).weight.numel()
        assert int(mask[name].sum()) == n - round(p * n)
        assert torch.equal(mask[name], expected[name])
        kept, pruned = effective(model.get_submodule(name)).abs()[mask[name]], model.get_submodule(name).weight_orig.abs()[~mask[name]]
        assert kept.min() > pruned.max()
    # Second round on "trained" values: only surviving weights compete, pruned ones stay pruned.
    with torch.no_grad():
        for name in rates:
            model.get_submodule(name).weight_orig.normal_()
    expected = {name: reference_prune(mask[name], model.get_submodule(name).weight_orig, p) for name, p in rates.items()}
    second = magnitude_prune(model, rates)
    for name, p in rates.items():
        assert torch.equal(second[name], expected[name])
        assert not (second[name] & ~mask[name]).any()
        assert int(second[name].sum()) == int(mask[name].sum()) - round(p * int(mask[name].sum()))


def test_pruning_rates_and_prunable_layers():
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    assert prunable_layers(conv) == ["0", "2"]
    assert pruning_rates(conv, 0.2, 0.05) == {"0": 0.2, "2": 0.05}
    mask = magnitude_prune(conv, pruning_rates(conv, 0.5))
    assert int(mask["0"].sum()) == 36 - 18 and int(mask["2"].sum()) == 1440 - 360
    with pytest.raises(ValueError, match="rate"):
        pruning_rates(mlp(), 1.0)
    with pytest.raises(ValueError, match="output_rate"):
        pruning_rates(mlp(), 0.2, -0.1)
    with pytest.raises(ValueError, match="not Linear or Conv"):
        pruning_rates(mlp(), 0.2, layers=["1"])
    with pytest.raises(ValueError, match="no Linear or Conv"):
        pruning_rates(nn.Sequential(nn.ReLU()))


def test_pruned_weights_stay_zero_and_get_no_gradient_through_training():
    model = mlp()
    g = torch.Generator().manual_seed(3)
    mask = {name: torch.rand(model.get_submodule(name).weight.shape, generator=g) < 0.5 for name in prunable_layers(model)}
    apply_mask(model, mask)
    before = {name: effective(model.get_submodule(name)).detach().clone() for name in mask}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(X), Y)
        optimizer.zero_grad()
        loss.backward()
        for name, m in mask.items():
            assert torch.all(model.get_submodule(name).weight_orig.grad[~m] == 0)
        optimizer.step()
    with torch.no_grad():
        model(X)  # the forward pre-hook recomputes `weight`
    for name, m in mask.items():
        w = model.get_submodule(name).weight
        assert torch.all(w[~m] == 0) and torch.equal(w, effective(model.get_submodule(name)))
        assert not torch.allclose(w[m], before[name][m])  # the kept weights did train
    # the masked network computes exactly the dense network with weights w * m
    dense = copy.deepcopy(model)
    for name in mask:
        module = dense.get_submodule(name)
        w = module.weight.detach().clone()
        nn.utils.prune.remove(module, "weight")
        assert torch.equal(module.weight, w)
    assert torch.equal(dense(X), model(X))


def test_apply_mask_replaces_a_mask_rather_than_combining_and_checks_shapes():
    model = mlp()
    first = {"0": torch.rand(20, 6) < 0.5}
    second = {"0": ~first["0"]}
    apply_mask(model, first)
    apply_mask(model, second)
    assert torch.equal(current_mask(model, ["0"])["0"], second["0"])
    with pytest.raises(ValueError, match="shape"):
        apply_mask(model, {"2": torch.ones(3, 3, dtype=torch.bool)})


def test_imp_rewinds_to_theta0_at_unpruned_positions_and_prunes_by_trained_magnitude():
    model = mlp()
    theta0 = dense_state(model)
    calls = []
    ticket = find_winning_ticket(model, sgd_train_fn(calls), rounds=2, rate=0.2)
    assert calls == [(0, None), (0, None)]
    assert all(torch.equal(v, theta0[k]) for k, v in dense_state(model).items())  # the caller's model is untouched
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    # round 0 pruned the *trained* dense weights: repeat that training and prune by hand
    trained = copy.deepcopy(model)
    sgd_train_fn()(trained)
    rates = pruning_rates(model, 0.2)
    for name, p in rates.items():
        full = torch.ones_like(trained.get_submodule(name).weight, dtype=torch.bool)
        assert torch.equal(ticket.history[1]["mask"][name], reference_prune(full, trained.get_submodule(name).weight, p))
    assert next(h["remaining"] for h in ticket.history) == 1.0
    assert ticket.history[1]["remaining"] == pytest.approx(remaining_fraction(ticket.history[1]["mask"]))
    net = ticket.network(model)
    for name, m in ticket.mask.items():
        n = m.numel()
        after_one = n - round(rates[name] * n)
        assert int(m.sum()) == after_one - round(rates[name] * after_one)
        w = effective(net.get_submodule(name))
        assert torch.equal(w[m], theta0[f"{name}.weight"][m]) and torch.all(w[~m] == 0)
        assert torch.equal(net.get_submodule(name).bias, theta0[f"{name}.bias"])
    assert ticket.remaining < ticket.history[1]["remaining"] < 1.0


def test_every_round_starts_from_theta0_under_the_current_mask():
    """Each IMP round trains f(x; m_r ⊙ θ_0): the rewind happens every round, to θ_0 itself, not a fresh draw."""
    model = mlp()
    theta0 = dense_state(model)
    entries = []
    train = sgd_train_fn()

    def spy(net, start=0, stop=None):  # the weights each round starts from, before it trains
        entries.append({name: (effective(net.get_submodule(name)).detach().clone(),
                               net.get_submodule(name).bias.detach().clone()) for name in prunable_layers(net)})
        return train(net, start, stop)

    ticket = find_winning_ticket(model, spy, rounds=3, rate=0.3)
    assert len(entries) == 3
    for r, entry in enumerate(entries):
        mask = ticket.history[r]["mask"]
        for name, (w, b) in entry.items():
            assert torch.equal(w, theta0[f"{name}.weight"] * mask[name]), f"round {r}, layer {name}: not m ⊙ θ_0"
            assert torch.equal(b, theta0[f"{name}.bias"]), f"round {r}, layer {name}: bias not rewound"
    # the masks themselves follow from rewound training: redo round 1 by hand from m_1 ⊙ θ_0
    by_hand = apply_mask(copy.deepcopy(model), ticket.history[1]["mask"])
    sgd_train_fn()(by_hand)
    rates = pruning_rates(model, 0.3)
    expected = magnitude_prune(by_hand, rates)
    assert all(torch.equal(ticket.history[2]["mask"][k], expected[k]) for k in rates)


def test_late_rewinding_resets_to_the_dense_weights_at_iteration_k():
    model = mlp()
    calls = []
    ticket = find_winning_ticket(model, sgd_train_fn(calls), rounds=2, rate=0.3, rewind_to=3)
    assert calls == [(0, 3), (0, None), (3, None)]  # probe to k, dense round, pruned round from k
    theta_k = copy.deepcopy(model)
    sgd_train_fn(steps=3)(theta_k)
    expected = dense_state(theta_k)
    assert all(torch.equal(v, expected[k]) for k, v in ticket.init_state.items())
    net = ticket.network(model)
    w, m = effective(net.get_submodule("2")), ticket.mask["2"]
    assert torch.equal(w[m], expected["2.weight"][m])
    assert not torch.allclose(w[m], model.get_submodule("2").weight[m])


def test_random_reinit_keeps_the_mask_and_draws_new_values_from_the_initial_distribution():
    model = lenet([300, 100], seed=0)
    mask = magnitude_prune(copy.deepcopy(model), pruning_rates(model, 0.6))
    a = random_reinit(model, mask, glorot_normal, seed=1)
    assert all(torch.equal(current_mask(a)[k], mask[k]) for k in mask)
    for name, m in mask.items():
        w, w0 = effective(a.get_submodule(name)), model.get_submodule(name).weight
        assert torch.all(w[~m] == 0)
        assert (w[m] != w0[m]).float().mean() > 0.99
        fan_out, fan_in = w0.shape
        assert a.get_submodule(name).weight_orig.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.1)
    b = random_reinit(model, mask, glorot_normal, seed=1)
    c = random_reinit(model, mask, glorot_normal, seed=2)
    assert torch.equal(effective(a[0]), effective(b[0])) and not torch.equal(effective(a[0]), effective(c[0]))
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    # a masked input (a ticket) works too, and the default initialiser is each module's reset_parameters
    ticket_net = apply_mask(copy.deepcopy(model), mask)
    d = random_reinit(ticket_net, mask, seed=1)
    assert torch.equal(current_mask(d)["0"], mask["0"]) and not torch.equal(effective(d[0]), effective(ticket_net[0]))


def test_find_winning_ticket_rejects_bad_input():
    with pytest.raises(ValueError, match="rounds"):
        find_winning_ticket(mlp(), sgd_train_fn(), rounds=-1)
    with pytest.raises(ValueError, match="rewind_to"):
        find_winning_ticket(mlp(), sgd_train_fn(), rounds=1, rewind_to=-2)
    masked = apply_mask(mlp(), {"0": torch.ones(20, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match="already carries"):
        find_winning_ticket(masked, sgd_train_fn(), rounds=1)
    for bad in (1.5, True, "2"):
        with pytest.raises(ValueError, match="rounds must be an integer >= 0"):
            find_winning_ticket(mlp(), sgd_train_fn(), rounds=bad)
    with pytest.raises(ValueError, match=r"rate must be a fraction in \[0, 1\)"):
        find_winning_ticket(mlp(), sgd_train_fn(), rounds=1, rate=1.2)
    with pytest.raises(ValueError, match="train_fn"):
        find_winning_ticket(mlp(), None, rounds=1)
    with pytest.raises(ValueError, match="rates"):
        magnitude_prune(mlp(), {"0": -0.1})
    with pytest.raises(ValueError, match="not a Linear or Conv"):
        magnitude_prune(mlp(), {"1": 0.2})
    with pytest.raises(ValueError, match="mask"):
        random_reinit(mlp(), {"0": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="seed"):
        random_reinit(mlp(), {}, seed=-1)
    with pytest.raises(ValueError, match="mask"):
        remaining_fraction({})


def test_rewind_writes_through_masks():
    model = mlp()
    state = dense_state(model)
    apply_mask(model, current_mask(model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    rewind(model, state)
    assert all(torch.equal(v, state[k]) for k, v in dense_state(model).items())


def test_prune_returns_a_plain_compressed_model_and_counts_nonzeros():
    model = mlp()
    out = prune(model, sgd_train_fn(), rounds=3, rate=0.5)
    assert not any(hasattr(m, "weight_mask") for m in out.model.modules())
    kept = 0
    for name in prunable_layers(model):
        n = model.get_submodule(name).weight.numel()
        p = 0.5 if name != "4" else 0.25
        for _ in range(3):
            n -= round(p * n)
        assert int((out.model.get_submodule(name).weight != 0).sum()) == n
        kept += n
    total_weights = sum(model.get_submodule(name).weight.numel() for name in prunable_layers(model))
    biases = 20 + 15 + 3
    assert out.report["weights_remaining"] == pytest.approx(kept / total_weights)
    assert out.report["nonzero_parameters"] == kept + biases
    assert out.report["size_ratio"] == pytest.approx((kept + biases) * 32 / parameter_bits(model))
    assert out.report["sparsity"] == pytest.approx(1 - (kept + biases) / (total_weights + biases))


def test_early_stop_iteration_by_hand():
    assert early_stop_iteration([100, 200, 300, 400], [0.5, 0.3, 0.3, 0.4]) == 200  # the first of tied minima
    assert early_stop_iteration([100, 200, 300, 400], [0.5, 0.4, 0.3, 0.2]) == 400
    assert early_stop_iteration([25], [1.0]) == 25
    with pytest.raises(ValueError):
        early_stop_iteration([100, 200], [0.1])
    with pytest.raises(ValueError):
        early_stop_iteration([], [])


def test_experiment_training_records_the_early_stop_and_resumes_at_k():
    data = digits_splits(0)
    assert {k: len(v[1]) for k, v in data.items()} == {"train": 987, "validation": 270, "test": 540}
    schedule = batch_schedule(987, 60, 40, seed=0)
    assert schedule.shape == (40, 60)
    assert len(set(schedule[:16].flatten().tolist())) == 16 * 60  # one epoch has no repeats
    settings = {"lr": 1.2e-3, "eval_every": 10}
    train_fn = make_train_fn(data, schedule, settings)
    record = train_fn(lenet([16], seed=0), 0, None)
    assert record["iterations"] == [10, 20, 30, 40]
    best = record["iterations"].index(record["early_stop_iteration"])
    assert record["val_loss"][best] == min(record["val_loss"])
    assert record["test_accuracy_at_early_stop"] == record["test_accuracy"][best]
    assert train_fn(lenet([16], seed=0), 15, 30)["iterations"] == [20, 30]


def _metrics(dense, levels, spread=(0.0, 0.0, 0.0)):
    """levels: (remaining, win_stop, win_acc, reinit_stop, reinit_acc) per compared level; three trials.

    `spread` shifts the three trials' values by -s, 0, +s (accuracy s / 1000), in a different order for the
    dense network, the tickets and their re-initialisations: trial-to-trial noise that pairing cannot remove.
    """
    def trials(v, unit=1.0):
        return [v + d * unit for d in spread]

    rows = [{"round": 0, "remaining": 1.0, "winning": {"early_stop_iteration": trials(dense[0]),
                                                       "test_accuracy": trials(dense[1], 1e-3)}}]
    for r, (pm, ws, wa, rs, ra) in enumerate(levels, 1):
        rows.append({"round": r, "remaining": pm,
                     "winning": {"early_stop_iteration": trials(ws)[::-1], "test_accuracy": trials(wa, 1e-3)[::-1]},
                     "reinit": {"early_stop_iteration": trials(rs)[1:] + trials(rs)[:1],
                                "test_accuracy": trials(ra, 1e-3)[1:] + trials(ra, 1e-3)[:1]}})
    return {"levels": rows, "iterations": 1500}


def test_predicate_by_hand():
    good = _metrics((800, 0.970), [(0.51, 600, 0.975, 800, 0.970), (0.21, 500, 0.978, 900, 0.965),
                                   (0.09, 700, 0.972, 1000, 0.950), (0.036, 900, 0.968, 1200, 0.930)])
    assert list(checks(good).values()) == [True] * 6
    bad = _metrics((800, 0.970), [(0.51, 600, 0.975, 800, 0.970), (0.21, 900, 0.960, 900, 0.965),
                                  (0.09, 700, 0.972, 600, 0.975), (0.036, 900, 0.968, 700, 0.990)])
    # 21%: stops at 900, later than dense, and 0.960 is lower; 9%: re-init is both more accurate and
    # faster; sparsest re-init 0.990 beats dense and 51% re-init, and stops at 700 < 800.
    assert list(checks(bad).values()) == [False] * 6
    # a ticket exactly as good as the dense network: neither shown nor refuted
    tie = _metrics((800, 0.970), [(0.51, 800, 0.970, 800, 0.970)])
    assert list(checks(tie).values())[:2] == [None, None]
    only_moderate = _metrics((800, 0.970), [(0.8, 600, 0.975, 800, 0.970)])
    assert list(checks(only_moderate).values()) == [True, True, None, None, None, None]  # re-init stops with dense
    # the same means, but trials that disagree by more than the differences: undecided, neither passed nor failed
    noisy = _metrics((800, 0.970), [(0.51, 600, 0.975, 800, 0.970), (0.21, 500, 0.978, 900, 0.965),
                                    (0.09, 700, 0.972, 1000, 0.950), (0.036, 900, 0.968, 1200, 0.930)],
                     spread=(-450.0, 0.0, 450.0))
    assert list(checks(noisy).values()) == [None] * 6


def test_preconditions_by_hand():
    good = _metrics((800, 0.970), [(0.51, 600, 0.975, 800, 0.970)])
    assert list(preconditions(good).values()) == [True, True]
    untrained = _metrics((800, 0.30), [(0.51, 600, 0.975, 800, 0.970)], spread=(-200.0, 0.0, 200.0))
    assert list(preconditions(untrained).values()) == [False, True]
    cut_off = _metrics((1500, 0.970), [(0.51, 600, 0.975, 800, 0.970)])
    assert list(preconditions(cut_off).values()) == [True, False]
