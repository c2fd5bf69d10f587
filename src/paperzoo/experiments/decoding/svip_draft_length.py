"""Reproduction of 2411.18462 (SVIP): stop drafting when the draft's entropy says acceptance is low.

The small reasoner is the target and the small draft reasoner (same tokenizer, 2 layers,
d = 64) the draft. On held-out problems, every method decodes the same prompts
greedily, so every output must be the target's own greedy output:

- plain greedy decoding of the target (``decoding.greedy_decode``, transformers' generate),
  and the same in our speculative loop with no drafting (``FixedLength(0)``), which
  shares the loop's overheads with the speculative methods;
- speculative decoding with fixed draft lengths 2, 4, 5 and 8 (5 is the constant of the
  official code, ``draft_length: int = 5``);
- SVIP with the official constants (c = 0.15, threshold 0.3, at most 40 drafts);
- transformers' assisted generation with its own defaults.

Wall-clock time is the minimum over ``repeats`` runs of each prompt, methods in a
rotating order per prompt so that all see the same load, with one intra-op thread
(on a shared 2-core machine two threads made batch-1 steps of these tiny models 5-9x
slower, all synchronisation). Forward passes are counted
with hooks. Acceptance against draft entropy is read from the fixed-length-8 runs (only
drafts that the target really verified: up to and including the first rejection).

On a 2-core CPU the tiny draft is not cheap relative to the tiny target (a forward
pass is mostly framework overhead here, not memory traffic as on a GPU), so wall-clock
speed-ups over plain decoding need not appear even where target passes fall; both are
reported.

Preconditions (what the claim needs from the set-up): the speculative loop is lossless
here (every output of our loop equals the target's greedy output); the draft agrees
with the target often enough for speculation to matter (fixed length 5 needs at most
0.8 target passes per generated token, the bootstrap interval over problems below it,
i.e. a draft token is accepted roughly one time in five or more); and the draft's
entropy straddles SVIP's stopping threshold (between 5% and 95% of the verified drafts
lie above it), or the rule has nothing to decide and SVIP is a fixed length in disguise.

The wall-clock claim is measured in a regime the paper's pairs define: their drafts
are 9-43x smaller than their targets (Pythia 160M / 6.9B, Qwen2.5 0.5B / 14B, LLaMA-3
8B / 70B), so a draft pass costs a small fraction of a target pass. A wall-clock
comparison at a cost ratio far from that weighs drafted tokens very differently, so
the wall-clock check is decided only when a draft pass costs at most a quarter of a
target pass here (measured in the same run); otherwise it is undecided and the
verdict cannot be `reproduced`. The substrate issue asks the draft to be at least 4x
cheaper per pass than the target.

Margins: every comparison is paired by problem and passes when the percentile-bootstrap
interval over problems lies above zero, fails when it lies below, and is undecided
when it straddles zero (`paperzoo.core.margins.decided`): per-problem acceptance rates for SVIP against
fixed length 5; per-problem acceptance of the low- and high-entropy thirds of the
verified fixed-8 drafts (thirds cut at the pooled terciles); and for wall-clock, the
per-problem time of fixed length 5 against 1.148 times SVIP's (they emit the same
tokens, so the ratio of summed times is the tokens/s ratio).

Set-up hyper-parameters: SVIP's constants and the fixed length 5 are the official
code's; the other fixed lengths span the draft lengths SVIP uses; problems, tokens and
repeats are set by CPU time. None was chosen by looking at the checks.

Earlier predicate (until issue 9): "(1) among drafts verified by the target under
fixed length 8, the lowest third by draft entropy is accepted more often than the
highest third; (2) SVIP has a higher acceptance rate than fixed length 5; (3) SVIP
uses fewer draft passes per generated token than the cheapest round-by-round mix of
two fixed lengths that needs as few target passes per token; (4) SVIP's tokens per
second are at least 1.148x those of fixed length 5, measured on this CPU", each a
bare comparison of pooled figures, with no preconditions. Verdict at `small`, seed 0:
reproduced (1.32x the tokens/s of fixed length 5, acceptance 0.84 vs 0.54, output
identical to greedy). Changes: (3) is a comparison the paper does not make (it reports
acceptance rates and wall-clock speed-ups), so it is now reported, not checked; (4) is
decided only at a draft-to-target cost ratio like the paper's (at most 1/4; the draft
here measured about 1/2 per pass on a loaded 2-core CPU); each comparison needs a
margin over problems.
"""

