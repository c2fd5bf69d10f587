"""MoICL (2411.02830): the merge on hand-set experts, the experts against the LM read directly, weights that learn."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paperzoo.phenomena.mixture_of_icl import MoICLWeights, expert_log_probs, moicl_log_probs, subset_features


def _tiny_lm(seed=0, vocab=20):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))


def test_mixture_and_product_on_hand_set_experts():
    p = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]]).log()  # one query, two experts, two candidates
    mixed = moicl_log_probs(p, torch.tensor([0.25, 0.75]), "mixture").exp()
    assert torch.allclose(mixed, torch.tensor([[0.25 * 0.9 + 0.75 * 0.5, 0.25 * 0.1 + 0.75 * 0.5]]))
    # product with an anti-expert: p(y) proportional to p1(y)^2 / p2(y)^0.5
    prod = moicl_log_probs(p, torch.tensor([2.0, -0.5]), "product").exp()
    raw = torch.tensor([0.9 ** 2 / 0.5 ** 0.5, 0.1 ** 2 / 0.5 ** 0.5])
    assert torch.allclose(prod, raw / raw.sum()[None])


def test_experts_are_the_lm_prompted_with_each_subset():
    lm = _tiny_lm()
    subsets = [torch.tensor([3, 4, 5]), torch.tensor([6, 7]), torch.tensor([8, 9, 10, 11])]
    queries = [torch.tensor([12]), torch.tensor([13, 14])]
    candidates = [torch.tensor([1]), torch.tensor([2]), torch.tensor([2, 1])]
    bos = torch.tensor([0])
    got = expert_log_probs(lm, subsets, queries, candidates, prefix=bos, batch_size=4)  # padded batches
    for q, query in enumerate(queries):
        for i, subset in enumerate(subsets):
            want = []
            for c in candidates:
                ids = torch.cat([bos, subset, query, c])
                logp = lm(input_ids=ids[None]).logits[0].log_softmax(-1)
                start = len(ids) - len(c)
                want.append(sum(logp[start - 1 + j, c[j]] for j in range(len(c))))
            want = torch.stack(want).log_softmax(0)
            assert torch.allclose(got[q, i], want, atol=1e-5)


def test_one_expert_is_plain_icl_and_the_lm_never_changes():
    lm = _tiny_lm(1)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    demos, query, candidates = torch.tensor([3, 1, 4, 2, 5, 1]), torch.tensor([3]), [torch.tensor([1]), torch.tensor([2])]
    logp = expert_log_probs(lm, [demos], [query], candidates)
    w = MoICLWeights(1, "mixture", "scalar")
    w.fit(logp, torch.tensor([0]), steps=20)
    merged = w(logp)
    direct = lm(input_ids=torch.cat([demos, query])[None]).logits[0, -1, [1, 2]].log_softmax(-1)
    assert torch.allclose(merged[0], direct, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())


def _experts_with_a_liar(n=64, k=4, liar=3, C=3, seed=0):
    """k experts on n queries: all right with probability 0.6 except `liar`, which puts 0.8 on a wrong answer."""
    g = torch.Generator().manual_seed(seed)
    gold = torch.randint(0, C, (n,), generator=g)
    p = torch.full((n, k, C), 0.4 / (C - 1))
    p[torch.arange(n), :, gold] = 0.6
    wrong = (gold + 1) % C
    p[:, liar] = 0.2 / (C - 1)
    p[torch.arange(n), liar, wrong] = 0.8
    return p.log(), gold


@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_learned_scalars_down_weight_the_expert_that_lies(combine):
    logp, gold = _experts_with_a_liar()
    w = MoICLWeights(4, combine, "scalar")
    report = w.fit(logp, gold, steps=200, lr=0.1)
    weights = w.weights().detach()
    assert weights[3] < 0.5 * weights[:3].mean()
    assert report.losses[-1] < report.losses[0]
    uniform = MoICLWeights(4, combine, "uniform")
    nll = lambda m: torch.nn.functional.nll_loss(m(logp), gold).item()
    assert nll(w) < nll(uniform)


def test_imle_top_k_keeps_the_informative_experts():
    # experts 0 and 2 know the answer, 1 and 3 are uniform: a top-2 mask must settle on {0, 2}
    g = torch.Generator().manual_seed(0)
    gold = torch.randint(0, 4, (128,), generator=g)
    p = torch.full((128, 4, 4), 0.25)
    for i in (0, 2):
        p[:, i] = 0.1
        p[torch.arange(128), i, gold] = 0.7
    w = MoICLWeights(4, "mixture", "scalar", top_k=2)
    w.fit(p.log(), gold, steps=150, lr=0.05)
    assert w.active_experts().tolist() == [0, 2]


def test_hyper_network_scores_subsets_from_their_features():
    lm = _tiny_lm(2)
    subsets = [torch.tensor([3, 4]), torch.tensor([5, 6, 7])]
    features = subset_features(lm, subsets)
    assert features.shape == (2, 16)
    w = MoICLWeights(2, "mixture", "hyper", features=16)
    assert math.isclose(w.weights(features).sum().item(), 1.0, rel_tol=1e-6)
    logp, gold = _experts_with_a_liar(k=2, liar=1)
    w.fit(logp, gold, features=features, steps=100, lr=0.05)
    assert w.weights(features)[1] < w.weights(features)[0]
