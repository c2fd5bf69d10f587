"""Reproduction of 2411.08982 (Lynx): fewer experts per decode step, little quality lost.

paperzoo's base LMs are dense, so this experiment runs on a tiny Mixtral-style MoE LM
(8 experts, top-2, load-balancing loss) trained on the base LM's tokenizer and corpus:
the shared substrate ``moe-lm`` (`moe_lm`, built from ``SCALES`` and cached). Experts
hold most of its weights, as in real MoE models. At batch sizes 1, 4, 16 and 64 it
compares four routings of the decode steps:

- full: the model's own top-2 routing;
- Lynx: batch-aware selection, at most ``num_kept`` experts per layer and step, chosen
  by router confidence;
- matched random: the control. At every step and layer it keeps exactly as many
  experts as Lynx keeps there, drawn at random from those the batch requests, and
  re-routes the same way (`matched_random_selection`). Distinct experts per step are
  equal by construction, so the comparison isolates Lynx's choice of experts;
- static top-1: each token keeps only its top-1 expert, whatever the batch (reported
  for context; it touches a different number of experts).

Quality is measured by *teacher-forced decoding*: validation sequences are cut into
batches of B rows; the first ``prefill_tokens`` positions are prefill (full routing)
and every later position is one decode step whose batch is the B rows at that
position. This is exactly what lock-step generation with a KV cache computes (a test
checks it), but it scores the reference continuation. Loss and next-token accuracy
are taken per row over the predictions made by decode steps only, so every
comparison is paired by row and decided by the percentile-bootstrap interval over
rows (`paperzoo.core.margins.decided`): it passes when the interval lies inside the
claim, fails when it lies wholly outside, and is undecided (None) when it straddles.

Latency is reported, not checked: the median wall time of one decode step (KV cache,
after a prefill), for the routings in the same run, interleaved, on one CPU thread.
Lynx's speed-up comes from reading fewer expert weights in memory-bound GPU decoding;
a one-thread CPU running 0.2M-parameter experts is not in that regime, so its timing
says nothing about the claim.

Preconditions: the MoE learned (its decode-position NLL under full routing is below
the corpus unigram model's, beyond the bootstrap interval over rows), and batching
activates more distinct experts per layer and decode step than Lynx keeps (the
paper's premise; otherwise there is nothing to reduce). The cap (4 of 8) and the
critical margin (ln 2) were fixed before any run; the MoE's size and training were
set so that it learns (the first precondition) within about three minutes on one
core, without looking at any routing's quality.

Substrate change (issue 10, B): the MoE now trains on the base LM's v2 recipe, batches
of 8 rows for twice the steps (the same tokens), chosen on the base LM's validation loss;
its own validation perplexity fell from 168.5 to 155.3. On the v1 MoE Lynx lost under 1
point at batch 64 in every seed (reproduced); on v2 it loses 1.7-2.1 (not reproduced).
The better-trained experts matter more, and the cap of 4 of 8 was not changed.

Earlier predicate (until issue 9): (1) at batch 64 next-token accuracy drops by at
most 1 point against full routing; (2) at batch 64 Lynx's decode perplexity is below
static top-1 routing's; (3) one-thread CPU latency per decode step is at least 1.2x
lower than full routing at the best batch size -- bare comparisons, one seed, no
precondition. Verdict at `small`, seed 0: not reproduced (0.6 points lost, but
perplexity 180 against static top-1's 176, and at most 1.0x speed-up). It changed
because (2) compared arms that touch different numbers of experts, a comparison the
paper does not make -- Lynx's claim is that its choice of experts beats dropping
experts blindly at the same budget -- and (3) asks a one-thread CPU for a GPU
memory-bandwidth effect the paper measures on GPUs.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch

from paperzoo.compression import item_list
from paperzoo.compression.lynx_expert_selection import (
    LynxConfig,
    TinyMoEConfig,
    apply_lynx,
    apply_matched_random,
    apply_static_top_k,
    moe_layers,
    trained_tiny_moe,
)
from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import clearly_greater, decided, paired_difference
from paperzoo.core.models import LanguageModel, base_model
from paperzoo.core.training import TrainConfig, single_thread

POLICIES = ("full", "lynx", "random", "top1")
TIMED = ("full", "lynx", "top1")
LABELS = {"full": "full top-k", "lynx": "Lynx", "random": "matched random dropping", "top1": "static top-1"}
ACCURACY_BUDGET = 0.01  # the paper's "less than 1% points" of accuracy


def _big(m: dict) -> str:
    return str(max(int(b) for b in m["quality"]))


def _rows(m: dict, policy: str, key: str) -> np.ndarray:
    return np.asarray(m["quality"][_big(m)][policy][key])


def preconditions(m: dict) -> dict[str, bool | None]:
    big = _big(m)
    full_experts = m["quality"][big]["lynx"]["full_experts"]
    return {
        "the MoE learned (decode NLL under full routing below the corpus unigram model's, beyond the bootstrap "
        "interval over rows)": clearly_greater(np.asarray(m["unigram_row_nll"]), _rows(m, "full", "row_nll")),
        f"batching activates more experts than Lynx keeps (full routing at batch {big}: more than "
        f"{m['num_kept']} distinct experts per layer and decode step)": full_experts > m["num_kept"],
    }


def checks(m: dict) -> dict[str, bool | None]:
    big = _big(m)
    return {
        f"Lynx loses at most 1 point of next-token accuracy at batch {big}": decided(paired_difference(
            _rows(m, "lynx", "row_accuracy") + ACCURACY_BUDGET, _rows(m, "full", "row_accuracy"))),
        f"Lynx's decode NLL is below random expert dropping with the same experts per step, at batch {big}":
            decided(paired_difference(_rows(m, "random", "row_nll"), _rows(m, "lynx", "row_nll"))),
    }


CLAIM = Claim(
    statement=(
        "Batching forces an MoE decoder to activate nearly all experts at every decode step, which makes "
        "memory-bound decoding slow. Lynx keeps, per layer and decode step, only the experts that matter to "
        "the batch (judged from router confidence) and re-routes tokens to them, with full routing in "
        "prefill. It reduces inference latency by up to 1.55x with negligible accuracy loss (Mixtral-class "
        "models on code and maths; later versions: 1.09-1.30x median time per output token, under 1 point "
        "of accuracy lost)."
    ),
    predicate=(
        "On a tiny trained Mixtral-style MoE (8 experts, top-2), Lynx capped at 4 of 8 experts per layer "
        "(critical margin ln 2), teacher-forced decoding with the first 32 positions as prefill, batch 64, "
        "per validation row over its decode positions; each comparison holds when its 95% paired bootstrap "
        "interval over rows lies inside the claim, fails when it lies wholly outside, else is undecided: (1) Lynx's next-token accuracy is at most 1 point below full routing's; "
        "(2) Lynx's decode NLL is below that of random expert dropping that keeps exactly as many experts "
        "per layer and step as Lynx (drawn from those the batch requests). Preconditions: the MoE beats a "
        "unigram model, and full routing at batch 64 activates more than 4 experts per layer and step. "
        "CPU latency per decode step is reported, not checked."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv 2411.08982: abstract (v1: up to 1.55x lower latency, negligible accuracy loss; v3: up to "
            "1.30x throughput, under 1 point of accuracy lost); v1 §3 (observations: batching activates nearly "
            "all experts, router confidence tells which assignments a token depends on) and §4 (keeping the "
            "experts that matter to the batch); latency measured on GPUs"),
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ('corpus',)
SUBSTRATE = ("base-lm", "moe-lm")
SEED_VARIES = ("how the validation rows are grouped into decode batches (a permutation of the rows) and the "
               "matched random control's draws; the MoE substrate (trained once, seed 0) and the rows themselves "
               "are the same for every seed")

SCALES = {
    "smoke": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_experts": 4,
              "top_k": 2, "aux_loss_coef": 0.01, "train_steps": 6, "train_batch": 4, "seq_len": 32, "lr": 3e-3,
              "eval_rows": 8, "prefill_tokens": 8, "batch_sizes": [1, 4], "num_kept": 2, "kept_sweep": [1, 2, 4],
              "latency_prompt": 8, "latency_steps": 3, "latency_rounds": 1},
    # Experts hold ~80% of the weights, as in real MoE models; training takes ~3.5 minutes on one idle core.
    # The base LM's v2 recipe (issue 10, B): batches of 8 rows and twice the steps at the same tokens.
    "small": {"hidden_size": 128, "intermediate_size": 512, "num_layers": 4, "num_heads": 4, "num_experts": 8,
              "top_k": 2, "aux_loss_coef": 0.01, "train_steps": 800, "train_batch": 8, "seq_len": 128, "lr": 3e-3,
              "eval_rows": 128, "prefill_tokens": 32, "batch_sizes": [1, 4, 16, 64], "num_kept": 4,
              "kept_sweep": [1, 2, 3, 4, 5, 6, 8], "latency_prompt": 32, "latency_steps": 16, "latency_rounds": 5},
}


def moe_lm(scale: str, corpus: str | None = None, base: LanguageModel | None = None) -> LanguageModel:
    """The shared substrate ``moe-lm``: the tiny MoE of `scale`, trained on the base LM's tokenizer and corpus.

    Its settings are this experiment's ``SCALES[scale]``; `base` (the base LM of `scale`)
    is loaded when not given.
    """
    if scale not in SCALES:
        raise ValueError(f"moe-lm has no {scale!r} scale (it has: {', '.join(SCALES)})")
    s = SCALES[scale]
    base = base_model(scale, corpus=corpus) if base is None else base
    config = TinyMoEConfig(hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                           num_layers=s["num_layers"], num_heads=s["num_heads"], num_experts=s["num_experts"],
                           top_k=s["top_k"], aux_loss_coef=s["aux_loss_coef"], max_seq_len=s["seq_len"])
    train_config = TrainConfig(steps=s["train_steps"], batch_size=s["train_batch"], seq_len=s["seq_len"],
                               lr=s["lr"], warmup_steps=max(1, s["train_steps"] // 10),
                               eval_every=max(1, s["train_steps"] // 8))  # the validation curve goes into its card
    with single_thread():  # tiny expert matmuls: a second thread only waits (see core.training.single_thread)
        return trained_tiny_moe(base, config, train_config, seed=0, name=f"moe-lm-{scale}")


def install(model, policy: str, s: dict, prefill_tokens: int | None, track: bool = True,
            num_kept: int | None = None, seed: int = 0):
    config = LynxConfig(num_kept=num_kept or s["num_kept"])
    if policy == "full":
        return None
    if policy == "lynx":
        return apply_lynx(model, config, prefill_tokens, track=track)
    if policy == "random":
        return apply_matched_random(model, config, seed=seed, prefill_tokens=prefill_tokens, track=track)
    if policy == "top1":
        return apply_static_top_k(model, 1, prefill_tokens=prefill_tokens, track=track)
    raise ValueError(f"unknown routing policy {policy!r}")


@torch.no_grad()
def decode_quality(model, rows: torch.Tensor, batch_size: int, prefill_tokens: int, policy: str, s: dict,
                   num_kept: int | None = None, seed: int = 0) -> dict:
    """Teacher-forced decoding in batches of `batch_size` rows: loss and accuracy over decode-step predictions.

    Besides the totals, `row_nll` and `row_accuracy` hold each row's mean over its decode positions.
    """
    handle = install(model, policy, s, prefill_tokens, num_kept=num_kept, seed=seed)
    P = prefill_tokens
    row_nll, row_correct = [], []
    try:
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            x = rows[i : i + batch_size]
            logits = model(input_ids=x).logits[:, P:-1].float()  # predictions made by decode steps
            target = x[:, P + 1 :]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [B, T-P-1]
            row_nll.append(nll.double().mean(1))
            row_correct.append((logits.argmax(-1) == target).double().mean(1))
    finally:
        if handle is not None:
            handle.remove()
    row_nll, row_correct = torch.cat(row_nll), torch.cat(row_correct)
    loss = float(row_nll.mean())
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": float(row_correct.mean()),
            "row_nll": item_list(row_nll), "row_accuracy": item_list(row_correct),
            "active_experts": handle.mean_active_experts() if handle else None,
            "full_experts": handle.mean_full_experts() if handle else None, "moe_layers": len(moe_layers(model))}


def unigram_row_nll(train_blocks: torch.Tensor, rows: torch.Tensor, prefill_tokens: int, vocab_size: int) -> list:
    """Each row's mean NLL over its decode positions under the corpus unigram model (add-one smoothing)."""
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab_size).double() + 1.0
    log_p = counts.log() - counts.sum().log()
    return item_list(-log_p[rows[:, prefill_tokens + 1 :]].mean(1))