from __future__ import annotations

import numpy as np

from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import bootstrap_mean, decided, paired_difference
from paperzoo.core.reasoning import is_correct
from paperzoo.core.reasoner import draft_reasoner, problems, reasoner
from paperzoo.core.training import single_thread
from paperzoo.decoding import greedy_decode
from paperzoo.decoding.svip_draft_length import (
    SVIP,
    FixedLength,
    speculative_decode,
    transformers_assisted_decode,
)

FIXED = (2, 4, 5, 8)
PAPER_CONSTANT = 5  # official code: draft_length = 5 for the 'constant' policy
OWN_LOOP = ("greedy (own loop)", *(f"fixed-{g}" for g in FIXED), "svip")  # the loop whose losslessness is assumed
ENTROPY_BINS = 8
PAPER_SPEEDUP = 1.148  # the smallest of the paper's average wall-clock gains over a constant length (table 1)
PAPER_COST_RATIO = 0.25  # a draft pass must cost at most this share of a target pass to judge wall-clock
SPECULATION_MATTERS = 0.8  # fixed length 5: at most this many target passes per generated token
STRADDLE = (0.05, 0.95)  # share of verified drafts above SVIP's entropy threshold


def fixed_frontier_draft_passes(m: dict, target_per_token: float) -> float | None:
    """Fewest draft passes per token that fixed-length drafting reaches at a given target passes per token.

    The lower envelope of the segments between any two fixed lengths (what mixing two
    constants round by round would cost); gamma = 0, plain decoding, is the point with
    1 target pass and 0 draft passes per token. None outside the fixed lengths' range.
    """
    pts = [(m["methods"][name]["target_passes_per_token"], m["methods"][name]["draft_passes_per_token"])
           for name in ["greedy (own loop)"] + [f"fixed-{g}" for g in FIXED]]
    reachable = []
    for t0, d0 in pts:
        for t1, d1 in pts:
            if t0 <= target_per_token <= t1:
                reachable.append(min(d0, d1) if t1 == t0 else d0 + (d1 - d0) * (target_per_token - t0) / (t1 - t0))
    return min(reachable) if reachable else None


def _share(num: list[float], den: list[float]) -> list[float]:
    return [n / d for n, d in zip(num, den)]


def preconditions(m: dict) -> dict[str, bool | None]:
    pp = m["per_problem"]
    above = m["entropy_acceptance"]["above_threshold_share"]
    fixed5 = pp[f"fixed-{PAPER_CONSTANT}"]
    return {
        "the speculative loop is lossless here (every output equals the target's greedy output)":
            m["own_loop_identical_to_greedy"],
        f"the draft agrees with the target often enough for speculation to matter (fixed length {PAPER_CONSTANT} "
        f"needs at most {SPECULATION_MATTERS} target passes per token, beyond the bootstrap interval)":
            bootstrap_mean(_share(fixed5["target_passes"], fixed5["tokens"])).below(SPECULATION_MATTERS),
        f"the draft's entropy straddles SVIP's threshold ({STRADDLE[0]:.0%} to {STRADDLE[1]:.0%} of verified "
        "drafts above it)": None if above is None else STRADDLE[0] <= above <= STRADDLE[1],
    }


def checks(m: dict) -> dict[str, bool | None]:
    pp = m["per_problem"]
    svip, const = pp["svip"], pp[f"fixed-{PAPER_CONSTANT}"]
    both = [i for i, (a, b) in enumerate(zip(svip["drafted"], const["drafted"])) if a and b]
    low, high = m["entropy_acceptance"]["per_problem_low"], m["entropy_acceptance"]["per_problem_high"]
    cheap = m["draft_to_target_cost"] <= PAPER_COST_RATIO
    return {
        "draft tokens of low entropy are accepted more often than those of high entropy (paper, fig. 2)":
            None if not low else decided(paired_difference(low, high)),
        f"SVIP's acceptance rate exceeds fixed length {PAPER_CONSTANT}'s (paper, fig. 5)":
            None if not both else decided(paired_difference([svip["accepted"][i] / svip["drafted"][i] for i in both],
                                                            [const["accepted"][i] / const["drafted"][i] for i in both])),
        f"SVIP is at least {PAPER_SPEEDUP - 1:.1%} faster in wall-clock than fixed length {PAPER_CONSTANT} "
        f"(paper, table 1; undecided unless a draft pass costs at most {PAPER_COST_RATIO:.0%} of a target pass)":
            None if not cheap else decided(paired_difference(const["seconds"],
                                                             [PAPER_SPEEDUP * t for t in svip["seconds"]])),
    }


