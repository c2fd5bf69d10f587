"""BoN-aware fine-tuning (2412.15287): the paper's g+/g- weights by hand, the BoN policy, the update they make."""

import math

import numpy as np
import pytest
import torch

from paperzoo.core.sampling import completion_logprobs
from paperzoo.decoding.bon_aware_finetuning import (
    bon_negative_weight,
    bon_policy_probabilities,
    bon_positive_only_weight,
    bon_positive_weight,
    bon_rlb_weights,
    bon_success_probability,
    pass_at_k,
    rejection_sampling_weights,
    weighted_finetune_step,
    weighted_nll,
)
from paperzoo.experiments.decoding.bon_aware_finetuning import checks, decided, preconditions
from tests.tiny_models import ARCHS, tiny


def test_paper_weights_by_hand():
    # g+ = N q^(N-1) / (1 - q^N), g- = N q / (1 - q)
    q = torch.tensor(0.5, dtype=torch.float64)
    assert float(bon_positive_weight(q, 2)) == pytest.approx(2 * 0.5 / 0.75)
    assert float(bon_negative_weight(q, 2)) == pytest.approx(2.0)
    q = torch.tensor(0.75, dtype=torch.float64)
    assert float(bon_positive_weight(q, 3)) == pytest.approx(3 * 0.5625 / (1 - 0.421875))
    assert float(bon_negative_weight(q, 3)) == pytest.approx(9.0)
    assert float(bon_positive_only_weight(q, 3)) == pytest.approx(0.25 * 3 * 0.5625 / (1 - 0.421875))
    # N = 1: g+ = 1 / (1 - q), g- = q / (1 - q)
    assert float(bon_positive_weight(q, 1)) == pytest.approx(4.0)
    assert float(bon_negative_weight(q, 1)) == pytest.approx(3.0)
    # an easy problem (q = 0): a correct sample is worth nothing to BoN with N > 1
    assert float(bon_positive_weight(torch.tensor(0.0), 4)) == 0.0


def test_bon_policy_by_hand():
    # k = 4, one correct: q = 3/4. N = 2: BoN is correct with prob 1 - 9/16 = 7/16, on the one correct sample;
    # wrong with prob 9/16, spread over the three wrong samples.
    probs = bon_policy_probabilities(torch.tensor([[1, 0, 0, 0]]), 2)
    assert torch.allclose(probs, torch.tensor([[7 / 16, 3 / 16, 3 / 16, 3 / 16]], dtype=torch.float64))
    assert torch.allclose(bon_policy_probabilities(torch.tensor([[1, 0, 1], [0, 0, 1]]), 5).sum(1),
                          torch.ones(2, dtype=torch.float64))
    # N = 1: the BoN policy is the sampling policy itself
    assert torch.allclose(bon_policy_probabilities(torch.tensor([[1, 0, 0, 1]]), 1), torch.full((1, 4), 0.25,
                          dtype=torch.float64))


def test_rlb_weights_by_hand():
    # k = 4, one correct, N = 2: q = 3/4, p = 1/4.
    # correct: k * pi_bon * g+ = 4 * 7/16 * (2 * 3/4 / (7/16)) = 6 = N q^(N-1) / p
    # wrong:  -k * pi_bon * g- = -4 * 3/16 * (2 * 3/4 / (1/4)) = -4.5 = -N q^N / p
    w = bon_rlb_weights(torch.tensor([[1, 0, 0, 0]]), 2)
    assert torch.allclose(w, torch.tensor([[6.0, -4.5, -4.5, -4.5]]))
    # N = 1 (the ordinary-RL control): correct 1/p, wrong -q/p
    w = bon_rlb_weights(torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]]), 1)
    assert torch.allclose(w, torch.tensor([[4.0, -3.0, -3.0, -3.0], [4 / 3, 4 / 3, 4 / 3, -1 / 3]]))


def test_rlb_weights_match_draws_from_the_bon_policy():
    """Sampling the empirical BoN policy and weighting each draw by r g+ - (1 - r) g- has the same mean."""
    correct = torch.tensor([[1, 0, 0, 1, 0, 0]])
    N, k = 3, 6
    probs = bon_policy_probabilities(correct, N)[0].numpy()
    q = torch.tensor(4 / 6, dtype=torch.float64)
    per_draw = np.where(correct[0].numpy() == 1, float(bon_positive_weight(q, N)), -float(bon_negative_weight(q, N)))
    rng = np.random.default_rng(0)
    draws = rng.choice(k, size=200_000, p=probs)
    mean_per_sample = np.bincount(draws, weights=per_draw[draws], minlength=k) / len(draws) * k
    assert np.allclose(mean_per_sample, bon_rlb_weights(correct, N)[0].numpy(), atol=0.15)


