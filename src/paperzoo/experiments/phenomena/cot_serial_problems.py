"""Reproduction of 2402.12875: a chain of thought lets a shallow transformer solve a serial word problem it cannot answer directly.

The paper's claim (abstract; its Sec. 5 experiments): without a chain of thought a
constant-depth transformer is confined to parallel computation (AC0 at constant precision,
Theorem 3.1), while T steps of CoT let it simulate a size-T circuit (Theorem 3.3), so the
composition of permutations in S5, a non-solvable group whose word problem is NC1-complete,
becomes solvable; empirically "enabling CoT dramatically improves the accuracy for tasks that
are hard for parallel computation, including the composition of permutation groups ...,
especially for low-depth transformers". Its parallel control is modular addition (C_7): a
third-party summary of Sec. 5 reports that there depth 1 suffices without CoT (the paper's
own Sec. 5 text, figures and training budget could not be read from this machine, so the
numbers are not quoted). The issue's predicate (issue 11, B.2): 1-2 layer transformers,
lengths 8-32; on S5 answer-only falls toward chance with length while CoT stays >= 90%; on
modular addition the gap is small; negative if CoT does not beat answer-only on S5 at
length >= 16.

Set-up (`paperzoo.phenomena.cot_serial_problems.cot_gap`): per group (S5 and Z7) one
chain-of-thought model on words of the longest length L (``g_1 s_1 .. g_L s_L``, read back
from its own greedy chain) and one answer-only model per length l (``<start> g_1 .. g_l``,
only s_l scored), all one-layer, four-head HF Llama decoders of width 64 (MLP 256), AdamW at
3e-3, 20 warm-up steps, cosine decay, batch 64; 6,000 steps for every answer-only model and
2,000 for the chains (12,000 and 4,000 at `large`). Every model of a group is tested on the
prefixes of the same 1,024 held-out words, so the chain and the answer-only model at length l
are compared word by word (paired bootstrap).

How the set-up was chosen (looking only at the Z7 answer-only control and at the chains; the
S5 answer-only models were seen once, in the first seed-0 run below, where they were already
at chance, 0.013 and 0.007, and every check passed: the budget was then raised because the
control's precondition failed, not for the checks):

- Plain answer-only training does not learn the parallel control beyond length 4: Z7 at
  length 8 stayed at chance (loss log 7) after 2,000 steps (1 or 2 layers, lr 3e-3 or 1e-3)
  and after 5,000 steps at batch 256, while length 4 reached 1.00 in 5,000 steps (seed 0).
  The sum of l elements mod 7 is independent of every proper subset of them (parity-like),
  so the final answer alone gives gradient descent nothing to start from. This is the
  catalogue's earlier "answer-only at chance even on Z7".
- The answer-only models therefore train with a curriculum over the number of factors
  (`IdentityPaddedWords`: the same answer-only format, but each training word has k ~ U{1..l}
  uniform elements and the identity elsewhere; only the final answer is supervised), the
  same for S5 and Z7; they are tested on full words. Z7 at length 8 with it: 0.62 after
  2,000 steps and 0.89 after 3,000 (seed 0, a first version of the sampler); in the
  experiment's first seed-0 run at 3,000 steps only 0.24 (the plateau ends at a step that
  varies by seed), so the budget went to 6,000 steps: 0.99 and 0.95 (seeds 1 and 2; the
  plateau ended near steps 2,200 and 1,950). At length 16 it stayed at chance (0.14-0.15
  after 3,000 and 6,000 steps at width 64, also in fp32, and 4,000 at width 128), so the
  grid at `small` is lengths {4, 8}; `large` adds 16 at twice the steps.
- The S5 chain at length 16 was right at every length after 2,000 steps (1.00, seed 0); the
  chains train for 2,000 steps.

One seed at `small` (seed 0): S5 chain 1.00 at lengths 4 and 8, answer-only 0.010 and 0.002
(chance 0.008); Z7 chain 1.00, answer-only 1.00 and 0.99; reproduced. It took 457 s beside
three other jobs on two cores (the S5 half at a load near 6); about 3 minutes is expected on
an idle core.

Preconditions (the set-up can test the claim): (1) the parallel control is learnable
without CoT: Z7 answer-only accuracy above 0.5 (chance 1/7) at every length, bootstrap
interval; (2) the control's chain is learned: Z7 CoT >= 90% at every length. If the
control's answer-only model fails, an S5 failure says nothing about seriality.

Checks (per seed; the aggregate asks every seed to pass):
1. S5 with CoT stays >= 90% at every length (interval above 0.9; the issue's bar).
2. S5 answer-only is near chance at every length >= 8: interval below chance + 0.05 (a bar
   set here: the issue says "toward chance").
3. On S5, CoT beats answer-only at every length >= 8 (paired bootstrap over words).
4. The gap is small on the parallel task: the chain's gain on S5 exceeds its gain on Z7 at
   every length >= 8 (unpaired bootstrap of the difference of the per-word gains). The
   issue gives no number for "small", so the check is relative; the Z7 gaps are reported.

What it does not test: lengths >= 16 at `small` (the control does not learn there in a CPU
budget; `large` adds length 16 at 12,000 steps and may well be inconclusive there, on the
control's precondition); the issue's negative ("CoT does not beat answer-only on S5 at
length >= 16") is therefore judged at length 8 at `small`; depth (only one layer is run; the
issue allows 1-2 and the paper varies it), the paper's iterated squaring and circuit value
problem, its "hint" setting, constant-precision arithmetic, or length generalisation.

A caveat (the lead's review): S5 answer-only was at 0.034 even at length 2 in calibration (2,000
steps), where a single product is a table look-up and depth is no limit, while the chain model
learns the same 120 x 120 table from one product per position (L times denser supervision per
word). So at this budget the S5 gap at lengths 4 and 8 mixes the paper's seriality argument with
how much supervision each format gives; the Z7 control shows only that answer-only training can
learn a parallel task, not that it could learn S5 at short lengths.
"""

