"""BoN-aware fine-tuning (2412.15287): the BoN-RLB weights by hand and as a policy gradient, the weighted step."""

import math

import pytest
import torch

from paperzoo.core.sampling import completion_logprobs
from paperzoo.decoding.bon_aware_finetuning import (
    bon_gain,
    bon_rlb_weights,
    bon_success_probability,
    pass_at_k,
    rejection_sampling_weights,
    weighted_finetune_step,
)
from paperzoo.experiments.decoding.bon_aware_finetuning import checks
from tests.tiny_models import ARCHS, tiny


def test_weights_by_hand():
    # p = 1/2, N = 2: g = 2 * 0.5 / (1 - 0.25) = 4/3; positives (1 - p) g = 2/3, negatives -p g = -2/3
    w = bon_rlb_weights(torch.tensor([[1, 0]]), 2)
    assert torch.allclose(w, torch.tensor([[2 / 3, -2 / 3]]))
    # p = 1/4, N = 2: q = 3/4, g = 1.5 / 0.4375; positive 0.75 g, negatives -0.25 g
    g = 1.5 / 0.4375
    w = bon_rlb_weights(torch.tensor([[1, 0, 0, 0]]), 2)
    assert torch.allclose(w, torch.tensor([[0.75 * g, -0.25 * g, -0.25 * g, -0.25 * g]]))


def test_n1_is_ordinary_policy_gradient_on_log_p():
    correct = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    w = bon_rlb_weights(correct, 1)
    for row, p in zip(range(2), (0.25, 0.75)):
        assert torch.allclose(w[row], (correct[row].float() - p) / p, atol=1e-6)


def test_weights_sum_to_zero_within_each_group():
    correct = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 1, 1, 1]])
    for N in (1, 4, 32):
        assert torch.allclose(bon_rlb_weights(correct, N).sum(1), torch.zeros(2), atol=1e-6)


def test_gain_is_derivative_of_log_bon_success():
    for N in (1, 3, 16):
        p = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        torch.log(bon_success_probability(p, N)).backward()
        assert math.isclose(float(p.grad), float(bon_gain(1 - p.detach(), N)), rel_tol=1e-9)


def test_expected_weighted_score_is_the_gradient_of_the_bon_objective():
    """On a categorical policy over 4 answers (answer 0 correct) the expectation is exact."""
    theta = torch.tensor([0.2, -0.5, 1.0, 0.1], dtype=torch.float64, requires_grad=True)
    N = 8
    pi = torch.softmax(theta, 0)
    torch.log(bon_success_probability(pi[0], N)).backward()
    true_grad = theta.grad.clone()
    pi = pi.detach()
    p = pi[0]
    g = bon_gain(1 - p, N)
    estimate = torch.zeros(4, dtype=torch.float64)
    for y in range(4):
        score = torch.nn.functional.one_hot(torch.tensor(y), 4).double() - pi  # grad of log softmax
        estimate += pi[y] * g * (float(y == 0) - p) * score
    assert torch.allclose(estimate, true_grad, atol=1e-10)


def test_bon_weights_favour_hard_problems_more_than_n1():
    """BoN-aware: a correct sample of an easy problem is worth much less than one of a hard problem."""
    correct = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    w16 = bon_rlb_weights(correct, 16)
    assert w16[1, 0] < 1e-3 * w16[0, 0]  # p = 7/8: BoN@16 succeeds anyway
    assert w16[0, 0] > 0 and w16[0, 1] < 0


def test_uninformative_groups_get_zero_weight_and_bad_input_raises():
    w = bon_rlb_weights(torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]]), 4)
    assert torch.all(w[:2] == 0) and torch.all(w[2] != 0)
    with pytest.raises(ValueError):
        bon_rlb_weights(torch.tensor([1, 0, 1]), 4)
    with pytest.raises(ValueError):
        bon_rlb_weights(torch.tensor([[0.5, 1.0]]), 4)
    with pytest.raises(ValueError):
        bon_gain(torch.tensor([0.5]), 0)
    assert torch.equal(rejection_sampling_weights(torch.tensor([[1, 0]])), torch.tensor([[1.0, 0.0]]))


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


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


def test_checks_by_hand():
    m = {"eval_N": [1, 4, 16], "bon_accuracy": {
        "RFT": {"1": 0.40, "4": 0.50, "16": 0.60},
        "RL (N=1)": {"1": 0.45, "4": 0.55, "16": 0.62},
        "BoN-RLB": {"1": 0.42, "4": 0.58, "16": 0.70}}}
    assert all(checks(m).values())
    m["bon_accuracy"]["BoN-RLB"]["16"] = 0.58  # below RL at 16, gap -0.04 < -0.03 at N=1
    assert not any(checks(m).values())
