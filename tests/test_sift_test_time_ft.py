import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, tiny

import paperzoo.decoding.sift_test_time_ft as sift
from paperzoo.experiments.decoding.sift_test_time_ft import checks, preconditions


def test_posterior_variance_by_hand():
    # x* = e1, X = {e1, e2}, lambda = 1: K + I = diag(2, 2), k_X = (1, 0) -> 1 - 1/2 = 1/2
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert sift.posterior_variance(e1, torch.stack([e1, e2]), 1.0) == pytest.approx(0.5)
    # two copies of e1: K + I = [[2, 1], [1, 2]], k_X = (1, 1): 1 - (1,1) K^-1 (1,1)^T = 1 - 2/3 = 1/3
    assert sift.posterior_variance(e1, torch.stack([e1, e1]), 1.0) == pytest.approx(1 / 3)
    # a vector at 60 degrees, lambda = 0.5: 1 - cos^2 / (1 + 0.5) = 1 - 0.25/1.5
    u = torch.tensor([0.5, math.sqrt(3) / 2])
    assert sift.posterior_variance(e1, u[None], 0.5) == pytest.approx(1 - 0.25 / 1.5)
    assert sift.posterior_variance(e1, torch.zeros(0, 2), 0.5) == pytest.approx(1.0)


def test_incremental_variances_match_direct_solve():
    torch.manual_seed(0)
    phi = F.normalize(torch.randn(40, 6), dim=-1)
    phi_star = F.normalize(torch.randn(6), dim=0)
    for lam in (0.01, 0.3, 5.0):
        s = sift.sift_select(phi_star, phi, 8, lam)
        assert len(set(s.indices)) == 8
        for n in range(1, 9):
            assert s.variances[n - 1] == pytest.approx(sift.posterior_variance(phi_star, phi[s.indices[:n]], lam), abs=1e-9)
        # each pick is the greedy minimiser of the direct posterior variance
        for n in range(8):
            best = min((i for i in range(40) if i not in s.indices[:n]),
                       key=lambda i: sift.posterior_variance(phi_star, phi[s.indices[:n] + [i]], lam))
            assert s.indices[n] == best


def test_sift_skips_exact_duplicates_but_nn_takes_them():
    torch.manual_seed(1)
    base = F.normalize(torch.randn(30, 64), dim=-1)
    phi = torch.cat([base, base])  # every example twice: i and i + 30
    # the prompt is not in the span of a few examples, so fresh examples still carry information
    phi_star = F.normalize(base[:5].sum(0) + 0.5 * F.normalize(torch.randn(64), dim=0), dim=0)
    picked = sift.sift_select(phi_star, phi, 6, lam=0.01).indices
    assert len({i % 30 for i in picked}) == 6  # no example chosen twice
    nn = sift.nearest_neighbours(phi_star, phi, 6)
    assert len({i % 30 for i in nn}) == 3  # NN takes each of the top 3 twice


def test_large_lambda_limit_is_nearest_neighbours():
    torch.manual_seed(2)
    phi_star = F.normalize(torch.randn(5), dim=0)
    phi = F.normalize(torch.randn(25, 5), dim=-1)
    phi = phi * torch.sign(phi @ phi_star)[:, None]  # all cosines positive: |cos| order = cos order
    assert sift.sift_select(phi_star, phi, 10, lam=1e8).indices == sift.nearest_neighbours(phi_star, phi, 10)
    # a small lambda departs from it on this pool (otherwise the test above would prove nothing)
    assert sift.sift_select(phi_star, phi, 10, lam=1e-3).indices != sift.nearest_neighbours(phi_star, phi, 10)