@torch.no_grad()
def decode_step_latency(model, prompts: torch.Tensor, steps: int, rounds: int, make_handles: dict) -> dict:
    """Median seconds per decode step for each routing, interleaved over `rounds` rounds.

    `make_handles[name]()` installs a routing (returns hooks or None); each round
    prefills `prompts` [B, P] afresh (untimed) and times `steps` greedy decode steps.
    """
    times = {name: [] for name in make_handles}
    names = list(make_handles)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
            handle = make_handles[name]()
            try:
                out = model(input_ids=prompts, use_cache=True)
                cache = out.cache
                for _ in range(steps):
                    nxt = out.logits[:, -1:].argmax(-1)
                    t = time.perf_counter()
                    out = model(input_ids=nxt, cache=cache, use_cache=True)
                    times[name].append(time.perf_counter() - t)
            finally:
                if handle is not None:
                    handle.remove()
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    base = ctx.language_model()
    moe = moe_lm(ctx.scale, ctx.corpus, base=base)
    ctx.measure_on(moe)  # the record names the model measured here: the MoE, not the dense base LM
    model = moe.model.eval()
    with single_thread():
        seq_len = s["seq_len"]
        val = moe.blocks("validation", seq_len)
        big = max(s["batch_sizes"])
        if len(val) < big:
            raise ValueError(f"only {len(val)} validation blocks of {seq_len} tokens; need {big}")
        n = min(s["eval_rows"], len(val)) // big * big
        order = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))  # who shares a batch
        rows = val[:n][order]
        P = s["prefill_tokens"]

        quality = {str(B): {p: decode_quality(model, rows, B, P, p, s, seed=ctx.seed) for p in POLICIES}
                   for B in s["batch_sizes"]}
        sweep = []
        for m in s["kept_sweep"]:
            lynx = decode_quality(model, rows, big, P, "lynx", s, num_kept=m)
            random = decode_quality(model, rows, big, P, "random", s, num_kept=m, seed=ctx.seed)
            sweep.append({"num_kept": m, **{k: lynx[k] for k in ("perplexity", "accuracy", "active_experts")},
                          "random_perplexity": random["perplexity"], "random_accuracy": random["accuracy"],
                          "random_active_experts": random["active_experts"]})
        full_ppl = quality[str(big)]["full"]["perplexity"]
        layer_sensitivity = []
        for layer in moe_layers(model):
            handle = apply_lynx(model, LynxConfig(num_kept=s["num_kept"], layers=(layer.index,)), P)
            try:
                q = decode_quality(model, rows, big, P, "full", s)
            finally:
                handle.remove()
            layer_sensitivity.append({"layer": layer.index, "perplexity": q["perplexity"],
                                      "perplexity_ratio": q["perplexity"] / full_ppl})

        default_impl = model.config._experts_implementation
        latency = {}
        for impl in dict.fromkeys([default_impl, "eager"]):
            model.set_experts_implementation(impl)
            latency[impl] = {}
            for B in s["batch_sizes"]:
                prompts = rows[:B, : s["latency_prompt"]]
                secs = decode_step_latency(model, prompts, s["latency_steps"], s["latency_rounds"], {
                    p: (lambda p=p: install(model, p, s, None, track=False)) for p in TIMED})
                latency[impl][str(B)] = {
                    **{f"{p}_ms_per_step": 1e3 * secs[p] for p in TIMED},
                    **{f"{p}_ms_per_token": 1e3 * secs[p] / B for p in TIMED},
                    "speedup_lynx": secs["full"] / secs["lynx"], "speedup_top1": secs["full"] / secs["top1"]}
        model.set_experts_implementation(default_impl)

    layers = moe_layers(model)
    metrics = {
        "model": {"name": moe.name, "moe_layers": len(layers), "num_experts": layers[0].num_experts,
                  "top_k": layers[0].top_k, "parameters": sum(p.numel() for p in model.parameters()),
                  "expert_parameters": sum(p.numel() for layer in layers for p in layer.experts.parameters())},
        "prefill_tokens": P,
        "eval_rows": len(rows),
        "num_kept": s["num_kept"],
        "unigram_row_nll": unigram_row_nll(moe.blocks("train", seq_len), rows, P, len(moe.tokenizer)),
        "quality": quality,
        "kept_sweep": sweep,
        "layer_sensitivity": layer_sensitivity,
        "latency_implementation": default_impl,
        "latency": latency,
        "best_cpu_speedup_lynx": max(row["speedup_lynx"] for row in latency[default_impl].values()),
    }
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    lat_ax, q_ax, front_ax = fig.subplots(1, 3)
    colours = {"full": "black", "lynx": "tab:blue", "random": "tab:red", "top1": "tab:orange"}
    labels = {**LABELS, "lynx": f"Lynx (<= {m['num_kept']} experts)"}
    for impl, style in ((m["latency_implementation"], "-"), ("eager", ":")):
        rows = m["latency"].get(impl)
        if not rows:
            continue
        bs = sorted(rows, key=int)
        for p in TIMED:
            lat_ax.plot([int(b) for b in bs], [rows[b][f"{p}_ms_per_token"] for b in bs], style, marker="o",
                        color=colours[p], label=f"{labels[p]} ({impl})")
    lat_ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per token per decode step",
               title="Decode latency (1 CPU thread; reported, not checked)")
    lat_ax.legend(fontsize=6)
    bs = sorted(m["quality"], key=int)
    for p in POLICIES:
        q_ax.plot([int(b) for b in bs], [m["quality"][b][p]["perplexity"] for b in bs], marker="o",
                  color=colours[p], label=labels[p])
    q_ax.set(xscale="log", xlabel="batch size", ylabel="decode-position perplexity",
             title="Teacher-forced decoding quality")
    sizes = sorted(int(b) for b in m["quality"])
    for ax in (lat_ax, q_ax):
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
    q_ax.legend(fontsize=7)
    big = _big(m)
    q = m["quality"][big]
    caps = ",".join(str(r["num_kept"]) for r in m["kept_sweep"])
    front_ax.plot([r["active_experts"] for r in m["kept_sweep"]], [r["perplexity"] for r in m["kept_sweep"]],
                  marker="o", color=colours["lynx"], label=f"Lynx, cap m = {caps}")
    front_ax.plot([r["random_active_experts"] for r in m["kept_sweep"]],
                  [r["random_perplexity"] for r in m["kept_sweep"]], marker="s", ls="--", color=colours["random"],
                  label="random dropping, same experts per step")
    front_ax.scatter([q["top1"]["active_experts"]], [q["top1"]["perplexity"]], color=colours["top1"],
                     label=labels["top1"], zorder=3)
    front_ax.scatter([q["lynx"]["full_experts"]], [q["full"]["perplexity"]], color=colours["full"],
                     label=labels["full"], zorder=3)
    front_ax.set(xlabel="distinct experts per layer and decode step", ylabel="decode-position perplexity",
                 title=f"Experts touched vs quality (batch {big})")
    front_ax.legend(fontsize=7)
