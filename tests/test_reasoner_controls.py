"""The reasoner's fine-tuning controls (issue 10, A.7): RLOO's leave-one-out advantage and update, the cached card."""

import copy

import pytest
import torch

import paperzoo.core.reasoner_controls as C
from paperzoo.core.reasoner import problems, reasoner
from paperzoo.core.sampling import completion_logprobs


def test_rloo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # sample 0: 1 - mean(0, 0, 1) = 2/3; sample 1: 0 - mean(1, 0, 1) = -2/3
    torch.testing.assert_close(C.rloo_advantages(r), torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0] * 4]))
    assert torch.allclose(C.rloo_advantages(torch.rand(5, 3)).sum(-1), torch.zeros(5), atol=1e-6)
    with pytest.raises(ValueError):
        C.rloo_advantages(torch.ones(2, 1))


def test_rloo_step_raises_the_rewarded_sample_and_lowers_the_others(monkeypatch):
    """Reward the first of each problem's k samples only: one step makes it likelier and the rest less likely."""
    r = reasoner("smoke")
    model, tok = copy.deepcopy(r.model), r.tokenizer
    qs = problems(2, "train", seed=3)
    drawn = []
    real_sample = C.sample

    def remember(*args, **kwargs):
        out = real_sample(*args, **kwargs)
        drawn.extend(out)
        return out

    calls = iter(range(10_000))
    monkeypatch.setattr(C, "sample", remember)
    monkeypatch.setattr(C, "is_correct", lambda q, text: next(calls) % 4 == 0)  # the first of k = 4

    def logps(m):
        prompts = [tok(qs[x.prompt_index].prompt, add_special_tokens=False)["input_ids"] for x in drawn]
        with torch.no_grad():
            return completion_logprobs(m, prompts, [x.tokens or [tok.eos_token_id] for x in drawn],
                                       tok.eos_token_id)[0].view(2, 4)

    C.rloo_step(model, torch.optim.SGD(model.parameters(), lr=0.05), tok, qs, k=4, max_new_tokens=8, seed=0)
    before, after = logps(r.model), logps(model)  # the untouched reasoner, and the copy after one step
    assert (after[:, 0] > before[:, 0]).all() and (after[:, 1:] < before[:, 1:]).all()


def test_controls_measure_and_cache_at_smoke(tmp_path, monkeypatch):
    from paperzoo.core import substrate

    controls = C.reasoner_controls("smoke")
    for name in ("sft", "rloo"):
        c = controls[name]
        assert set(c["greedy"]) == {"before", "after", "difference"} and isinstance(c["keeps_or_raises"], bool)
        assert c["greedy"]["before"] == controls["base"]["greedy"]
    assert len(controls["rloo"]["reward_by_step"]) == C.CONTROLS["smoke"].rl_steps
    card = substrate.card("reasoner-controls", "smoke")  # read from the cache, nothing measured again
    assert card["controls"] == controls and len(card["targets"]) == 2
