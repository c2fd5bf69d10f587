import itertools

import pytest
import torch
import torch.nn.functional as F

from paperzoo.core.tasks import GroupWordProblem, TaskBatch, TaskTraining
from paperzoo.phenomena.illusion_of_state import (
    IDS4, KINDS, DiagonalSelectiveSSM, ElmanRNN, StateTrackingConfig, min_depth, mixed_length_labels,
    train_word_problem)


def predictions(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Position t's prediction is the argmax after token t - 1, as `task_accuracy` reads a causal LM."""
    return torch.cat([tokens[:, :1], logits[:, :-1].argmax(-1)], dim=1)


def one_hot(batch: TaskBatch, vocab_size: int) -> torch.Tensor:
    return F.one_hot(batch.tokens, vocab_size).float()


def test_ids4_with_permutation_matrices_computes_s5_prefix_products_exactly():
    """State h_t = (s_t(0), .., s_t(4)): A(g) = P(g)^T gives h_t[j] = h_{t-1}[g_t(j)] = (s_{t-1} g_t)(j)."""
    task = GroupWordProblem("S5", 64, "every-prefix")
    G, V = task.group.order, task.vocab_size
    perms = sorted(itertools.permutations(range(5)))  # the index order of paperzoo.core.tasks.symmetric_group
    layer = IDS4(V, N=5, d_out=V)
    with torch.no_grad():
        for p in (layer.A_proj.weight, layer.A_proj.bias, layer.B_proj.weight, layer.B_proj.bias, layer.C.weight):
            p.zero_()
        for g, perm in enumerate(perms):
            P = torch.zeros(5, 5)
            P[list(perm), range(5)] = 1.0  # P e_i = e_{perm(i)}
            layer.A_proj.weight[:, g] = P.T.flatten()
            layer.C.weight[G + g] = torch.tensor(perm, dtype=torch.float)  # <h, perm> is largest only at perm = h
        layer.B_proj.weight[:, task.start] = torch.arange(5.0)  # the start token writes the identity, A(start) = 0
    batch = task.sample(256, seed=0)
    assert batch.correct(predictions(layer(one_hot(batch, V)), batch.tokens)).all()


def test_ids4_state_is_a_product_of_input_chosen_dense_matrices():
    torch.manual_seed(0)
    layer = IDS4(3, N=4)
    x = torch.randn(2, 6, 3)
    A = (x @ layer.A_proj.weight.T + layer.A_proj.bias).reshape(2, 6, 4, 4)
    b = x @ layer.B_proj.weight.T + layer.B_proj.bias
    h = torch.zeros(2, 4)
    for t in range(6):
        h = torch.einsum("nij,nj->ni", A[:, t], h) + b[:, t]
        assert torch.allclose(layer.states(x)[:, t], h, atol=1e-5)


def test_diagonal_ssm_scan_equals_the_closed_form():
    """h_t = sum_{s<=t} exp(A sum_{r=s+1}^t Δ_r) Δ_s B_s u_s, with Δ, B, C computed here from the layer's weights."""
    torch.manual_seed(0)
    d, N, T = 3, 2, 5
    layer = DiagonalSelectiveSSM(d, N)
    with torch.no_grad():
        layer.delta_proj.weight.normal_()  # make the selection visibly input-dependent
    u = torch.randn(2, T, d)
    delta = F.softplus(u @ layer.delta_proj.weight.T + layer.delta_proj.bias)  # [n, T, d]
    B, C = u @ layer.B_proj.weight.T, u @ layer.C_proj.weight.T  # [n, T, N]
    A = -torch.exp(layer.A_log)  # [d, N]
    assert (A < 0).all()
    y = torch.zeros(2, T, d)
    for t in range(T):
        h = torch.zeros(2, d, N)
        for s in range(t + 1):
            decay = torch.exp(delta[:, s + 1:t + 1].sum(1)[..., None] * A)  # prod_{r=s+1}^t exp(Δ_r A)
            h += decay * delta[:, s, :, None] * B[:, s, None, :] * u[:, s, :, None]
        y[:, t] = (h * C[:, t, None, :]).sum(-1) + layer.D * u[:, t]
    assert torch.allclose(layer.scan(u), y, atol=1e-5)


def test_rnn_with_hand_set_weights_tracks_a_cyclic_group_exactly():
    """Units (s, a) = [s_{t-1} = s and g_t = a]: relu(sum_{s'+a'=s} u_{s',a'} + x_a - 1) is exactly that AND."""
    k = 5
    task = GroupWordProblem(f"Z{k}", 64, "every-prefix")
    V, H = task.vocab_size, k * k
    rnn = ElmanRNN(V, H, d_out=V, nonlinearity="relu")
    unit = lambda s, a: s * k + a  # noqa: E731
    W_hh, W_ih, C = torch.zeros(H, H), torch.zeros(H, V), torch.zeros(V, H)
    for s, a, s2, a2 in itertools.product(range(k), repeat=4):
        if (s2 + a2) % k == s:
            W_hh[unit(s, a), unit(s2, a2)] = 1.0
    for s, a in itertools.product(range(k), repeat=2):
        W_ih[unit(s, a), a] = 1.0
        W_ih[unit(s, 0), task.start] = 1.0  # the start token acts as the identity element
        C[k + (s + a) % k, unit(s, a)] = 1.0  # state token G + (s + a)
    with torch.no_grad():
        rnn.rnn.weight_hh_l0.copy_(W_hh)
        rnn.rnn.weight_ih_l0.copy_(W_ih)
        rnn.rnn.bias_ih_l0.fill_(-1.0)
        rnn.rnn.bias_hh_l0.zero_()
        rnn.h0.zero_()
        rnn.h0[unit(0, 0)] = 1.0  # s_0 = identity
        rnn.C.weight.copy_(C)
    batch = task.sample(256, seed=1)
    assert batch.correct(predictions(rnn(one_hot(batch, V)), batch.tokens)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_every_model_is_causal(kind):
    torch.manual_seed(0)
    model = StateTrackingConfig(kind, hidden_size=16, num_layers=2, state_size=4).build(11).eval()
    tokens = torch.randint(0, 11, (3, 12))
    changed = tokens.clone()
    t = 7
    changed[:, t] = (tokens[:, t] + 1) % 11
    with torch.no_grad():
        before, after = model(input_ids=tokens).logits, model(input_ids=changed).logits
    assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6)
    assert not torch.allclose(before[:, t:], after[:, t:], atol=1e-4)  # the change is seen from t on


def test_loss_is_the_causal_lm_loss_on_scored_positions():
    torch.manual_seed(0)
    task = GroupWordProblem("Z5", 6, "every-prefix")
    model = StateTrackingConfig("ids4", hidden_size=8, state_size=3).build(task.vocab_size)
    batch = task.sample(4, seed=0)
    out = model(input_ids=batch.tokens, labels=batch.labels)
    logits, labels = out.logits[:, :-1], batch.labels[:, 1:]
    keep = labels != -100
    assert keep.sum() == 4 * 6
    assert torch.allclose(out.loss, F.cross_entropy(logits[keep], labels[keep]))


class _Depth(torch.nn.Module):
    """A stand-in model that only knows its depth (the stub trainer reads it)."""

    def __init__(self, depth):
        super().__init__()
        self.depth = depth


def test_min_depth_returns_the_first_passing_depth():
    accuracy = {1: 0.2, 2: 0.85, 3: 0.93, 4: 0.99}
    trained = []

    def trainer(model, task, training, seed):
        trained.append(model.depth)
        assert task.format == "every-prefix" and task.L == 16 and task.group_name == "A5"
        return {"accuracy": accuracy[model.depth]}

    depth, seen = min_depth(_Depth, "A5", 16, threshold=0.9, trainer=trainer)
    assert depth == 3 and trained == [1, 2, 3] and seen == {1: 0.2, 2: 0.85, 3: 0.93}
    assert min_depth(_Depth, "A5", 16, threshold=0.999, trainer=trainer)[0] is None


def test_training_one_layer_ids4_learns_z5():
    """The trainer and `task_accuracy` end to end (about 3 s): IDS4 learns an abelian word problem."""
    torch.manual_seed(0)
    task = GroupWordProblem("Z5", 8, "every-prefix")
    model = StateTrackingConfig("ids4", hidden_size=32).build(task.vocab_size)
    history = train_word_problem(model, task, TaskTraining(steps=600, batch_size=32), eval_size=256)
    assert history["train_loss"][-1] < 0.05
    assert history["accuracy"] > 0.9  # read against the targets s_t, not the input tokens


def test_training_stops_once_validation_words_reach_the_bar():
    """The paper's stopping rule: at a bar every model meets (0) training ends at the first check; at one none
    meets (above 1) it runs the whole budget."""
    task = GroupWordProblem("Z5", 4, "every-prefix")
    for bar, steps in ((0.0, 5), (1.01, 20)):
        torch.manual_seed(0)
        model = StateTrackingConfig("ids4", hidden_size=16).build(task.vocab_size)
        history = train_word_problem(model, task, TaskTraining(steps=20, batch_size=8), eval_size=16, stop_at=bar,
                                     check_every=5)
        assert history["steps"] == steps and len(history["train_loss"]) == steps


def test_mixed_length_labels_keep_a_prefix_of_every_length_from_min_to_L():
    task = GroupWordProblem("A5", 8, "every-prefix")
    batch = task.sample(2000, seed=0)
    labels = mixed_length_labels(batch, 2, seed=0)
    kept = labels != -100
    lengths = kept.sum(1)
    assert set(lengths.tolist()) == set(range(2, 9))  # uniform over 2..L: every length occurs
    for row in range(20):
        n = lengths[row].item()
        assert kept[row, 2:2 + n].all() and not kept[row, 2 + n:].any()  # s_1 .. s_n, nothing after
    assert torch.equal(labels[kept], batch.labels[kept])
