"""Reproduction of 2412.21187 (overthinking): efficiency metrics, and FCS+Reflection SimPO to cut redundant rounds.

1. Make the reasoner overthink: a copy of the cached small reasoner is fine-tuned
   briefly on traces that, after the answer-producing scratchpad, repeat it in
   `verification_rounds` "Wait, check:" rounds before ``</think>``.
2. Measure it greedily on held-out linear equations: tokens, accuracy, rounds,
   outcome efficiency and process efficiency (a round is distinct if its scratchpad
   was not written before in the response; correct if its last result is the answer).
3. The paper's fix: sample `samples_per_problem` responses per training problem from
   the overthinking model; every correct one yields a pair (its FCS + Reflection
   version preferred over itself); SimPO on those pairs.
4. Measure again, same problems, same greedy decoding.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import torch

from paperzoo.core.experiment import Claim, ExperimentError, Outcome, RunContext
from paperzoo.core.reasoning import ANSWER, END_THINK, is_correct, problems, reasoner
from paperzoo.core.sampling import sample
from paperzoo.core.training import TrainConfig, token_blocks, train
from paperzoo.decoding.overthinking_efficiency import (
    outcome_efficiency,
    process_efficiency,
    rounds_of,
    simpo_step,
    split_rounds,
    streamline,
)

MARKER = "Wait"
_LAST_RESULT = re.compile(r"=\s*(-?\d+)\s*$")


def overthinking_text(q, rounds: int) -> str:
    """A training trace: the scratchpad, then `rounds` verbatim re-verifications, then the answer."""
    pad = "".join(f"{line}\n" for line in q.steps)
    return q.prompt + pad + f"{MARKER}, check:\n{pad}" * rounds + f"{END_THINK}{ANSWER} {q.answer}"


def round_is_correct(q, text: str) -> bool:
    found = _LAST_RESULT.search(text.split(END_THINK)[0].strip())
    return found is not None and int(found.group(1)) == q.answer


def scratchpad_key(text: str) -> str:
    """What a round computes, without its 'Wait, check:' preamble: equal keys are the same solution."""
    body = text.split(END_THINK)[0]
    return body.replace(f"{MARKER}, check:", "").strip()


def checks(m: dict) -> dict[str, bool | None]:
    before, after = m["eval"]["overthinking"], m["eval"]["after SimPO"]
    overthinks = before["mean_rounds"] >= 2.0  # otherwise there is nothing to remove
    reduction = 1 - after["mean_tokens"] / before["mean_tokens"]
    return {
        "generated tokens fall by at least 30% after FCS+Reflection SimPO":
            reduction >= 0.30 if overthinks else None,
        "accuracy is maintained (at most 3 points lower)":
            after["accuracy"] >= before["accuracy"] - 0.03 if overthinks else None,
        "outcome efficiency rises": after["outcome_efficiency"] > before["outcome_efficiency"] if overthinks else None,
    }


CLAIM = Claim(
    statement=(
        "o1-like models overthink: their responses hold several solution rounds, and on easy problems the first "
        "correct answer usually comes early, so outcome efficiency (tokens to the first correct solution over all "
        "tokens) and process efficiency (tokens of distinct solutions over all tokens) are low. Self-training with "
        "SimPO that prefers First-Correct-Solution + one Reflection responses over full ones cuts generated tokens "
        "substantially (about 48% fewer on MATH500 for QwQ-32B-Preview, more on easier sets) while keeping accuracy "
        "(within about a point) and raising both efficiencies."
    ),
    predicate=(
        "Small reasoner made to overthink (fine-tuned on traces with redundant verification rounds), held-out linear "
        "equations, greedy decoding. If the overthinking model writes >= 2 rounds on average (else undecided): after "
        "FCS+Reflection SimPO (1) mean generated tokens fall by >= 30% (a conservative fraction of the paper's ~48%), "
        "(2) accuracy drops by at most 3 points, (3) outcome efficiency rises."
    ),
    checks=checks,
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ()
SUBSTRATE = ('reasoner',)

SCALES = {
    "smoke": {"reasoner": "smoke", "verification_rounds": 3, "overthink_texts": 200,
              "overthink_train": {"steps": 4, "batch_size": 4, "seq_len": 128, "lr": 1e-3, "warmup_steps": 1},
              "pair_problems": 6, "samples_per_problem": 2, "simpo_steps": 2, "simpo_batch": 2, "lr": 1e-4,
              "beta": 2.0, "gamma": 1.0, "test_problems": 4, "max_new_tokens": 48},
    "small": {"reasoner": "small", "verification_rounds": 3, "overthink_texts": 4000,
              "overthink_train": {"steps": 150, "batch_size": 16, "seq_len": 256, "lr": 1e-3, "warmup_steps": 10},
              "pair_problems": 128, "samples_per_problem": 4, "simpo_steps": 40, "simpo_batch": 8, "lr": 1e-4,
              "beta": 2.0, "gamma": 1.0, "test_problems": 96, "max_new_tokens": 200},
}


def measure(model, tok, qs, max_new_tokens: int) -> dict:
    """Greedy responses: tokens, accuracy, rounds and both efficiencies."""
    outs = sample(model, tok, [q.prompt for q in qs], temperature=0, max_new_tokens=max_new_tokens, batch_size=128)
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])
    responses, rounds = [], []
    for x in outs:
        q = qs[x.prompt_index]
        thinking, sep, conclusion = x.text.partition(END_THINK)
        texts = split_rounds(thinking, MARKER) or [""]
        texts[-1] += sep + conclusion  # the conclusion belongs to the last round
        responses.append(rounds_of(texts, count, lambda t, q=q: round_is_correct(q, t), scratchpad_key,
                                   is_correct(q, x.text)))
        rounds.append(len(texts))
    return {
        "accuracy": float(np.mean([r.answered_correctly for r in responses])),
        "mean_tokens": float(np.mean([x.num_tokens for x in outs])),
        "mean_rounds": float(np.mean(rounds)),
        "outcome_efficiency": outcome_efficiency(responses),
        "process_efficiency": process_efficiency(responses),
        "finished": float(np.mean([x.finished for x in outs])),
        "example": outs[0].text,
    }


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    if ctx.model is not None:
        raise ExperimentError("overthinking-efficiency runs on paperzoo's reasoner and its tasks; --model is not supported")
    r = reasoner(s["reasoner"], seed=0)
    tok = r.tokenizer
    kinds = ["linear_equation"]
    test_qs = problems(s["test_problems"], "test", seed=ctx.seed, kinds=kinds)

    # 1. An overthinking reasoner.
    texts = [overthinking_text(q, s["verification_rounds"])
             for q in problems(s["overthink_texts"], "train", seed=ctx.seed + 1, kinds=kinds, distinct=False)]
    cfg = TrainConfig(**s["overthink_train"])
    overthinker = copy.deepcopy(r.model)
    hist = train(overthinker, token_blocks(tok, texts, cfg.seq_len), cfg, desc="teaching the reasoner to overthink",
                 seed=ctx.seed)

    evals = {"original reasoner": measure(r.model, tok, test_qs, s["max_new_tokens"]),
             "overthinking": measure(overthinker, tok, test_qs, s["max_new_tokens"])}

    # 2. Preference pairs: FCS + Reflection of the model's own correct responses over the responses themselves.
    pair_qs = problems(s["pair_problems"], "train", seed=ctx.seed + 2, kinds=kinds)
    drawn = sample(overthinker, tok, [q.prompt for q in pair_qs], num_samples=s["samples_per_problem"],
                   temperature=1.0, max_new_tokens=s["max_new_tokens"], seed=ctx.seed, batch_size=128)
    pairs = []
    for x in drawn:
        q = pair_qs[x.prompt_index]
        if not (x.finished and is_correct(q, x.text)):
            continue
        short = streamline(x.text, lambda t, q=q: round_is_correct(q, t), END_THINK, reflections=1, marker=MARKER)
        chosen = None if short is None else tok(short, add_special_tokens=False)["input_ids"]
        if chosen is not None and len(chosen) < len(x.tokens):
            pairs.append((tok(q.prompt, add_special_tokens=False)["input_ids"], chosen, x.tokens))

    # 3. SimPO.
    fixed = copy.deepcopy(overthinker)
    simpo_log = []
    if pairs:
        opt = torch.optim.Adam(fixed.parameters(), lr=s["lr"])
        rng = np.random.default_rng(ctx.seed)
        for step in range(s["simpo_steps"]):
            batch = [pairs[i] for i in rng.choice(len(pairs), min(s["simpo_batch"], len(pairs)), replace=False)]
            stats = simpo_step(fixed, opt, [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch],
                               tok.eos_token_id, beta=s["beta"], gamma=s["gamma"])
            simpo_log.append({"step": step, **stats})
    evals["after SimPO"] = measure(fixed, tok, test_qs, s["max_new_tokens"])

    metrics = {
        "model": r.name,
        "test_problems": len(test_qs),
        "overthink_train_loss": hist["train_loss"][-1],
        "pairs": len(pairs),
        "pair_samples": len(drawn),
        "mean_tokens_chosen": float(np.mean([len(p[1]) for p in pairs])) if pairs else None,
        "mean_tokens_rejected": float(np.mean([len(p[2]) for p in pairs])) if pairs else None,
        "eval": evals,
        "token_reduction": 1 - evals["after SimPO"]["mean_tokens"] / evals["overthinking"]["mean_tokens"],
        "simpo": simpo_log,
    }
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    ax, eff = fig.subplots(1, 2)
    names = list(m["eval"])
    colours = ["tab:grey", "tab:red", "tab:green"]
    tokens = [m["eval"][n]["mean_tokens"] for n in names]
    ax.bar(names, tokens, color=colours)
    for i, n in enumerate(names):
        ax.annotate(f"acc {m['eval'][n]['accuracy']:.2f}\n{m['eval'][n]['mean_rounds']:.1f} rounds",
                    (i, tokens[i]), ha="center", fontsize=8, textcoords="offset points", xytext=(0, 3))
    ax.set(ylabel="mean generated tokens (greedy)", title=f"Tokens ({m['token_reduction']:.0%} fewer after SimPO)")
    x = np.arange(len(names))
    eff.bar(x - 0.2, [m["eval"][n]["outcome_efficiency"] for n in names], 0.4, label="outcome efficiency")
    eff.bar(x + 0.2, [m["eval"][n]["process_efficiency"] for n in names], 0.4, label="process efficiency")
    eff.set_xticks(x, names)
    eff.set(ylim=(0, 1.05), title="Efficiency metrics")
    eff.legend(fontsize=8)
