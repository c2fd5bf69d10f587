"""Reproduction of 2412.15287 (BoN-aware fine-tuning): Best-of-N accuracy after ordinary vs BoN-aware RL.

The cached small reasoner is fine-tuned three ways from the same start, with the same
training problems, the same number of steps and the same samples per step (k per
problem, temperature 1, exact verifier):

- RFT: rejection-sampling fine-tuning, log-likelihood of the verified-correct samples;
- RL: the paper's binary-reward estimator with N = 1 (ordinary policy gradient on log p);
- BoN-RLB: the same estimator with N = `train_N` (the paper's BoN-aware fine-tuning).

Each model, and the untouched reasoner, is then sampled `eval_samples` times per
held-out problem; with an exact verifier, BoN accuracy at N is pass@N, computed
with the unbiased estimator. Linear equations only: the reasoner is right on them
often enough (about a third of greedy answers) for RL to have a signal.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from paperzoo.core.experiment import Claim, ExperimentError, Outcome, RunContext
from paperzoo.core.reasoning import extract_answer, is_correct, problems, reasoner
from paperzoo.core.sampling import sample
from paperzoo.decoding.bon_aware_finetuning import (
    bon_rlb_weights,
    pass_at_k,
    rejection_sampling_weights,
    weighted_finetune_step,
)

ARMS = ("RFT", "RL (N=1)", "BoN-RLB")


def checks(m: dict) -> dict[str, bool | None]:
    acc = m["bon_accuracy"]
    top = str(max(m["eval_N"]))
    bon, rl, rft = acc["BoN-RLB"], acc["RL (N=1)"], acc["RFT"]
    low = str(min(m["eval_N"]))
    return {
        f"BoN-aware fine-tuning beats both ordinary fine-tunings at BoN@{top}": bon[top] > max(rl[top], rft[top]),
        f"its advantage over ordinary RL is larger at N={top} than at N={low}":
            bon[top] - rl[top] > bon[low] - rl[low],
    }


CLAIM = Claim(
    statement=(
        "Fine-tuning for the Best-of-N inference policy (BoN-aware SFT/RL, whose gradients reweight samples by "
        "how much they help BoN rather than a single sample) improves BoN performance over ordinary fine-tuning: "
        "Gemma 2B on Hendrycks MATH goes from 26.8% to 30.8% Bo32 and from 60.0% to 67.0% pass@32, and "
        "HumanEval pass@16 from 61.6% to 67.1%; the BoN-aware model learns a meta-strategy that trades some "
        "single-sample accuracy for diversity that BoN exploits."
    ),
    predicate=(
        "Small reasoner, held-out linear equations, exact verifier (BoN@N = pass@N, unbiased estimator from "
        "16 samples per problem). After the same number of steps on the same problems with the same samples "
        "per step: (1) BoN-RLB (N=16) has higher BoN@16 than both rejection-sampling fine-tuning and ordinary "
        "RL (the same estimator at N=1); (2) its advantage over ordinary RL is larger at N=16 than at N=1."
    ),
    checks=checks,
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ()
SUBSTRATE = ('reasoner',)

SCALES = {
    "smoke": {"reasoner": "smoke", "train_problems": 8, "problems_per_step": 2, "k": 4, "steps": 2,
              "train_N": 4, "lr": 1e-4, "test_problems": 4, "eval_samples": 4, "eval_N": [1, 4],
              "max_new_tokens": 24},
    "small": {"reasoner": "small", "train_problems": 512, "problems_per_step": 16, "k": 8, "steps": 16,
              "train_N": 16, "lr": 2e-4, "test_problems": 96, "eval_samples": 16, "eval_N": [1, 4, 16],
              "max_new_tokens": 40},
}


def _weights(arm: str, correct: torch.Tensor, train_N: int) -> torch.Tensor:
    if arm == "RFT":
        return rejection_sampling_weights(correct)
    return bon_rlb_weights(correct, 1 if arm == "RL (N=1)" else train_N)


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    if ctx.model is not None:
        raise ExperimentError("bon-aware-finetuning runs on paperzoo's reasoner and its tasks; --model is not supported")
    r = reasoner(s["reasoner"], seed=0)
    tok = r.tokenizer
    kinds = ["linear_equation"]
    train_qs = problems(s["train_problems"], "train", seed=ctx.seed, kinds=kinds)
    test_qs = problems(s["test_problems"], "test", seed=ctx.seed, kinds=kinds)
    G, k = s["problems_per_step"], s["k"]
    batches = [np.random.default_rng(ctx.seed * 1000 + step).choice(len(train_qs), G, replace=False)
               for step in range(s["steps"])]

    models = {"base": r.model}
    history: dict[str, list[dict]] = {}
    for arm in ARMS:
        model = copy.deepcopy(r.model)
        opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
        history[arm] = []
        for step, idx in enumerate(batches):
            qs = [train_qs[i] for i in idx]
            samples = sample(model, tok, [q.prompt for q in qs], num_samples=k, temperature=1.0,
                             max_new_tokens=s["max_new_tokens"], seed=ctx.seed * 1000 + step, batch_size=128)
            correct = torch.tensor([float(is_correct(qs[x.prompt_index], x.text)) for x in samples]).view(G, k)
            w = _weights(arm, correct, s["train_N"]).flatten()
            prompt_ids = [tok(qs[x.prompt_index].prompt, add_special_tokens=False)["input_ids"] for x in samples]
            loss = weighted_finetune_step(model, opt, prompt_ids, [x.tokens for x in samples], w, tok.eos_token_id)
            history[arm].append({"step": step, "sample_accuracy": float(correct.mean()), "loss": loss,
                                 "informative_problems": int(((correct.mean(1) > 0) & (correct.mean(1) < 1)).sum())})
        models[arm] = model

    n = s["eval_samples"]
    bon_accuracy, mean_tokens, distinct_answers = {}, {}, {}
    for name, model in models.items():
        evals = sample(model, tok, [q.prompt for q in test_qs], num_samples=n, temperature=1.0,
                       max_new_tokens=s["max_new_tokens"], seed=ctx.seed + 12345, batch_size=128)
        c = np.zeros(len(test_qs), dtype=int)
        for x in evals:
            c[x.prompt_index] += is_correct(test_qs[x.prompt_index], x.text)
        bon_accuracy[name] = {str(N): float(np.mean([pass_at_k(n, int(ci), N) for ci in c])) for N in s["eval_N"]}
        mean_tokens[name] = float(np.mean([x.num_tokens for x in evals]))
        answers: list[set] = [set() for _ in test_qs]  # diversity BoN can exploit
        for x in evals:
            answers[x.prompt_index].add(extract_answer(x.text))
        distinct_answers[name] = float(np.mean([len(a) for a in answers]))

    metrics = {
        "model": r.name,
        "train_problems": len(train_qs),
        "test_problems": len(test_qs),
        "eval_N": s["eval_N"],
        "train_N": s["train_N"],
        "bon_accuracy": bon_accuracy,
        "mean_completion_tokens": mean_tokens,
        "distinct_answers_per_problem": distinct_answers,
        "training": history,
    }
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    ax, tr = fig.subplots(1, 2)
    Ns = m["eval_N"]
    for name, colour in zip(["base", *ARMS], ["tab:grey", "tab:green", "tab:blue", "tab:red"]):
        ax.plot(Ns, [m["bon_accuracy"][name][str(N)] for N in Ns], "-o", color=colour, label=name)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="N (samples BoN chooses among; exact verifier)", ylabel="BoN accuracy (= pass@N)",
           title=f"Held-out linear equations ({m['test_problems']} problems)")
    ax.legend(fontsize=8)
    for arm, colour in zip(ARMS, ["tab:green", "tab:blue", "tab:red"]):
        h = m["training"][arm]
        tr.plot([x["step"] for x in h], [x["sample_accuracy"] for x in h], "-", color=colour, label=arm)
    tr.set(xlabel="fine-tuning step", ylabel="accuracy of the step's samples", title="Training samples")
    tr.legend(fontsize=8)
