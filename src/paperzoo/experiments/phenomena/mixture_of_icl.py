"""Reproduction of 2411.02830 on a from-scratch in-context learner: MoICL against noisy demonstrations.

The paper weighs subsets of a pretrained LLM's demonstrations; here the LM is a tiny
transformer meta-trained on in-context classification under a random label map per
sequence (`core.tasks.LabelMapEpisodes`: a label is predictable only by finding its item
earlier in the context). The claim tested is the paper's robustness one: learned weights
over demonstration subsets find and down-weight the noisy ones, and beat both plain ICL on
all the demonstrations and the uniform mixture.

Each seed draws `tasks` fixed tasks. A task is a label map f over 8 clusters of 4 items
(32 items; a demonstration of any item of a cluster informs every query of that cluster, as
a real task's demonstrations inform more than their own input) and a pool of 64
demonstrations split into k = 8 subsets of 8; 3 subsets are corrupted (every label
replaced by the next label, f(x) + 1 mod 4: perturbed demonstrations). Weights are trained
on queries of half the items with their true labels and tested on the other half. Arms,
on the same test queries: plain ICL with all 64 demonstrations concatenated; the uniform
mixture; MoICL with k learned scalars as a mixture (checked) and as a product of experts,
and the top-4 mixture chosen by I-MLE (reported: half the LM calls).

The seed varies the meta-trained model's initialisation and training episodes, and the
tasks (maps, pools, which subsets are corrupted, the train/test split of items).

Margins: accuracies are compared paired over the same test queries (tasks x items) with
95% bootstrap intervals; a check passes when the interval clears zero. The weights are
compared paired over tasks.

Set-up, chosen on the meta-trained model's in-context accuracy (the control) and never on
MoICL's checks: width 64, two layers, 600 steps of 32 episodes (seed 0: right on 97% of
labels whose item it had seen without clusters, 99.99% of those whose cluster it had seen
with them, below; the first task format, with the label as its own token after
the item, stayed at chance after 1,500 steps, see `LabelMapEpisodes`); 8 subsets of 8 and 3
corrupted subsets are fixed by the design above (a minority of the pool, as in the paper's
perturbed-demonstration study); the weights train for 300 full-batch Adam steps at lr 0.1.

Earlier design
--------------
The first version had no clusters (`cluster_size` 1): each demonstration informed only its
own item. Seed 0 at `small` passed both preconditions and the weight check (corrupted
subsets weighted 0.001x the clean ones) but left both accuracy checks undecided (MoICL
mixture 0.60, concatenated ICL 0.58, uniform mixture 0.61). The diagnosis: weights learned
on the training items cannot know which subsets hold the *test* items' demonstrations, so
they pile onto the subsets that cover training items; no weighting learned from other
queries can help a query whose only evidence is its own demonstration. That makes the
test bed, not MoICL, decide the accuracy checks, so the design changed to clusters before
any other seed ran; predicates, margins and fitting settings are unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import beats, paired_difference
from paperzoo.core.tasks import LabelMapEpisodes, TaskModelConfig, TaskTraining, train_on_task
from paperzoo.phenomena.mixture_of_icl import MoICLWeights, expert_log_probs

LEARNED = 0.9  # in-context accuracy the meta-trained model needs on labels whose item it has seen
ARMS = ("concatenated ICL", "uniform mixture", "MoICL mixture", "MoICL product", "MoICL top-k mixture")


@torch.no_grad()
def in_context_accuracy(model, task: LabelMapEpisodes, n: int, seed: int) -> float:
    """Share of label positions whose item occurred earlier that the model predicts right (held-out episodes)."""
    batch = task.sample(n, seed)
    predictions = model(input_ids=batch.tokens).logits[:, :-1].argmax(-1)
    seen = task.seen_before(batch.tokens)[:, 1:]
    return (predictions == batch.expected[:, 1:])[seen].float().mean().item()


def one_task(model, task: LabelMapEpisodes, s: dict, g: torch.Generator) -> dict:
    """One fixed MoICL problem: a noisy pool, weights trained on half the items, every arm on the other half."""
    k, size = s["subsets"], s["subset_size"]
    f = task.random_maps(1, g)
    x = torch.randint(0, task.items, (1, k * size), generator=g)
    corrupted = torch.randperm(k, generator=g)[:s["corrupted"]]
    clean_pool = task.pairs(x, f)[0]
    noisy = task.pairs(x, (f + 1) % task.labels)[0]
    pool = clean_pool.view(k, 2 * size).clone()
    pool[corrupted] = noisy.view(k, 2 * size)[corrupted]
    items = torch.randperm(task.items, generator=g)
    train_items, test_items = items[: task.items // 2], items[task.items // 2:]
    queries = [t.view(1) for t in torch.arange(task.items)]
    candidates = [torch.tensor([task.label_token(torch.tensor(y)).item()]) for y in range(task.labels)]
    bos = torch.tensor([task.bos])
    experts = expert_log_probs(model, list(pool), queries, candidates, prefix=bos)  # [items, k, labels]
    concatenated = expert_log_probs(model, [pool.reshape(-1)], queries, candidates, prefix=bos)[:, 0]
    concatenated_clean = expert_log_probs(model, [clean_pool], queries, candidates, prefix=bos)[:, 0]
    gold = task.label_of(torch.arange(task.items)[None], f)[0]
    fits = {"uniform mixture": MoICLWeights(k, "mixture", "uniform"),
            "MoICL mixture": MoICLWeights(k, "mixture", "scalar"),
            "MoICL product": MoICLWeights(k, "product", "scalar"),
            "MoICL top-k mixture": MoICLWeights(k, "mixture", "scalar", top_k=s["top_k"])}
    for w in fits.values():
        w.fit(experts[train_items], gold[train_items], steps=s["fit_steps"], lr=s["fit_lr"])
    right = {"concatenated ICL": concatenated[test_items].argmax(-1) == gold[test_items],
             "concatenated ICL, clean pool": concatenated_clean[test_items].argmax(-1) == gold[test_items]}
    with torch.no_grad():
        for name, w in fits.items():
            right[name] = w(experts[test_items]).argmax(-1) == gold[test_items]
    is_corrupted = torch.zeros(k, dtype=torch.bool)
    is_corrupted[corrupted] = True
    weights = fits["MoICL mixture"].weights().detach()
    return {"right": {a: r.int().tolist() for a, r in right.items()},
            "corrupted_weight": weights[is_corrupted].mean().item(),
            "clean_weight": weights[~is_corrupted].mean().item(),
            "product_weights": fits["MoICL product"].weights().detach().tolist(),
            "corrupted": sorted(corrupted.tolist()),
            "top_k_kept_clean": int((~is_corrupted[fits["MoICL top-k mixture"].active_experts()]).sum())}


def _arm(m: dict, arm: str) -> np.ndarray:
    return np.concatenate([np.array(t["right"][arm]) for t in m["tasks"]])


def preconditions(m: dict) -> dict[str, bool | None]:
    return {
        f"the meta-trained model learns in context: right on >= {LEARNED:.0%} of labels whose item it has seen "
        "(held-out episodes)": m["in_context_accuracy"] >= LEARNED,
        "the corrupted subsets hurt plain ICL: concatenating the clean pool beats concatenating the noisy one "
        "(paired interval over test queries above 0)": beats(_arm(m, "concatenated ICL, clean pool"),
                                                             _arm(m, "concatenated ICL")),
    }


def checks(m: dict) -> dict[str, bool | None]:
    clean = np.array([t["clean_weight"] for t in m["tasks"]])
    corrupted = np.array([t["corrupted_weight"] for t in m["tasks"]])
    mixture = _arm(m, "MoICL mixture")
    return {
        "learned mixture weights are lower on corrupted subsets than on clean ones (paired over tasks)":
            beats(clean, corrupted),
        "MoICL (learned mixture) is more accurate than ICL on all the demonstrations concatenated":
            beats(mixture, _arm(m, "concatenated ICL")),
        "MoICL (learned mixture) is more accurate than the uniform mixture of the same experts":
            beats(mixture, _arm(m, "uniform mixture")),
    }


CLAIM = Claim(
    statement=(
        "MoICL treats subsets of demonstrations as experts and learns a weighting function to merge their output "
        "distributions on a training set; it improves on ICL and on strong baselines (up to +13% over ICL), and "
        "is more robust to noisy (perturbed) demonstrations (up to +38%), which it can filter out."
    ),
    predicate=(
        "A tiny transformer meta-trained for in-context classification; per task a pool of 64 demonstrations in 8 "
        "subsets, 3 of them with every label wrong. Learned scalar mixture weights, trained on half the items, give "
        "the corrupted subsets less weight than the clean ones, and on the other half are more accurate than ICL "
        "with all 64 demonstrations and than the uniform mixture (paired 95% bootstrap intervals above 0). "
        f"Preconditions: in-context accuracy >= {LEARNED:.0%} on seen items; the noise hurts plain ICL."
    ),
    checks=checks,
    preconditions=preconditions,
    source="arXiv:2411.02830 abstract and Sec. 3 (mixture and product of experts, scalar and hyper-network "
           "weights, top-k sparsification by I-MLE); the perturbed-demonstration robustness study",
)

INPUTS: tuple = ()
SUBSTRATE: tuple = ()
SEED_VARIES = ("the meta-trained model's initialisation and training episodes, and the tasks (label maps, pools, "
               "corrupted subsets, train/test items)")

SCALES = {
    "smoke": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "steps": 10, "batch_size": 8, "tasks": 2,
              "subsets": 8, "subset_size": 8, "corrupted": 3, "top_k": 4, "fit_steps": 20, "fit_lr": 0.1},
    "small": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "steps": 600, "batch_size": 32, "tasks": 16,
              "subsets": 8, "subset_size": 8, "corrupted": 3, "top_k": 4, "fit_steps": 300, "fit_lr": 0.1},
    "large": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "steps": 6000, "batch_size": 64, "tasks": 64,
              "subsets": 8, "subset_size": 8, "corrupted": 3, "top_k": 4, "fit_steps": 300, "fit_lr": 0.1},
}
TASK = LabelMapEpisodes(items=32, labels=4, demos=64, cluster_size=4)


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    model, history = train_on_task(TASK, TaskModelConfig(s["hidden_size"], s["num_layers"], s["num_heads"]),
                                   TaskTraining(s["steps"], s["batch_size"]), seed=ctx.seed)
    model.eval()
    g = torch.Generator().manual_seed(ctx.seed)
    tasks = [one_task(model, TASK, s, g) for _ in range(s["tasks"])]
    metrics = {"in_context_accuracy": in_context_accuracy(model, TASK, 256, 10**6 + ctx.seed),
               "train_seconds": history["seconds"], "tasks": tasks}
    metrics["accuracy"] = {a: float(_arm(metrics, a).mean()) for a in ARMS + ("concatenated ICL, clean pool",)}
    metrics["mixture_minus_concatenated"] = paired_difference(_arm(metrics, "MoICL mixture"),
                                                              _arm(metrics, "concatenated ICL")).as_dict()
    metrics["corrupted_over_clean_weight"] = float(np.mean([t["corrupted_weight"] / t["clean_weight"]
                                                            for t in tasks]))
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    names = list(m["accuracy"])
    means = [m["accuracy"][a] for a in names]
    errors = [[max(0.0, 1.96 * np.sqrt(p * (1 - p) / max(1, _arm(m, a).size))) for a, p in zip(names, means)]]
    left.barh(names, means, xerr=errors[0], color=["tab:grey", "tab:orange", "tab:blue", "tab:cyan", "tab:purple",
                                                   "lightgrey"][: len(names)])
    left.axvline(1 / TASK.labels, color="k", ls=":", label="chance")
    left.set(xlabel="accuracy on held-out queries", xlim=(0, 1))
    left.legend(fontsize=8)
    clean = [t["clean_weight"] for t in m["tasks"]]
    corrupted = [t["corrupted_weight"] for t in m["tasks"]]
    right.boxplot([clean, corrupted], tick_labels=["clean", "corrupted"])
    right.set(ylabel="learned mixture weight per subset", title="MoICL weights")
