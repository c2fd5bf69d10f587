"""Reproduction of 2410.08193: reward-guided decoding with an autoregressive reward model.

A synthetic preference with a programmatic ground truth: on the cached small reasoner,
a correct completion (the exact verifier `is_correct`) is preferred to a wrong one.
Preference pairs come from the base reasoner's own samples on *training* problems (one
correct and one wrong completion of the same problem). The ARM is a copy of the base
reasoner (the paper's ARMs are initialised from the base family), trained briefly with
the GenARM loss (beta_r = 0.1). On held-out problems we then compare, against the base
model's own samples (temperature 1):

- GenARM, alpha = beta_r / beta = 1 (the official README's default), one sample each;
- a control with the *untrained* ARM at the same alpha: pi_base^2 renormalised, i.e. the
  base at temperature 1/2, so any gain of GenARM over it comes from the learned reward
  and not from sharpening alone;
- best-of-N over base samples scored by a whole-sequence reward, the same trained ARM's
  beta_r sum_t log pi_r (so both methods use one reward model and differ only in how they
  use it), N = 1 ... N_max, with model-token evaluations and wall time per answer.

Compute: GenARM evaluates two models once per generated token; best-of-N generates N
responses and scores each once. "Matched compute" is N = 2, the smallest N that selects
at all, which already costs at least GenARM's two model evaluations per token.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from paperzoo.core.experiment import Claim, ExperimentError, Outcome, RunContext
from paperzoo.core.reasoning import is_correct, problems, reasoner
from paperzoo.core.sampling import sample
from paperzoo.decoding.genarm_reward_decoding import (
    genarm_generate,
    sequence_reward,
    train_arm,
)

MATCHED_N = 2


def win_rate(guided: list[bool], base: list[bool]) -> float:
    """Ground-truth win rate of paired samples: P(guided right, base wrong) + P(tie) / 2."""
    if len(guided) != len(base) or not guided:
        raise ValueError("win_rate needs two equally long, non-empty lists")
    g, b = np.asarray(guided, bool), np.asarray(base, bool)
    return float(np.mean((g & ~b) + 0.5 * (g == b)))


def checks(m: dict) -> dict[str, bool | None]:
    acc = m["accuracy"]
    return {
        "GenARM beats the base model's samples (ground-truth win rate > 50%)": m["win_rate"] > 0.5,
        "GenARM beats the same decoding with an untrained ARM (gain is from the learned reward)":
            acc["genarm"] > acc["sharpened_control"],
        f"GenARM at least as accurate as best-of-{MATCHED_N} with the same reward model (matched compute)":
            acc["genarm"] >= m["best_of_n"]["matched"]["accuracy"],
    }


CLAIM = Claim(
    statement=(
        "Sampling from pi_base * pi_r^(beta_r/beta), with pi_r an autoregressive reward model trained "
        "on preference pairs (token reward beta_r log pi_r), aligns a frozen base model at test time: on "
        "HH-RLHF and PKU-SafeRLHF it 'significantly outperforms prior test-time alignment baselines' "
        "(ARGS, Transfer-Q*, controlled decoding) in judged win rate against the base and "
        "'matches the performance of training-time methods' (DPO), at the cost of one extra forward pass "
        "per token rather than scoring many full responses; a 7B ARM improves a 70B base (weak-to-strong)."
    ),
    predicate=(
        "Small reasoner, preference = correct over wrong (exact verifier), ARM = copy of the base "
        "trained with the GenARM loss (beta_r = 0.1), alpha = 1, held-out problems: (1) GenARM's "
        "ground-truth win rate against the base's temperature-1 samples (ties half) is above 50%; "
        "(2) GenARM's accuracy is above that of the same decoding with the untrained ARM (the base "
        "sharpened to temperature 1/2); (3) GenARM's accuracy is at least best-of-2's (base samples "
        "ranked by the same ARM's summed log-probability), which costs at least as many model "
        "evaluations per token."
    ),
    checks=checks,
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ()
SUBSTRATE = ('reasoner',)

SCALES = {
    "smoke": {"reasoner": "smoke", "train_problems": 8, "pair_samples": 4, "pairs_per_problem": 2,
              "beta_r": 0.1, "arm_steps": 3, "arm_batch": 4, "arm_lr": 3e-4, "alpha": 1.0,
              "test_problems": 4, "samples": 2, "best_of": 4, "max_new_tokens": 40},
    "small": {"reasoner": "small", "train_problems": 128, "pair_samples": 8, "pairs_per_problem": 2,
              "beta_r": 0.1, "arm_steps": 200, "arm_batch": 16, "arm_lr": 3e-4, "alpha": 1.0,
              "test_problems": 64, "samples": 4, "best_of": 16, "max_new_tokens": 80},
}


def preference_pairs(model, tok, qs, k: int, per_problem: int, max_new_tokens: int, seed: int):
    """(prompt, correct, wrong) triples from k base samples per problem; problems without both kinds give none."""
    pool = sample(model, tok, [q.prompt for q in qs], num_samples=k, max_new_tokens=max_new_tokens, seed=seed)
    pairs = []
    for i, q in enumerate(qs):
        right = [s.text for s in pool[i * k:(i + 1) * k] if is_correct(q, s.text)]
        wrong = [s.text for s in pool[i * k:(i + 1) * k] if not is_correct(q, s.text) and s.tokens]
        pairs += [(q.prompt, w, l) for w, l in list(zip(right, wrong))[:per_problem]]
    return pairs, float(np.mean([is_correct(qs[s.prompt_index], s.text) for s in pool]))


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    if ctx.model is not None:
        raise ExperimentError("genarm-reward-decoding runs on paperzoo's reasoner and its tasks; --model is not supported")
    r = reasoner(s["reasoner"], seed=0)
    base, tok = r.model, r.tokenizer
    T = s["max_new_tokens"]

    # (a) preference pairs on training problems, and the ARM trained on them
    train_qs = problems(s["train_problems"], "train", seed=ctx.seed + 100)
    pairs, pair_pool_accuracy = preference_pairs(base, tok, train_qs, s["pair_samples"], s["pairs_per_problem"],
                                                 T, ctx.seed)
    if not pairs:
        pairs = [(q.prompt, q.solution, "</think>Answer: 0") for q in train_qs]  # smoke model: never both kinds
    untrained = copy.deepcopy(base)
    arm = copy.deepcopy(base)
    start = time.perf_counter()
    losses = train_arm(arm, tok, pairs, beta_r=s["beta_r"], steps=s["arm_steps"], batch_size=s["arm_batch"],
                       lr=s["arm_lr"], seed=ctx.seed)
    arm_seconds = time.perf_counter() - start

    # (b) held-out problems: base samples (also the best-of-N pool), GenARM, and the control
    qs = problems(s["test_problems"], "test", seed=ctx.seed)
    K, N = s["samples"], s["best_of"]
    start = time.perf_counter()
    pool = sample(base, tok, [q.prompt for q in qs], num_samples=N, max_new_tokens=T, seed=ctx.seed + 1)
    pool_seconds = time.perf_counter() - start
    pool_right = np.array([is_correct(qs[x.prompt_index], x.text) for x in pool]).reshape(len(qs), N)
    pool_tokens = np.array([x.num_tokens for x in pool]).reshape(len(qs), N)
    start = time.perf_counter()
    rewards = sequence_reward(arm, tok, [qs[x.prompt_index].prompt for x in pool], [x.text for x in pool],
                              beta_r=s["beta_r"]).numpy().reshape(len(qs), N)
    score_seconds = time.perf_counter() - start

    prompts = [q.prompt for q in qs for _ in range(K)]
    guided = genarm_generate(base, arm, tok, prompts, alpha=s["alpha"], max_new_tokens=T, seed=ctx.seed + 2)
    control = genarm_generate(base, untrained, tok, prompts, alpha=s["alpha"], max_new_tokens=T, seed=ctx.seed + 2)
    g_right = [is_correct(qs[i // K], g.text) for i, g in enumerate(guided)]
    c_right = [is_correct(qs[i // K], g.text) for i, g in enumerate(control)]
    b_right = pool_right[:, :K].reshape(-1).tolist()  # the first K base samples, paired with GenARM's
    firsts = guided[::64]  # genarm_generate's batches of 64: each Generation carries its batch's cost
    genarm_wall = sum(g.wall_seconds for g in firsts)
    genarm_tokens = float(np.mean([g.num_tokens for g in guided]))

    # best-of-N for N = 1, 2, 4, ...: the first N pool samples, the highest sequence reward wins
    per_sample_wall = (pool_seconds + score_seconds) / pool_right.size
    curve = []
    for n in [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= N]:
        pick = rewards[:, :n].argmax(1)
        curve.append({"N": n, "accuracy": float(pool_right[np.arange(len(qs)), pick].mean()),
                      "model_token_evals": float(2 * pool_tokens[:, :n].sum(1).mean()),
                      "wall_seconds_per_answer": n * per_sample_wall})
    matched = next((c for c in curve if c["N"] == MATCHED_N), curve[-1])
    equal = next((c for c in curve if c["accuracy"] >= float(np.mean(g_right))), None)

    right_rewards = rewards[pool_right]
    wrong_rewards = rewards[~pool_right]
    within = [(a > b) + 0.5 * (a == b) for i in range(len(qs)) for a in rewards[i][pool_right[i]]
              for b in rewards[i][~pool_right[i]]]
    metrics = {
        "model": r.name,
        "pairs": len(pairs),
        "pair_pool_accuracy": pair_pool_accuracy,
        "arm_loss_first": losses[0], "arm_loss_last": float(np.mean(losses[-10:])),
        "arm_train_seconds": arm_seconds,
        "arm_pairwise_accuracy_heldout": float(np.mean(within)) if within else None,
        "problems": len(qs), "samples_per_problem": K,
        "accuracy": {"base": float(np.mean(b_right)), "genarm": float(np.mean(g_right)),
                     "sharpened_control": float(np.mean(c_right))},
        "win_rate": win_rate(g_right, b_right),
        "win_rate_vs_control": win_rate(g_right, c_right),
        "genarm": {"tokens_per_answer": genarm_tokens, "model_token_evals": 2 * genarm_tokens,
                   "base_forward_calls": sum(g.stats["base_forward_passes"] for g in firsts),
                   "arm_forward_calls": sum(g.stats["arm_forward_passes"] for g in firsts),
                   "wall_seconds_per_answer": genarm_wall / len(guided)},
        "best_of_n": {"curve": curve, "matched": matched,
                      "N_to_match_genarm": equal["N"] if equal else None},
        "reward_correct_mean": float(right_rewards.mean()) if right_rewards.size else None,
        "reward_wrong_mean": float(wrong_rewards.mean()) if wrong_rewards.size else None,
        "arm_losses": [round(x, 4) for x in losses],
    }
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    ax, loss = fig.subplots(1, 2, width_ratios=[1.4, 1])
    curve = m["best_of_n"]["curve"]
    ax.plot([c["model_token_evals"] for c in curve], [c["accuracy"] for c in curve], "-o", color="tab:grey",
            label="best-of-N, ARM sequence reward")
    for c in curve:
        ax.annotate(f"N={c['N']}", (c["model_token_evals"], c["accuracy"]), fontsize=6, textcoords="offset points",
                    xytext=(2, -9))
    g = m["genarm"]["model_token_evals"]
    ax.plot([g], [m["accuracy"]["genarm"]], "*", ms=14, color="tab:red", label="GenARM (alpha = 1)")
    ax.plot([g], [m["accuracy"]["sharpened_control"]], "D", color="tab:blue", label="untrained ARM (base at T=1/2)")
    ax.axhline(m["accuracy"]["base"], ls="--", color="black", lw=0.8, label="base samples (T=1)")
    ax.set(xscale="log", xlabel="model-token evaluations per answer", ylabel="accuracy (ground truth)",
           title=f"GenARM vs best-of-N ({m['problems']} held-out problems; win rate {m['win_rate']:.2f})")
    ax.legend(fontsize=7)
    loss.plot(m["arm_losses"], color="tab:purple")
    loss.set(xlabel="step", ylabel="GenARM loss", title=f"ARM training ({m['pairs']} pairs)")