from __future__ import annotations

import numpy as np

from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import all_of, bootstrap_mean, paired_difference, unpaired_difference
from paperzoo.core.tasks import TaskModelConfig, TaskTraining, group
from paperzoo.phenomena.cot_serial_problems import CotGap, cot_gap

BAR = 0.9  # the "CoT stays >= 90%"
CONTROL_LEARNS = 0.5  # the control's answer-only accuracy (chance 1/7) that counts as learned
NEAR_CHANCE = 0.05  # "toward chance": within 5 points of chance (a bar set here)
SERIAL, PARALLEL = "S5", "Z7"
LONG = 8  # the checks compare arms at lengths >= LONG


def _cells(m: dict, group_name: str) -> list[dict]:
    return m["groups"][group_name]["lengths"]


def _above(interval: dict, x: float) -> bool | None:
    return True if interval["low"] > x else False if interval["high"] < x else None


def _below(interval: dict, x: float) -> bool | None:
    return True if interval["high"] < x else False if interval["low"] > x else None


def cot_beats(chain, answer) -> bool | None:
    """True when the paired interval of chain - answer lies above 0; False when it reaches no higher than 0 (a tie
    or worse, `margins.beats` leaves an exact tie undecided); None when it straddles 0."""
    gap = paired_difference(chain, answer)
    return True if gap.above(0.0) else False if gap.high <= 0 else None


def preconditions(m: dict) -> dict[str, bool | None]:
    cells = _cells(m, PARALLEL)
    return {
        f"the parallel control learns without CoT: {PARALLEL} answer-only above {CONTROL_LEARNS} at every length":
            all_of(_above(c["answer"], CONTROL_LEARNS) for c in cells),
        f"the control's chain is learned: {PARALLEL} CoT >= {BAR:.0%} at every length":
            all_of(_above(c["chain"], BAR) for c in cells),
    }


def checks(m: dict) -> dict[str, bool | None]:
    serial = _cells(m, SERIAL)
    long = [c for c in serial if c["length"] >= LONG]
    chance = m["groups"][SERIAL]["chance"]
    return {
        f"{SERIAL} with CoT stays >= {BAR:.0%} at every length": all_of(_above(c["chain"], BAR) for c in serial),
        f"{SERIAL} answer-only is near chance (within {NEAR_CHANCE}) at every length >= {LONG}":
            all_of(_below(c["answer"], chance + NEAR_CHANCE) for c in long),
        f"on {SERIAL}, CoT beats answer-only at every length >= {LONG}": all_of(c["cot_beats_answer"] for c in long),
        f"the chain gains more on {SERIAL} than on {PARALLEL} at every length >= {LONG}":
            all_of(_above(c, 0.0) for length, c in m["gap_difference"].items() if int(length) >= LONG),
    }