CLAIM = Claim(
    statement=(
        "A draft token's acceptance probability 1 - TV(p, q) is bounded below through the draft's entropy "
        "(Pinsker, with the cross-entropy approximated by a constant times the draft entropy); stopping the "
        "draft as soon as sqrt(0.15 H_q) > 0.3 (SVIP) gives shorter drafts with a much higher acceptance rate "
        "than fixed-length drafting, and speeds speculative decoding up over a constant draft length by "
        "14.8%, 20.6% and 20.9% in wall-clock (greedy, SpecBench; Pythia 6.9B/160M, Qwen2.5 14B/0.5B, "
        "LLaMA-3 70B/8B; up to 17% on MT-Bench at 8K context in v2)."
    ),
    predicate=(
        "Small reasoner as target and small draft reasoner as draft, greedy verification, held-out problems, "
        "95% bootstrap intervals over problems: (1) among drafts verified by the target under fixed length 8, "
        "the lowest third by draft entropy is accepted more often than the highest third; (2) SVIP (c = 0.15, "
        "threshold 0.3, cap 40) has a higher acceptance rate than fixed length 5 (the official code's "
        "constant); (3) SVIP's tokens per second are at least 1.148x those of fixed length 5 (the paper's "
        "smallest average gain, table 1), measured on this CPU, and judged only where a draft pass costs at "
        "most a quarter of a target pass, as for the paper's model pairs."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv 2411.18462: fig. 2 (acceptance against draft entropy), eq. 2 and 5 (acceptance probability "
            "and its entropy bound), fig. 5 (acceptance rates), table 1 (wall-clock speed-ups of 14.8%, 20.6% "
            "and 20.9% over a constant draft length on SpecBench); official code Geralt-Targaryen/SVIP "
            "(vanilla-sd/eval_specbench.py: sqrt(0.15 H) > 0.3; constant draft length 5)"),
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ()
SUBSTRATE = ('reasoner', 'draft')
SEED_VARIES = "which held-out problems are drawn (decoding is greedy; wall-clock times vary with the machine's load)"

SCALES = {
    "smoke": {"reasoner": "smoke", "problems": 3, "max_new_tokens": 24, "repeats": 1},
    "small": {"reasoner": "small", "problems": 48, "max_new_tokens": 96, "repeats": 2},
    "large": {"reasoner": "large", "problems": 256, "max_new_tokens": 128, "repeats": 3},
}


def entropy_acceptance(generations, threshold: float | None = None) -> dict:
    """Acceptance of verified drafts against draft entropy: entropy-quantile bins, low/high thirds.

    Also per problem (one generation each): the acceptance of its drafts in the pooled
    lowest and highest entropy thirds, for problems with drafts in both; and the share of
    verified drafts whose entropy is above `threshold`.
    """
    H, ok, owner = [], [], []
    for p, g in enumerate(generations):
        for entropies, n in zip(g.stats["round_entropies"], g.stats["round_accepted"]):
            for i, h in enumerate(entropies[: n + 1]):  # drafts after the first rejection were never verified
                H.append(h)
                ok.append(i < n)
                owner.append(p)
    above = None if threshold is None or not H else float(np.mean(np.asarray(H) > threshold))
    if len(H) < 3:
        return {"drafts": len(H), "bins": [], "low_third": None, "high_third": None,
                "per_problem_low": [], "per_problem_high": [], "above_threshold_share": above}
    H, ok, owner = np.asarray(H), np.asarray(ok, dtype=float), np.asarray(owner)
    order = np.argsort(H, kind="stable")
    thirds = np.array_split(order, 3)
    bins = [{"entropy": float(H[b].mean()), "acceptance": float(ok[b].mean()), "drafts": len(b)}
            for b in np.array_split(order, min(ENTROPY_BINS, len(H))) if len(b)]
    in_low, in_high = np.zeros(len(H), bool), np.zeros(len(H), bool)
    in_low[thirds[0]], in_high[thirds[-1]] = True, True
    low, high = [], []
    for p in range(len(generations)):
        mine = owner == p
        if (mine & in_low).any() and (mine & in_high).any():
            low.append(round(float(ok[mine & in_low].mean()), 5))
            high.append(round(float(ok[mine & in_high].mean()), 5))
    return {"drafts": len(H), "bins": bins,
            "low_third": float(ok[thirds[0]].mean()), "high_third": float(ok[thirds[-1]].mean()),
            "per_problem_low": low, "per_problem_high": high, "above_threshold_share": above}


def seconds_per_pass(target, draft, tok, prompts, max_new_tokens) -> dict:
    """Each model's wall time per forward pass when it decodes alone (own loop, no drafting), and their ratio."""
    out = {}
    for role, model in (("target", target), ("draft", draft)):
        gs = [speculative_decode(model, model, tok, p, FixedLength(0), max_new_tokens) for p in prompts]
        out[f"{role}_seconds_per_pass"] = sum(g.wall_seconds for g in gs) / sum(g.forward_passes for g in gs)
    out["draft_to_target_cost"] = out["draft_seconds_per_pass"] / out["target_seconds_per_pass"]
    return out


def run(ctx: RunContext) -> Outcome:
    with single_thread():  # batch-1 decoding of tiny models: intra-op threads only add synchronisation
        return measure(ctx)


def measure(ctx: RunContext) -> Outcome:
    s = ctx.settings
    target_r, draft_r = reasoner(s["reasoner"]), draft_reasoner(s["reasoner"])
    target, draft, tok = target_r.model, draft_r.model, target_r.tokenizer
    qs = problems(s["problems"], "test", seed=ctx.seed)
    M = s["max_new_tokens"]
    svip = SVIP()
    methods = {
        "greedy": lambda p: greedy_decode(target, tok, p, M),
        "greedy (own loop)": lambda p: speculative_decode(target, draft, tok, p, FixedLength(0), M),
        **{f"fixed-{g}": (lambda p, g=g: speculative_decode(target, draft, tok, p, FixedLength(g), M)) for g in FIXED},
        "svip": lambda p: speculative_decode(target, draft, tok, p, svip, M),
        "hf-assisted": lambda p: transformers_assisted_decode(target, draft, tok, p, M),
    }
    names = list(methods)
    for fn in methods.values():  # warm-up: first calls pay one-off costs
        fn(qs[0].prompt)

    gens = {name: [None] * len(qs) for name in names}
    wall = {name: [float("inf")] * len(qs) for name in names}
    for rep in range(s["repeats"]):
        for i, q in enumerate(qs):
            shift = (i + rep) % len(names)
            for name in names[shift:] + names[:shift]:
                g = methods[name](q.prompt)
                gens[name][i] = gens[name][i] or g
                wall[name][i] = min(wall[name][i], g.wall_seconds)

    reference = gens["greedy"]
    rows = {}
    for name in names:
        gs = gens[name]
        tokens = sum(g.num_tokens for g in gs)
        drafted = sum(g.stats.get("drafted_tokens", 0) for g in gs)
        rounds = sum(g.stats.get("rounds", 0) for g in gs)
        rows[name] = {
            "tokens": tokens,
            "wall_seconds": float(sum(wall[name])),
            "tokens_per_second": tokens / sum(wall[name]),
            "target_passes_per_token": sum(g.forward_passes for g in gs) / tokens,
            "draft_passes_per_token": sum(g.stats.get("draft_passes", 0) for g in gs) / tokens,
            "acceptance_rate": sum(g.stats.get("accepted_tokens", 0) for g in gs) / drafted if drafted else None,
            "mean_draft_length": drafted / rounds if rounds else None,
            "identical_to_greedy": float(np.mean([g.tokens == r.tokens for g, r in zip(gs, reference)])),
            "accuracy": float(np.mean([is_correct(q, g.text) for q, g in zip(qs, gs)])),
        }
    for row in rows.values():
        row["speedup_vs_greedy"] = row["tokens_per_second"] / rows["greedy"]["tokens_per_second"]
        row["speedup_vs_own_loop_greedy"] = row["tokens_per_second"] / rows["greedy (own loop)"]["tokens_per_second"]
    svip_row, const_row = rows["svip"], rows[f"fixed-{PAPER_CONSTANT}"]
    best_fixed = max((f"fixed-{g}" for g in FIXED), key=lambda n: rows[n]["tokens_per_second"])
    metrics = {
        "target": target_r.name,
        "draft": draft_r.name,
        "problems": len(qs),
        "max_new_tokens": M,
        "repeats": s["repeats"],
        "svip": {"c": svip.c, "tau": svip.tau, "max_length": svip.max_length,
                 "entropy_threshold_nats": svip.tau ** 2 / svip.c},
        **seconds_per_pass(target, draft, tok, [q.prompt for q in qs[:8]], M),
        "methods": rows,
        "svip_speedup_vs_constant": svip_row["tokens_per_second"] / const_row["tokens_per_second"],
        "best_fixed": best_fixed,
        "svip_speedup_vs_best_fixed": svip_row["tokens_per_second"] / rows[best_fixed]["tokens_per_second"],
        "all_outputs_identical_to_greedy": all(r["identical_to_greedy"] == 1.0 for r in rows.values()),
        "own_loop_identical_to_greedy": all(rows[n]["identical_to_greedy"] == 1.0 for n in names if n in OWN_LOOP),
        "entropy_acceptance": entropy_acceptance(gens["fixed-8"], svip.tau ** 2 / svip.c),
        # per problem, for margins: each method's tokens, passes, drafts and best wall time
        "per_problem": {name: {
            "tokens": [g.num_tokens for g in gens[name]],
            "target_passes": [g.forward_passes for g in gens[name]],
            "draft_passes": [g.stats.get("draft_passes", 0) for g in gens[name]],
            "drafted": [g.stats.get("drafted_tokens", 0) for g in gens[name]],
            "accepted": [g.stats.get("accepted_tokens", 0) for g in gens[name]],
            "seconds": [float(f"{t:.5g}") for t in wall[name]],
        } for name in names},
    }
    # reported, not checked (a comparison the paper does not make): SVIP against mixes of fixed lengths
    metrics["svip_frontier_draft_passes_per_token"] = fixed_frontier_draft_passes(
        metrics, svip_row["target_passes_per_token"])
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    speed, passes, accept = fig.subplots(1, 3, width_ratios=[1.3, 1, 1])
    rows = m["methods"]
    names = list(rows)
    colours = ["tab:grey", "tab:brown"] + ["tab:blue"] * len(FIXED) + ["tab:red", "tab:green"]
    ratios = [rows[n]["speedup_vs_greedy"] for n in names]
    speed.barh(names, ratios, color=colours[: len(names)])
    for y, n in enumerate(names):
        speed.annotate(f"{rows[n]['target_passes_per_token']:.2f} target passes/token", (ratios[y], y),
                       fontsize=6, xytext=(2, -2), textcoords="offset points")
    speed.axvline(1.0, color="black", lw=0.8)
    speed.set_xlim(0, max(ratios) * 1.45)  # room for the labels
    speed.invert_yaxis()
    speed.set(xlabel="tokens/s relative to greedy decoding (wall-clock, this CPU)",
              title=f"Speed ({m['problems']} held-out problems, greedy)")

    fixed = ["greedy (own loop)"] + [f"fixed-{g}" for g in FIXED]
    xs = [rows[n]["target_passes_per_token"] for n in fixed]
    ys = [rows[n]["draft_passes_per_token"] for n in fixed]
    passes.plot(xs, ys, "-o", color="tab:blue", label="fixed draft length 0, 2, 4, 5, 8")
    for n, x, y in zip(fixed, xs, ys):
        passes.annotate(n.replace("fixed-", "").replace("greedy (own loop)", "0"), (x, y), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    for n, colour, marker in (("svip", "tab:red", "*"), ("hf-assisted", "tab:green", "D")):
        passes.plot([rows[n]["target_passes_per_token"]], [rows[n]["draft_passes_per_token"]], marker,
                    color=colour, ms=12 if marker == "*" else 7, label=n)
    passes.set(xlabel="target forward passes per token", ylabel="draft forward passes per token",
               title="Cost in forward passes")
    passes.legend(fontsize=7)

    bins = m["entropy_acceptance"]["bins"]
    if bins:
        H = np.array([b["entropy"] for b in bins])
        accept.plot(H, [b["acceptance"] for b in bins], "-o", color="tab:blue", label="measured (fixed-8 drafts)")
        grid = np.linspace(0, max(H.max(), m["svip"]["entropy_threshold_nats"]) * 1.1, 100)
        accept.plot(grid, 1 - np.sqrt(m["svip"]["c"] * grid), "--", color="tab:red",
                    label="SVIP estimate 1 - sqrt(0.15 H)")
        accept.axvline(m["svip"]["entropy_threshold_nats"], color="tab:red", lw=0.8, ls=":",
                       label="SVIP stops above this entropy")
    accept.set(xlabel="draft entropy H_q (nats)", ylabel="acceptance (greedy verification)",
               title="Acceptance against draft entropy", ylim=(-0.05, 1.05))
    accept.legend(fontsize=7)