def _categorical_update(theta, weights_for):
    """Expected update sum_y pi(y) w(y) grad log pi(y) on a softmax policy over answers (answer 0 correct)."""
    pi = torch.softmax(theta, 0).detach()
    out = torch.zeros_like(theta)
    for y in range(len(theta)):
        score = torch.nn.functional.one_hot(torch.tensor(y), len(theta)).double() - pi  # grad of log softmax
        out += pi[y] * weights_for(y, pi) * score
    return out


def test_positive_only_weights_give_the_gradient_of_bon_success_exactly():
    """BoN-RLB(P): E_{y ~ pi_bon}[r g+bar grad log pi] = grad (1 - q^N): the paper optimises 1 - q^N, not its log."""
    theta = torch.tensor([0.2, -0.5, 1.0, 0.1], dtype=torch.float64, requires_grad=True)
    N = 8
    pi = torch.softmax(theta, 0)
    bon_success_probability(pi[0], N).backward()
    true_grad = theta.grad.clone()
    p = float(pi[0].detach())
    q = torch.tensor(1 - p, dtype=torch.float64)

    def w(y, pi):  # pi_bon(y) / pi(y) times the weight of the draw
        return (1 - q**N) / p * bon_positive_only_weight(q, N) if y == 0 else 0.0

    assert torch.allclose(_categorical_update(theta, w), true_grad, atol=1e-10)


@pytest.mark.parametrize("N", [1, 4, 16])
def test_expected_rlb_update_is_a_positive_multiple_of_the_bon_gradient(N):
    r"""Mean of the two-sided estimator = N q^(N-1) (1 + q) / p * grad p: up the BoN success, never down."""
    theta = torch.tensor([-0.3, 0.4, 0.9, -1.0], dtype=torch.float64, requires_grad=True)
    pi = torch.softmax(theta, 0)
    pi[0].backward()
    grad_p = theta.grad.clone()
    p = float(pi[0].detach())
    q = torch.tensor(1 - p, dtype=torch.float64)

    def w(y, pi):  # importance weight pi_bon / pi times r g+ - (1 - r) g-
        if y == 0:
            return (1 - q**N) / p * bon_positive_weight(q, N)
        return q ** (N - 1) * -bon_negative_weight(q, N)

    expected = N * q ** (N - 1) * (1 + q) / p * grad_p
    assert torch.allclose(_categorical_update(theta, w), expected, atol=1e-10)


def test_bon_weights_favour_hard_problems_more_than_n1():
    correct = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    w16, w1 = bon_rlb_weights(correct, 16), bon_rlb_weights(correct, 1)
    assert w16[1, 0] < 1e-3 * w16[0, 0]  # p = 7/8: BoN@16 succeeds anyway
    assert w1[1, 0] > 0.1 * w1[0, 0]  # for one sample the easy problem still counts
    assert w16[0, 0] > 0 and w16[0, 1] < 0


