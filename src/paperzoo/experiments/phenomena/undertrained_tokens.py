"""Reproduction of 2405.05417 with exact ground truth.

The paper could only *verify* its candidates by prompting. Here the truth is
known: paperzoo's base LM was trained on the corpus's train split with a
tokenizer trained on the whole corpus, so tokens that occur only in validation
modules were learned by the tokenizer but never seen by the model. We count every
token in the training data and score the detector against those counts.
"""

from __future__ import annotations

import numpy as np
import torch

from paperzoo.core.experiment import Claim, ExperimentError, Outcome, RunContext
from paperzoo.phenomena.undertrained_tokens import (
    candidates_below_percentile, input_embedding_norm, ordinary_tokens, reference_unused_tokens, unembedding_matrix,
    undertrained_indicator, verification_probability)


def auroc(scores_positive: np.ndarray, scores_negative: np.ndarray) -> float:
    """P(score of a random positive < score of a random negative): low indicator = under-trained."""
    both = np.concatenate([scores_positive, scores_negative])
    ranks = both.argsort().argsort() + 1.0  # ties are measure-zero for float scores
    r_pos = ranks[: len(scores_positive)].sum()
    u = r_pos - len(scores_positive) * (len(scores_positive) + 1) / 2
    return float(1.0 - u / (len(scores_positive) * len(scores_negative)))


def checks(m: dict) -> dict[str, bool | None]:
    if m["never_seen"] == 0:
        return {"training left some tokenizer tokens unseen": None}
    at2 = next(r for r in m["by_percentile"] if r["percentile"] == 2.0)
    return {
        "most 2nd-percentile candidates are never or rarely seen in training": at2["precision_never_or_rare"] >= 0.5,
        "indicator separates never-seen tokens from the rest (AUROC >= 0.9)": m["auroc_never_vs_seen"] >= 0.9,
    }


CLAIM = Claim(
    statement=(
        "Tokens that are rare or absent in an LLM's training data can be found from the weights alone: "
        "after removing the first principal component of the unembedding matrix, the rows closest (cosine) "
        "to the mean of known-unused tokens -- e.g. the lowest 2nd percentile -- are under-trained tokens, "
        "which the model then fails to repeat when asked."
    ),
    predicate=(
        "On a base LM whose training-token counts are known exactly: (1) at least half of the tokens in the "
        "2nd-percentile candidate set occur fewer than 5 times in training, and (2) the indicator ranks "
        "never-seen tokens below tokens seen at least 5 times with AUROC >= 0.9. Reference set: the 16 "
        "reserved special tokens plus the 13 byte tokens that valid UTF-8 never contains; tokens are scored "
        "and percentiles taken among ordinary tokens (not special, decodable, reachable), as in the paper's code."
    ),
    checks=checks,
)

# The scales differ only in the base LM they run on.
SETTINGS = dict(percentiles=[0.5, 1.0, 2.0, 5.0, 10.0], rare_below=5, max_probability=0.01)
# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ('corpus',)
SUBSTRATE = ('base-lm',)

