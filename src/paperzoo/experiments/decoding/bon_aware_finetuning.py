"""Reproduction of 2412.15287 (BoN-aware fine-tuning): Best-of-N accuracy after ordinary vs BoN-aware RL.

The cached small reasoner is fine-tuned three ways from the same start, with the same
training problems, the same number of steps and the same samples per step (k per
problem, temperature 1, exact verifier):

- RFT: rejection-sampling fine-tuning, log-likelihood of the verified-correct samples;
- RL (N=1): the paper's binary-reward estimator at N = 1, i.e. ordinary policy gradient
  on one sample's success (the control);
- BoN-RLB: the same estimator at N = `train_N` (the paper's BoN-aware fine-tuning):
  samples weighted as draws from the best-of-N policy, g+ = N p_f^(N-1)/(1 - p_f^N) on
  correct ones and -g- = -N p_f/(1 - p_f) on wrong ones.

Each model, and the untouched reasoner, is then sampled `eval_samples` times per
held-out problem; with an exact verifier, BoN accuracy at N is pass@N, computed
with the unbiased estimator. Problems: the tiers of the reasoner's ladder on which its own
best-of-16 accuracy (pass@16 at temperature 1, read from the reasoner's card before anything
runs, `reasoner.tiers_between`) lies in [0.1, 0.9], so that BoN@16 has room to move both ways
and RL has a signal (some samples right, some wrong), as in the paper's MATH setting (Gemma 2B:
pass@32 60%). Until 2026-12-06 the tiers were chosen on pass@1 in [0.1, 0.9]; on the v5 reasoner
that took tiers 0-2 (pass@16 1.00, 0.98, 0.77) and left the base's BoN@16 at its ceiling in two
seeds of three (the second precondition below), so the rule moved to the statistic the claim is
about. On v5 it now takes tiers 2 and 3 (pass@16 0.77 and 0.51; pass@1 0.16 and 0.08), whose
traces are longer. (Until issue 10: the version-1 reasoner's linear equations.) Up to 640
new tokens, enough for the longest trace the reasoner was trained on (verbose, reflective,
hardest tier: about 560).

How the set-up's hyper-parameters were chosen (from the control only):

- The learning rate is chosen by a rule in code (`paperzoo.core.experiment.choose_on_control`) on the
  RL (N=1) control alone: the largest rate in `lr_grid` at which the control,
  trained exactly as the arms are, is not clearly below the base reasoner in pass@1
  on `calibration_problems` held-out problems that are not test problems (paired
  bootstrap over problems). The control trained at the chosen rate *is* the RL (N=1)
  arm. If no rate passes, the smallest is used and the precondition below will say so.
- Steps, problems per step, k = 8 samples per problem and temperature 1 were fixed
  before the first run; train_N = 16 equals the largest N evaluated (the BoN the
  fine-tune is meant for). For the v2 reasoner, whose traces are several times longer,
  the sizes were cut for CPU time (a seed took over 17 minutes): 12 steps of 8 problems
  (was 16 of 16), 48 test and 48 calibration problems (was 96 and 64), and the grid
  starts at 1e-4, since 3e-4 degraded the control in every seed of the version-1 run.

Preconditions (any not met makes the verdict inconclusive):

- the RL (N=1) control does not degrade the base: its pass@1 on the test problems is
  not below the base's beyond the paired bootstrap interval. A fine-tune that makes the
  reasoner worse than it was tests the substrate's fragility, not the paper;
- the base is off its floor and ceiling at the largest N: BoN@16 is strictly between
  0 and 1 beyond its bootstrap interval, so that an improvement can be seen.

Earlier predicate (landed with the first version; verdict `not-reproduced`, seed 0,
small: BoN-RLB .729 at BoN@16 against .781 and .740 for the two ordinary fine-tunes, and every
fine-tune below the base):
"(1) BoN-RLB (N=16) has higher BoN@16 than both rejection-sampling fine-tuning and
ordinary RL; (2) its advantage over ordinary RL is larger at N=16 than at N=1", checked
as bare comparisons of two means. Why it changed: (a) the weights were our own
derivation for the *logarithm* of the BoN success probability (g = N q^(N-1)/(1-q^N)
times r - p, samples from pi); the paper samples from the BoN policy with weights g+
and g- above, aimed at 1 - q^N itself (their mean update on a problem is a positive
multiple of the gradient of 1 - q^N; see the method module); the method now follows the paper;
(b) comparisons now need a paired bootstrap interval over problems to clear zero, and
an interval that straddles zero leaves a check undecided; (c) the comparisons are only
judged where the RL control did not degrade the base (a precondition), since every
arm falling below the base said nothing about BoN-awareness.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from paperzoo.core.experiment import Claim, Outcome, RunContext, choose_on_control
from paperzoo.core.margins import bootstrap_mean, decided, paired_difference
from paperzoo.core.reasoning import extract_answer, is_correct
from paperzoo.core.reasoner import problems, reasoner, tiers_between
from paperzoo.core.sampling import sample
from paperzoo.decoding.bon_aware_finetuning import (
    bon_rlb_weights,
    pass_at_k,
    rejection_sampling_weights,
    weighted_finetune_step,
)

ARMS = ("RFT", "RL (N=1)", "BoN-RLB")
CONTROL = "RL (N=1)"



def _per_problem(m: dict, arm: str, N) -> list[float]:
    return m["per_problem_bon"][arm][str(N)]


def preconditions(m: dict) -> dict[str, bool | None]:
    top = str(max(m["eval_N"]))
    control = paired_difference(_per_problem(m, CONTROL, 1), _per_problem(m, "base", 1))
    base_top = bootstrap_mean(_per_problem(m, "base", top))
    return {
        "the RL (N=1) control does not degrade the base (pass@1 not below it beyond the bootstrap interval)":
            control.high >= 0,
        f"the base is off its floor and ceiling at BoN@{top} (bootstrap interval inside (0, 1))":
            base_top.low > 0 and base_top.high < 1,
    }


def checks(m: dict) -> dict[str, bool | None]:
    top, low = str(max(m["eval_N"])), str(min(m["eval_N"]))
    bon = _per_problem(m, "BoN-RLB", top)
    vs = [decided(paired_difference(bon, _per_problem(m, arm, top))) for arm in ("RL (N=1)", "RFT")]
    beats = True if all(v is True for v in vs) else False if any(v is False for v in vs) else None
    gap = (np.asarray(bon) - _per_problem(m, "RL (N=1)", top)) \
        - (np.asarray(_per_problem(m, "BoN-RLB", low)) - _per_problem(m, "RL (N=1)", low))
    return {
        f"BoN-aware fine-tuning beats both ordinary fine-tunings at BoN@{top} (paired bootstrap over problems)": beats,
        f"its advantage over ordinary RL is larger at N={top} than at N={low} (paired bootstrap over problems)":
            decided(bootstrap_mean(gap)),
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
        "Small reasoner, held-out problems of the ladder tiers where its pass@16 is in [0.1, 0.9], exact verifier (BoN@N = pass@N, unbiased estimator from "
        "16 samples per problem). After the same number of steps on the same problems with the same samples "
        "per step and the learning rate chosen on the RL control: (1) BoN-RLB (N=16, the paper's g+/g- weights "
        "on draws from the BoN policy) has higher BoN@16 than both rejection-sampling fine-tuning and ordinary RL "
        "(the same estimator at N=1), each paired bootstrap interval over problems above zero; (2) its advantage "
        "over ordinary RL is larger at N=16 than at N=1 (interval above zero). An interval straddling zero leaves "
        "a check undecided. Judged only if the RL control does not degrade the base and the base's BoN@16 is off "
        "its floor and ceiling."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv:2412.15287, §4 (BoN-RL; BoN-RL with binary reward, the g+ and g- weights, and the positive-only "
            "BoN-RLB(P)); abstract and Table results for the Bo32 / pass@32 / pass@16 numbers"),
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ()
SUBSTRATE = ('reasoner',)
SEED_VARIES = ("the training, calibration and test problems drawn, the order of the training batches, and every "
               "sampling seed (training samples and evaluation samples); the reasoner is the shared cached one")

SCALES = {
    "smoke": {"reasoner": "smoke", "train_problems": 8, "problems_per_step": 2, "k": 4, "steps": 2,
              "train_N": 4, "lr_grid": [1e-4, 3e-5], "calibration_problems": 4, "calibration_samples": 2,
              "test_problems": 4, "eval_samples": 4, "eval_N": [1, 4], "max_new_tokens": 24,
              "pass@16_range": [0.1, 0.9]},
    "small": {"reasoner": "small", "train_problems": 384, "problems_per_step": 8, "k": 8, "steps": 12,
              "train_N": 16, "lr_grid": [1e-4, 3e-5], "calibration_problems": 48, "calibration_samples": 8,
              "test_problems": 48, "eval_samples": 16, "eval_N": [1, 4, 16], "max_new_tokens": 640,
              "pass@16_range": [0.1, 0.9]},
}


def _weights(arm: str, correct: torch.Tensor, train_N: int) -> torch.Tensor:
    if arm == "RFT":
        return rejection_sampling_weights(correct)
    return bon_rlb_weights(correct, 1 if arm == CONTROL else train_N)


def fine_tune(arm: str, base, tok, train_qs, batches, s: dict, lr: float, seed: int):
    """One arm: a copy of the base trained for len(batches) steps; returns (model, history)."""
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    G, k, history = s["problems_per_step"], s["k"], []
    for step, idx in enumerate(batches):
        qs = [train_qs[i] for i in idx]
        samples = sample(model, tok, [q.prompt for q in qs], num_samples=k, temperature=1.0,
                         max_new_tokens=s["max_new_tokens"], seed=seed * 1000 + step, batch_size=128)
        correct = torch.tensor([float(is_correct(qs[x.prompt_index], x.text)) for x in samples]).view(G, k)
        w = _weights(arm, correct, s["train_N"]).flatten()
        prompt_ids = [tok(qs[x.prompt_index].prompt, add_special_tokens=False)["input_ids"] for x in samples]
        loss = weighted_finetune_step(model, opt, prompt_ids, [x.tokens for x in samples], w, tok.eos_token_id)
        history.append({"step": step, "sample_accuracy": float(correct.mean()), "loss": loss,
                        "problems_with_a_correct_sample": int((correct.sum(1) > 0).sum())})
    return model, history


def correct_counts(model, tok, qs, n: int, max_new_tokens: int, seed: int) -> np.ndarray:
    """Correct samples out of n, per problem."""
    out = sample(model, tok, [q.prompt for q in qs], num_samples=n, temperature=1.0,
                 max_new_tokens=max_new_tokens, seed=seed, batch_size=128)
    c = np.zeros(len(qs), dtype=int)
    for x in out:
        c[x.prompt_index] += is_correct(qs[x.prompt_index], x.text)
    return c



def _r5(values) -> list[float]:
    return [float(f"{v:.5g}") for v in values]


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    r = reasoner(s["reasoner"], seed=0)
    tok = r.tokenizer
    tiers = tiers_between(r, *s["pass@16_range"], statistic="pass@16")
    train_qs = problems(s["train_problems"], "train", seed=ctx.seed, tiers=tiers)
    held_out = problems(s["test_problems"] + s["calibration_problems"], "test", seed=ctx.seed, tiers=tiers)
    test_qs, cal_qs = held_out[: s["test_problems"]], held_out[s["test_problems"]:]
    G = s["problems_per_step"]
    batches = [np.random.default_rng(ctx.seed * 1000 + step).choice(len(train_qs), G, replace=False)
               for step in range(s["steps"])]

    n_cal = s["calibration_samples"]
    base_p1 = correct_counts(r.model, tok, cal_qs, n_cal, s["max_new_tokens"], ctx.seed + 777) / n_cal

    def control_not_degraded(result):  # the RL (N=1) control is not clearly below the base in pass@1
        p1 = correct_counts(result[0], tok, cal_qs, n_cal, s["max_new_tokens"], ctx.seed + 777) / n_cal
        iv = paired_difference(p1, base_p1)
        return iv.high >= 0, {"control_minus_base_pass1": iv.as_dict()}

    lr, (control, control_history), tried = choose_on_control(
        s["lr_grid"], lambda lr: fine_tune(CONTROL, r.model, tok, train_qs, batches, s, lr, ctx.seed),
        control_not_degraded)
    models, history = {"base": r.model, CONTROL: control}, {CONTROL: control_history}
    for arm in ARMS:
        if arm != CONTROL:
            models[arm], history[arm] = fine_tune(arm, r.model, tok, train_qs, batches, s, lr, ctx.seed)

    n = s["eval_samples"]
    bon_accuracy, per_problem, mean_tokens, distinct_answers = {}, {}, {}, {}
    for name, model in models.items():
        evals = sample(model, tok, [q.prompt for q in test_qs], num_samples=n, temperature=1.0,
                       max_new_tokens=s["max_new_tokens"], seed=ctx.seed + 12345, batch_size=128)
        c = np.zeros(len(test_qs), dtype=int)
        for x in evals:
            c[x.prompt_index] += is_correct(test_qs[x.prompt_index], x.text)
        per_problem[name] = {str(N): _r5(pass_at_k(n, int(ci), N) for ci in c) for N in s["eval_N"]}
        bon_accuracy[name] = {N: float(np.mean(v)) for N, v in per_problem[name].items()}
        mean_tokens[name] = float(np.mean([x.num_tokens for x in evals]))
        answers: list[set] = [set() for _ in test_qs]  # diversity BoN can exploit
        for x in evals:
            answers[x.prompt_index].add(extract_answer(x.text))
        distinct_answers[name] = float(np.mean([len(a) for a in answers]))

    metrics = {
        "model": r.name,
        "train_problems": len(train_qs),
        "test_problems": len(test_qs),
        "tiers": tiers,
        "calibration_problems": len(cal_qs),
        "eval_N": s["eval_N"],
        "train_N": s["train_N"],
        "lr": lr,
        "lr_calibration": tried,
        "bon_accuracy": bon_accuracy,
        "per_problem_bon": per_problem,
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
           title=f"Held-out problems, tiers {m.get('tiers')} ({m['test_problems']} problems), lr {m['lr']:g}")
    ax.legend(fontsize=8)
    for arm, colour in zip(ARMS, ["tab:green", "tab:blue", "tab:red"]):
        h = m["training"][arm]
        tr.plot([x["step"] for x in h], [x["sample_accuracy"] for x in h], "-", color=colour, label=arm)
    tr.set(xlabel="fine-tuning step", ylabel="accuracy of the step's samples", title="Training samples")
    tr.legend(fontsize=8)