def test_groups_without_a_correct_sample_get_zero_weight_and_bad_input_raises():
    w = bon_rlb_weights(torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]]), 4)
    assert torch.all(w[:2] == 0) and torch.all(w[2] != 0)
    assert torch.all(bon_rlb_weights(torch.tensor([[1, 1]]), 1) == 1)  # N = 1 keeps all-correct groups
    with pytest.raises(ValueError, match="correct"):
        bon_rlb_weights(torch.tensor([1, 0, 1]), 4)
    with pytest.raises(ValueError, match="binary"):
        bon_rlb_weights(torch.tensor([[0.5, 1.0]]), 4)
    with pytest.raises(ValueError, match="N must"):
        bon_positive_weight(torch.tensor([0.5]), 0)
    with pytest.raises(ValueError, match="N must"):
        bon_rlb_weights(torch.tensor([[1, 0]]), 2.5)
    with pytest.raises(ValueError, match=r"p_fail must lie in \[0, 1\)"):
        bon_negative_weight(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="p "):
        bon_success_probability(torch.tensor(1.5), 2)
    assert torch.equal(rejection_sampling_weights(torch.tensor([[1, 0]])), torch.tensor([[1.0, 0.0]]))


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="integers"):
        pass_at_k(4.0, 1, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_completion_logprobs_match_unpadded_forward(arch):
    model = tiny(arch)
    prompts, completions = [[3, 4, 5], [7]], [[9, 10], [11, 12, 13, 14]]
    got, _ = completion_logprobs(model, prompts, completions, pad_id=0)
    for i in range(2):
        ids = torch.tensor([prompts[i] + completions[i]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        want = logp[torch.arange(len(tgt)), tgt][len(prompts[i]) - 1 :].sum()
        assert torch.allclose(got[i], want, atol=1e-4)


def test_weighted_step_moves_likelihood_with_the_sign_of_the_weight():
    model = tiny("llama")
    prompts, completions = [[3, 4], [3, 4]], [[9, 10, 11], [20, 21, 22]]
    before = completion_logprobs(model, prompts, completions, 0)[0].detach()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        weighted_finetune_step(model, opt, prompts, completions, torch.tensor([1.0, -1.0]), pad_id=0)
    after = completion_logprobs(model, prompts, completions, 0)[0].detach()
    assert after[0] > before[0] and after[1] < before[1]
    assert weighted_finetune_step(model, opt, prompts, completions, torch.zeros(2), pad_id=0) == 0.0
    with pytest.raises(ValueError, match="weights"):
        weighted_finetune_step(model, opt, prompts, completions, torch.zeros(3), pad_id=0)
    with pytest.raises(ValueError, match="weights must be finite"):
        weighted_finetune_step(model, opt, prompts, completions, torch.tensor([1.0, math.inf]), pad_id=0)


def test_weighted_step_in_micro_batches_is_the_one_pass_step():
    """SGD, so a step is the gradient itself: two steps in length-sorted micro-batches against a plain one-pass loop."""
    prompts = [[3, 4], [5], [3, 4, 6], [7, 8], [9]]
    completions = [[9, 10, 11], [20, 21, 22, 23, 24, 25], [12], [13, 14], [15, 16, 17, 18]]
    weights = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.0])  # one zero weight: skipped, still in the mean
    keep = [0, 1, 3, 4]
    ref = tiny("llama")
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_losses = []
    for _ in range(2):
        logp, _ = completion_logprobs(ref, [prompts[i] for i in keep], [completions[i] for i in keep], 0)
        loss = weighted_nll(logp, weights[keep]) * 4 / 5
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(float(loss))
    for micro in (2, 1):
        model = tiny("llama")
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = [weighted_finetune_step(model, opt, prompts, completions, weights, pad_id=0, grad_clip=1e9,
                                         micro_batch=micro) for _ in range(2)]
        assert losses == pytest.approx(ref_losses, abs=1e-5)  # small differences of larger weighted terms
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model.parameters(), ref.parameters()))


def _metrics(base, rft, rl, bon):
    """Per-problem pass@N arrays (N = 1 and 16) for 40 problems from (pass@1, pass@16) pairs of values."""
    def arm(p1, p16):
        return {"1": [p1] * 20 + [p1 - 0.05] * 20, "16": [p16] * 20 + [p16 - 0.05] * 20}
    return {"eval_N": [1, 16], "per_problem_bon": {"base": arm(*base), "RFT": arm(*rft), "RL (N=1)": arm(*rl),
                                                    "BoN-RLB": arm(*bon)}}


def test_decided_needs_the_interval_to_clear_the_threshold():
    from paperzoo.core.margins import Interval
    assert decided(Interval(0.01, 0.2, 0.3), 0.1) is True
    assert decided(Interval(0.01, 0.05, 0.3), 0.1) is None
    assert decided(Interval(-0.2, -0.1, 0.05), 0.1) is False
    assert decided(Interval(-0.1, 0.0, 0.1)) is None


def test_checks_and_preconditions_by_hand():
    m = _metrics(base=(0.40, 0.60), rft=(0.42, 0.60), rl=(0.45, 0.62), bon=(0.42, 0.70))
    assert all(v is True for v in preconditions(m).values())
    assert all(v is True for v in checks(m).values())
    m = _metrics(base=(0.40, 0.60), rft=(0.42, 0.60), rl=(0.45, 0.75), bon=(0.42, 0.70))
    c = list(checks(m).values())
    assert c[0] is False  # clearly below RL at 16
    noisy = _metrics(base=(0.40, 0.60), rft=(0.42, 0.60), rl=(0.45, 0.62), bon=(0.42, 0.70))
    noisy["per_problem_bon"]["BoN-RLB"]["16"] = [1.0, 0.2] * 20  # mean 0.6, spread wide: undecided against both
    assert list(checks(noisy).values())[0] is None
    degraded = _metrics(base=(0.40, 0.60), rft=(0.42, 0.60), rl=(0.20, 0.62), bon=(0.42, 0.70))
    assert list(preconditions(degraded).values())[0] is False
    ceiling = _metrics(base=(0.90, 1.0), rft=(0.42, 0.60), rl=(0.45, 0.62), bon=(0.42, 0.70))
    ceiling["per_problem_bon"]["base"]["16"] = [1.0] * 40  # every problem solved at BoN@16: no room to improve
    assert list(preconditions(ceiling).values())[1] is False