SCALES = {"smoke": SETTINGS, "small": SETTINGS, "large": SETTINGS}


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    lm = ctx.language_model()
    if not lm.trained_here:
        raise ExperimentError("undertrained-tokens measures against exact training counts, so it needs "
                              "paperzoo's base model; use paperzoo.phenomena.undertrained_tokens on your own model")
    tokenizer = lm.tokenizer
    V = len(tokenizer)
    counts = torch.bincount(lm.blocks("train").flatten(), minlength=V)[:V].numpy()
    reference = reference_unused_tokens(tokenizer)
    scored = np.array(ordinary_tokens(tokenizer))
    indicator = undertrained_indicator(unembedding_matrix(lm.model)[:V], reference).numpy()[scored]
    embedding_norm = input_embedding_norm(lm.model)[:V].numpy()[scored]
    seen = counts[scored]

    never, rare, common = seen == 0, (seen > 0) & (seen < s["rare_below"]), seen >= s["rare_below"]
    by_percentile = []
    for q in s["percentiles"]:
        found = np.array(candidates_below_percentile(torch.from_numpy(indicator), q), dtype=int)  # indices into scored
        c = seen[found]
        by_percentile.append({
            "percentile": q, "candidates": int(len(found)),
            "precision_never": float((c == 0).mean()) if len(found) else None,
            "precision_never_or_rare": float((c < s["rare_below"]).mean()) if len(found) else None,
            "recall_never": float(never[found].sum() / never.sum()) if never.any() else None,
            "recall_never_or_rare": float((~common)[found].sum() / (~common).sum()) if (~common).any() else None,
        })
    at2 = np.array(candidates_below_percentile(torch.from_numpy(indicator), 2.0), dtype=int)
    probs = verification_probability(lm.model, tokenizer, scored[at2].tolist()).numpy() if len(at2) else np.array([])
    verified = at2[probs < s["max_probability"]]
    both = never.any() and common.any()
    metrics = {
        "vocab": V,
        "reference_tokens": len(reference),
        "training_tokens": int(counts.sum()),
        "scored_tokens": int(len(scored)),
        "never_seen": int(never.sum()),
        "rare": int(rare.sum()),
        "common": int(common.sum()),
        "auroc_never_vs_seen": auroc(indicator[never], indicator[common]) if both else None,
        "auroc_input_embedding_norm": auroc(embedding_norm[never], embedding_norm[common]) if both else None,
        "by_percentile": by_percentile,
        "verified_at_2nd_percentile": int(len(verified)),
        "verified_precision_never_or_rare": float((seen[verified] < s["rare_below"]).mean()) if len(verified) else None,
        "candidate_examples": tokenizer.convert_ids_to_tokens(scored[at2[:15]].tolist()),
        "_plot": {"indicator": indicator.tolist(), "embedding_norm": embedding_norm.tolist(), "counts": seen.tolist()},
    }
    return Outcome(metrics, lambda fig: plot(fig, metrics, s["rare_below"]))


def plot(fig, m: dict, rare_below: int) -> None:
    unembedding, norm, curves = fig.subplots(1, 3)
    cnt = np.array(m["_plot"]["counts"])
    groups = ((cnt == 0, "never seen", "tab:red"), ((cnt > 0) & (cnt < rare_below), f"seen 1-{rare_below - 1}x", "tab:orange"),
              (cnt >= rare_below, f"seen >= {rare_below}x", "tab:blue"))
    for ax, key, ylabel, auc in ((unembedding, "indicator", "cosine distance to unused-token mean (U, 1st PC removed)",
                                  m["auroc_never_vs_seen"]),
                                 (norm, "embedding_norm", "input embedding L2 norm", m["auroc_input_embedding_norm"])):
        values = np.array(m["_plot"][key])
        for mask, label, colour in groups:
            ax.scatter(cnt[mask] + 1, values[mask], s=4, alpha=0.5, color=colour, label=f"{label} ({mask.sum()})")
        ax.axhline(np.quantile(values, 0.02), color="black", lw=0.8, ls="--", label="2nd percentile")
        ax.set(xscale="log", xlabel="occurrences in training + 1", ylabel=ylabel,
               title=f"AUROC never vs seen >= {rare_below}x: {auc if auc is not None else float('nan'):.2f}")
        ax.legend(fontsize=7, markerscale=3)
    rows = m["by_percentile"]
    q = [r["percentile"] for r in rows]
    for key, label in (("precision_never_or_rare", "precision (never or rare)"), ("precision_never", "precision (never)"),
                       ("recall_never", "recall (never seen)")):
        curves.plot(q, [np.nan if r[key] is None else r[key] for r in rows], marker="o", label=label)
    curves.set(xscale="log", xlabel="candidate percentile (paper's indicator)", ylim=(0, 1.05), title="Detector quality")
    curves.legend(fontsize=7)