CLAIM = Claim(
    statement=(
        "Without a chain of thought a constant-depth transformer computes only in parallel (AC0 at constant "
        "precision); with T CoT steps it simulates any size-T circuit. Empirically CoT dramatically improves accuracy "
        "on tasks hard for parallel computation, such as composing permutations of S5, especially for low-depth "
        "transformers, while the parallel modular addition is solved without it."
    ),
    predicate=(
        "One-layer transformers (width 64) trained from scratch on the word problems of S5 and Z7: one CoT model "
        "read from its own greedy chain, one answer-only model per length (lengths {4, 8} at small, {4, 8, 16} at "
        "large; answer-only models trained with a curriculum over the number of factors), all tested on the same "
        "1,024 held-out words with bootstrap intervals. (1) S5 with CoT >= 90% at every length; (2) S5 answer-only "
        "within 5 points of chance at lengths >= 8; (3) on S5 CoT beats answer-only at lengths >= 8 (paired); "
        "(4) CoT's gain is larger on S5 than on Z7 at lengths >= 8. Judged only if the Z7 answer-only control "
        "learns (> 0.5) and the Z7 chain is >= 90% at every length."
    ),
    checks=checks,
    preconditions=preconditions,
    source="arXiv:2402.12875 abstract and Theorems 3.1 and 3.3 as summarised in the abstract; the Sec. 5 experiments "
           "(modular addition C7, permutation composition S5; base and CoT settings) through a third-party summary, "
           "since the paper's own Sec. 5 text could not be read here; issue 11, B.2 for the predicate and the 90% bar",
)

INPUTS: tuple = ()
SUBSTRATE: tuple = ()
SEED_VARIES = "every model's initialisation and training words, and the held-out words"

_COMMON = {"groups": [SERIAL, PARALLEL], "hidden_size": 64, "num_layers": 1, "num_heads": 4, "lr": 3e-3,
           "warmup_steps": 20, "batch_size": 64}
SCALES = {
    "smoke": {**_COMMON, "lengths": [2, 3], "steps": 20, "chain_steps": 20, "n_test": 64, "hidden_size": 16},
    "small": {**_COMMON, "lengths": [4, 8], "steps": 6000, "chain_steps": 2000, "n_test": 1024},
    "large": {**_COMMON, "lengths": [4, 8, 16], "steps": 12000, "chain_steps": 4000, "n_test": 1024},
}


def _interval(values) -> dict:
    return bootstrap_mean(np.asarray(values, dtype=float)).as_dict()


def summarise(results: dict[str, CotGap], lengths) -> dict:
    """Metrics from each group's `CotGap`: per length, bootstrap intervals of both arms and of their paired gap."""
    groups, gains = {}, {}
    for name, r in results.items():
        cells = []
        for length in lengths:
            chain = r.chain[:, length - 1].float().numpy()
            answer = r.answer[length].float().numpy()
            gains[name, length] = chain - answer
            cells.append({"length": length, "chain": _interval(chain), "answer": _interval(answer),
                          "gap": paired_difference(chain, answer).as_dict(), "cot_beats_answer": cot_beats(chain, answer)})
        groups[name] = {"chance": 1 / group(name).order, "lengths": cells,
                        "chain_accuracy_every_length": r.chain_accuracy(), "train_seconds": r.train_seconds}
    gap_difference = {str(length): unpaired_difference(gains[SERIAL, length], gains[PARALLEL, length]).as_dict()
                      for length in lengths} if {SERIAL, PARALLEL} <= set(results) else {}
    return {"lengths": list(lengths), "groups": groups, "gap_difference": gap_difference}


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    config = TaskModelConfig(hidden_size=s["hidden_size"], num_layers=s["num_layers"], num_heads=s["num_heads"])
    training = TaskTraining(s["steps"], s["batch_size"], s["lr"], s["warmup_steps"])
    chain_training = TaskTraining(s["chain_steps"], s["batch_size"], s["lr"], s["warmup_steps"])
    results = {name: cot_gap(config, name, max(s["lengths"]), s["lengths"], training, seed=ctx.seed,
                             n_test=s["n_test"], curriculum=True, chain_training=chain_training)
               for name in s["groups"]}
    metrics = summarise(results, s["lengths"])
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    names = list(m["groups"])
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, names):
        g = m["groups"][name]
        lengths = [c["length"] for c in g["lengths"]]
        for arm, style in (("chain", "-o"), ("answer", "--s")):
            means = np.array([c[arm]["mean"] for c in g["lengths"]])
            err = np.array([[c[arm]["mean"] - c[arm]["low"], c[arm]["high"] - c[arm]["mean"]] for c in g["lengths"]]).T
            ax.errorbar(lengths, means, yerr=err, fmt=style, capsize=3,
                        label="chain of thought (own chain)" if arm == "chain" else "answer only")
        ax.axhline(g["chance"], color="grey", lw=0.8, ls=":", label="chance")
        ax.axhline(BAR, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="word length l", title=f"{name}: one-layer models", ylim=(0, 1.03), xticks=lengths)
    axes[0].set_ylabel("held-out accuracy (95% bootstrap)")
    axes[0].legend(fontsize=8)