def test_selection_rejects_bad_input():
    phi = torch.eye(3)
    with pytest.raises(ValueError):
        sift.sift_select(phi[0], phi, 4)
    with pytest.raises(ValueError):
        sift.sift_select(phi[0], phi, 2, lam=0.0)
    with pytest.raises(ValueError):
        sift.nearest_neighbours(torch.ones(4), phi, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_embed_is_unit_norm_and_pooling_differs(arch):
    model = tiny(arch)
    ids = torch.randint(0, 64, (3, 7))
    mean, last = sift.embed(model, ids), sift.embed(model, ids, pooling="last")
    assert mean.shape == (3, 32)
    assert torch.allclose(mean.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(mean, last)
    # mean pooling by hand
    h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].mean(1)
    assert torch.allclose(mean, F.normalize(h, dim=-1), atol=1e-5)


def test_finetuning_a_copy_leaves_the_model_unchanged_and_lowers_the_loss():
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = torch.randint(0, 64, (12,))
    fit = sift.test_time_finetune(model, [target.clone(), target.clone()], target, lr=1e-2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fit.model is not model
    assert len(fit.nll) == 3 and fit.tokens == 11
    assert fit.loss_before == pytest.approx(sift.sequence_nll(model, target) / 11)
    assert fit.loss_after < fit.loss_before  # two Adam steps on the target itself
    assert not all(torch.equal(before[k], v) for k, v in fit.model.state_dict().items())


def test_finetune_is_one_sgd_step_per_example():
    model = tiny("gpt2")
    x = torch.randint(0, 64, (9,))
    fit = sift.test_time_finetune(model, [x], x, lr=0.1, optimizer="sgd")
    ref = tiny("gpt2")
    loss = F.cross_entropy(ref(input_ids=x[None]).logits[0, :-1], x[1:])
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for (name, p), q in zip(fit.model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_finetune_rejects_bad_input():
    model = tiny("llama")
    with pytest.raises(ValueError):
        sift.test_time_finetune(model, [torch.tensor([1])], torch.arange(4), lr=1e-3)
    with pytest.raises(ValueError):
        sift.test_time_finetune(model, [], torch.arange(4), lr=-1.0)


def _metrics(dup_sift, dup_nn, clean_sift, clean_nn, oracle=0.05, nn_redundant=0.5):
    spread = [0.0, 0.002, -0.002, 0.001] * 5  # 20 prompts
    arm = lambda v: [v + d for d in spread]
    return {"lr": 1e-3, "oracle_per_prompt": arm(oracle),
            "final_per_prompt": {"duplicated": {"sift": arm(dup_sift), "nn": arm(dup_nn)},
                                 "clean": {"sift": arm(clean_sift), "nn": arm(clean_nn)}},
            "redundant_share": {"duplicated": {"sift": 0.0, "nn": nn_redundant}}}


def test_checks_and_precondition_by_hand():
    m = _metrics(0.10, 0.05, 0.08, 0.06)
    assert all(v is True for v in checks(m).values())
    assert all(v is True for v in preconditions(m).values())
    m = _metrics(0.10, 0.05, 0.07, 0.08)
    assert list(checks(m).values()) == [True, False, True]  # clearly below NN on the clean pool
    m = _metrics(0.10, 0.05, 0.08, 0.08)
    assert list(checks(m).values())[1] is None  # equal within noise: undecided, not passed
    m = _metrics(0.10, 0.05, 0.08, 0.06, nn_redundant=0.1)
    assert list(checks(m).values())[2] is False
    assert list(preconditions(_metrics(0.1, 0.05, 0.08, 0.06, oracle=-0.01)).values()) == [False, True]
    # both selectors harm on the clean pool: the checks would compare two harms
    assert list(preconditions(_metrics(0.1, 0.05, -0.18, -0.12)).values()) == [True, False]
    assert list(preconditions(_metrics(0.1, 0.05, 0.02, -0.12)).values()) == [True, True]  # SIFT alone helps


def test_learning_rate_is_chosen_on_the_oracle_control():
    from paperzoo.experiments.decoding.sift_test_time_ft import choose_learning_rate, oracle_reduction

    class Tok:
        def decode(self, ids):
            return "x" * len(ids)

    model = tiny("llama")
    targets = torch.randint(0, 64, (2, 12))
    lr, gains = choose_learning_rate(model, Tok(), targets, 3, [1e-6, 1e-2])
    assert lr == 1e-2 and gains["0.01"] > gains["1e-06"] > -1e-3
    assert oracle_reduction(model, Tok(), targets[0], 3, 1e-2) == pytest.approx(gains["0.01"], rel=0.5)


def test_public_functions_name_the_bad_argument():
    model = tiny("llama")  # 64 positions
    with pytest.raises(ValueError, match="positions"):
        sift.sequence_nll(model, torch.randint(0, 64, (65,)))
    with pytest.raises(ValueError, match="positions"):
        sift.test_time_finetune(model, [torch.arange(70) % 64], torch.arange(4), lr=1e-3)
    with pytest.raises(ValueError, match="batch_size"):
        sift.embed(model, torch.randint(0, 64, (2, 5)), batch_size=0)
    with pytest.raises(ValueError, match="lam"):
        sift.sift_select(torch.eye(3)[0], torch.eye(3), 2, lam=float("nan"))
    with pytest.raises(ValueError, match="k must"):
        sift.nearest_neighbours(torch.eye(3)[0], torch.eye(3), 1.5)
    with pytest.raises(ValueError, match="phi_X"):
        sift.posterior_variance(torch.eye(3)[0], torch.eye(2), 1.0)
    with pytest.raises(ValueError, match="lr"):
        sift.test_time_finetune(model, [], torch.arange(4), lr=float("inf"))


def test_sift_decode_checks_arguments_before_work():
    from paperzoo.core.reasoning import reasoning_tokenizer

    model, tok = tiny("llama"), reasoning_tokenizer()
    with pytest.raises(ValueError, match="k must"):
        sift.sift_decode(model, tok, "12", ["34", "56"], k=0)
    with pytest.raises(ValueError, match="pool"):
        sift.sift_decode(model, tok, "12", [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        sift.sift_decode(model, tok, "12", ["34"], max_new_tokens=100)  # 2 + 100 > 64 positions
