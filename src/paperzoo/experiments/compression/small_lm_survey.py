"""Measurements of 2409.15790: what the architecture choices of small LMs cost at inference.

The survey benchmarks 59 real SLMs on devices. Here the same questions are asked of
controlled variants of one small Llama-style decoder (random weights: latency and
memory do not depend on the weight values), changing one architecture factor at a
time around a base model:

- attention: MHA (n_kv = n_h), GQA (n_kv = n_h / 4), MQA (n_kv = 1);
- FFN ratio: 2, 4, 8 (the survey's range of gated-FFN intermediate ratios);
- vocabulary: 2k, 8k, 32k tokens (x4 steps);
- depth against width at about the base model's parameter count: narrower and deeper,
  the base, wider and shallower (the layer count is rounded *up*, so the wide model
  never has fewer parameters than the narrow one).

Every variant is measured with `measure_inference` (batch 1, as on a device): prefill
latency, per-token decode latency with a KV cache, and peak memory. Latency is timed
on one thread, in interleaved rounds: every variant once per round, the order
rotated from round to round, so that load from other processes on a shared CPU and
any drift within a round fall on all variants alike.

Margins. A timing comparison is a ratio of two variants measured in the same round,
decided by the percentile-bootstrap interval over rounds of the mean log ratio
(`paperzoo.core.margins.decided` on per-round log times, paired by round): it passes
when the interval lies beyond zero, fails when it lies on the other side, and is
undecided (None) when it straddles zero. KV-cache bytes are exact and the peak memory is the
allocator's own deterministic count, so the memory checks compare single
measurements.

Precondition: an A/A comparison. A second, separately built copy of the base model
is timed in every round like any variant; the interval of its per-round log ratio
against the base model must lie within +-10% (``AA_BAND``). If two copies of the same
model time differently, no timing difference between variants can be trusted. The
run is also required to time on one thread. The number of rounds (10 at `small`)
was set so that the bootstrap over rounds has enough items; it was fixed before any
run under these rules and does not look at the variants' differences.

Earlier predicate (until the margins of issue 9): the same four sub-predicates on
the medians over 5 rounds as bare comparisons (e.g. GQA's median decode time below
MHA's), no precondition. Verdict at `small`, seed 0: reproduced. What is compared is
unchanged; timing comparisons now need their per-round ratios to agree beyond the
bootstrap interval, and the A/A precondition is new.
"""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np

from paperzoo.compression.small_lm_survey import (
    BYTES_PER_MB,
    SLMArchitecture,
    measure_inference,
)
from paperzoo.core.experiment import Claim, ExperimentError, Outcome, RunContext
from paperzoo.core.margins import all_of, decided, paired_difference

SWEEPS = ("attention", "ffn_ratio", "vocabulary", "depth_width")
AA_BAND = 0.10  # the A/A copy of the base model must time within +-10% of it (95% interval over rounds)
AA_KEY = "control: base model, second copy (A/A)"


def _sweep(m: dict, name: str) -> list[dict]:
    return [r for r in m["variants"] if r["sweep"] == name]


def _increasing(values: list[float]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def _log_times(m: dict, row: dict) -> np.ndarray:
    """Per-round log decode time of a variant (rounds are paired across variants)."""
    return np.log(m["per_round_decode_ms"][f"{row['sweep']}: {row['variant']}"])


def preconditions(m: dict) -> dict[str, bool | None]:
    a = np.log(m["per_round_decode_ms"][AA_KEY])
    b = np.log(m["per_round_decode_ms"][m["base_variant"]])
    aa = paired_difference(a, b)
    return {
        "timed on one thread": m["threads"] == 1,
        f"A/A: a second copy of the base model decodes within +-{AA_BAND:.0%} of it (95% interval over rounds)":
            aa.low > math.log(1 - AA_BAND) and aa.high < math.log(1 + AA_BAND),
    }


def checks(m: dict) -> dict[str, bool | None]:
    attention = {r["attention"]: r for r in _sweep(m, "attention")}
    mha, gqa, mqa = attention["MHA"], attention["GQA"], attention["MQA"]
    vocab = sorted(_sweep(m, "vocabulary"), key=lambda r: r["vocab_size"])
    shapes = sorted(_sweep(m, "depth_width"), key=lambda r: r["hidden_size"])
    narrow, wide = shapes[0], shapes[-1]

    def slower(a: dict, b: dict) -> bool | None:  # a decodes slower than b: shown, refuted, or undecided
        return decided(paired_difference(_log_times(m, a), _log_times(m, b)))


    return {
        "GQA and MQA hold less KV cache and peak memory than MHA (MQA < GQA < MHA)": (
            mqa["kv_cache_mb"] < gqa["kv_cache_mb"] < mha["kv_cache_mb"]
            and mqa["peak_memory_mb"] < gqa["peak_memory_mb"] < mha["peak_memory_mb"]),
        "GQA decodes faster per token than MHA": slower(mha, gqa),
        "a larger vocabulary costs peak memory and decode latency": all_of(
            [_increasing([r["peak_memory_mb"] for r in vocab]), *(slower(b, a) for a, b in itertools.pairwise(vocab))]),
        "at about equal parameters the deep-narrow model decodes slower than the shallow-wide one": slower(narrow, wide),
    }


CLAIM = Claim(
    statement=(
        "Benchmarking 59 small LMs (100M-5B parameters) with llama.cpp on a Jetson Orin and smartphones, the "
        "survey finds that inference latency depends on the architecture and not on the parameter count alone "
        "(Qwen1.5-0.5B has 25.4% more parameters than Qwen2-0.5B yet runs 31.9% faster on the Jetson), and that "
        "memory grows roughly linearly with the parameter count but is inflated by large vocabularies (Bloom) "
        "and by the attention choice; per the review, GQA models beat MHA models on both latency and memory."
    ),
    predicate=(
        "Random-weight variants of a Llama-style decoder (base: d=256, 8 layers, 8 heads, FFN ratio 4, 8k "
        "vocabulary, ~12.6M parameters), batch 1, 512-token prompt, 64 decode steps, CPU fp32, one thread, "
        "10 interleaved rounds: (1) KV cache and peak memory strictly fall from MHA (8 KV heads) to GQA (2) to "
        "MQA (1); (2) GQA's per-token decode latency is below MHA's; (3) peak memory and decode latency strictly "
        "rise with the vocabulary (2k, 8k, 32k); (4) at about the base parameter count, the narrowest, deepest "
        "model (d=128) decodes slower than the widest, shallowest one (d=384). Every latency comparison is the "
        "per-round ratio of the two variants: it holds when the 95% bootstrap interval over rounds lies above 1, "
        "fails when it lies below, and is undecided otherwise. "
        "Precondition: an A/A copy of the base model times within +-10% of it. FFN ratios 2/4/8 are measured "
        "and reported but carry no predicate: the survey ties the ratio to accuracy, not to a runtime finding."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv 2409.15790, §5 (runtime cost on devices: latency by architecture, Qwen1.5-0.5B against "
            "Qwen2-0.5B; memory against parameters, vocabulary size and attention type) and its insights "
            "on GQA; the review in /work/shared/seeds (2409.15790)"),
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ()
SUBSTRATE = ()
SEED_VARIES = "the random weights of every variant and the random prompt tokens they are timed on"

SCALES = {
    "smoke": {"hidden_size": 32, "num_layers": 2, "head_dim": 8, "ffn_ratio": 4.0, "vocab_size": 256,
              "kv_heads": [4, 2, 1], "ffn_ratios": [2.0, 4.0, 8.0], "vocab_sizes": [128, 256, 1024],
              "widths": [16, 32, 64], "batch": 1, "prompt_len": 16, "new_tokens": 4, "rounds": 1, "threads": 1},
    "small": {"hidden_size": 256, "num_layers": 8, "head_dim": 32, "ffn_ratio": 4.0, "vocab_size": 8192,
              "kv_heads": [8, 2, 1], "ffn_ratios": [2.0, 4.0, 8.0], "vocab_sizes": [2048, 8192, 32768],
              "widths": [128, 256, 384], "batch": 1, "prompt_len": 512, "new_tokens": 64, "rounds": 10, "threads": 1},
}


def layers_for_budget(base: SLMArchitecture, width: int, budget: int, head_dim: int) -> SLMArchitecture:
    """The variant of `base` with hidden size `width` and the fewest layers reaching `budget` parameters."""
    heads = width // head_dim
    one = SLMArchitecture(width, 1, heads, heads, base.ffn_ratio, base.vocab_size, base.max_seq_len)
    per_layer = SLMArchitecture(width, 2, heads, heads, base.ffn_ratio, base.vocab_size, base.max_seq_len
                                ).parameter_count() - one.parameter_count()
    layers = 1 + max(0, math.ceil((budget - one.parameter_count()) / per_layer))
    return SLMArchitecture(width, layers, heads, heads, base.ffn_ratio, base.vocab_size, base.max_seq_len)


def base_architecture(s: dict) -> SLMArchitecture:
    """The model every sweep varies one factor of (MHA, the middle FFN ratio, vocabulary and width)."""
    heads = s["hidden_size"] // s["head_dim"]
    return SLMArchitecture(s["hidden_size"], s["num_layers"], heads, heads, s["ffn_ratio"], s["vocab_size"],
                           s["prompt_len"] + s["new_tokens"])


def variants(s: dict) -> list[tuple[str, str, SLMArchitecture]]:
    """(sweep, label, architecture) for every sweep; the base model appears in each."""
    seq = s["prompt_len"] + s["new_tokens"]
    base = base_architecture(s)
    out = []
    for kv in s["kv_heads"]:
        a = SLMArchitecture(base.hidden_size, base.num_layers, base.num_heads, kv, base.ffn_ratio, base.vocab_size, seq)
        out.append(("attention", f"{a.attention} ({kv} KV head{'s' * (kv > 1)})", a))
    for ratio in s["ffn_ratios"]:
        a = SLMArchitecture(base.hidden_size, base.num_layers, base.num_heads, base.num_kv_heads, ratio, base.vocab_size, seq)
        out.append(("ffn_ratio", f"FFN ratio {ratio:g}", a))
    for vocab in s["vocab_sizes"]:
        a = SLMArchitecture(base.hidden_size, base.num_layers, base.num_heads, base.num_kv_heads, base.ffn_ratio, vocab, seq)
        out.append(("vocabulary", f"vocab {vocab}", a))
    for width in s["widths"]:
        a = base if width == base.hidden_size else layers_for_budget(base, width, base.parameter_count(), s["head_dim"])
        out.append(("depth_width", f"d={a.hidden_size}, {a.num_layers} layer{'s' * (a.num_layers > 1)}", a))
    return out


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    plan = variants(s)
    unique = list(dict.fromkeys(a for _, _, a in plan))  # the base model is measured once for all sweeps
    models = {a: a.build() for a in unique}
    base = base_architecture(s)
    if base not in models:
        raise ExperimentError("the settings' sweeps must include the base model itself (it anchors the A/A control)")
    timed = [(a, models[a]) for a in unique] + [(AA_KEY, base.build())]  # the A/A copy: fresh weights, same shape
    first, decode, prefill = {}, {k: [] for k, _ in timed}, {k: [] for k, _ in timed}
    for round_index in range(s["rounds"]):
        shift = round_index % len(timed)  # rotate the order every round
        for key, model in timed[shift:] + timed[:shift]:
            r = measure_inference(model, s["batch"], s["prompt_len"], s["new_tokens"], repeats=1,
                                  warmup=1 if round_index == 0 else 0,
                                  measure_memory=round_index == 0 and key != AA_KEY,
                                  threads=s["threads"], seed=ctx.seed)
            first.setdefault(key, r)
            decode[key].append(r["decode_ms_per_token"])
            prefill[key].append(r["prefill_ms"])
    rows = []
    for sweep, label, a in plan:
        r = first[a]
        rows.append({
            "sweep": sweep, "variant": label, "attention": a.attention, "hidden_size": a.hidden_size,
            "num_layers": a.num_layers, "num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads,
            "ffn_ratio": a.ffn_ratio, "vocab_size": a.vocab_size, "parameters_m": a.parameter_count() / 1e6,
            "prefill_ms": statistics.median(prefill[a]), "decode_ms_per_token": statistics.median(decode[a]),
            "peak_memory_mb": r["peak_memory_bytes"] / BYTES_PER_MB, "weights_mb": r["weight_bytes"] / BYTES_PER_MB,
            "kv_cache_mb": r["kv_cache_bytes"] / BYTES_PER_MB,
        })
    base_variant = next(f"{sw}: {lb}" for sw, lb, a in plan if a == base)
    metrics = {"variants": rows, "base_variant": base_variant, "batch": s["batch"], "prompt_len": s["prompt_len"],
               "new_tokens": s["new_tokens"], "rounds": s["rounds"], "threads": s["threads"],
               "memory_method": first[unique[0]]["memory_method"],
               "per_round_decode_ms": {**{f"{sw}: {lb}": decode[a] for sw, lb, a in plan}, AA_KEY: decode[AA_KEY]},
               "per_round_prefill_ms": {**{f"{sw}: {lb}": prefill[a] for sw, lb, a in plan}, AA_KEY: prefill[AA_KEY]}}
    metrics.update(_ratios(metrics))
    return Outcome(metrics, lambda fig: plot(fig, metrics),
                   notes="random weights; CPU fp32 through transformers, not llama.cpp on a device")


def _ratios(m: dict) -> dict:
    """The headline comparisons as ratios, for the numbers table."""
    attention = {r["attention"]: r for r in _sweep(m, "attention")}
    vocab = sorted(_sweep(m, "vocabulary"), key=lambda r: r["vocab_size"])
    shapes = sorted(_sweep(m, "depth_width"), key=lambda r: r["hidden_size"])
    ffn = sorted(_sweep(m, "ffn_ratio"), key=lambda r: r["ffn_ratio"])
    mha = attention["MHA"]
    out = {}
    for kind in ("GQA", "MQA"):
        for key in ("kv_cache_mb", "peak_memory_mb", "decode_ms_per_token", "prefill_ms"):
            out[f"{kind.lower()}_over_mha_{key}"] = attention[kind][key] / mha[key]
    for name, rows in (("vocab_largest_over_smallest", vocab), ("ffn_largest_over_smallest", ffn),
                       ("deep_narrow_over_shallow_wide", shapes)):
        lo, hi = (rows[-1], rows[0]) if name.startswith("deep") else (rows[0], rows[-1])
        for key in ("parameters_m", "peak_memory_mb", "decode_ms_per_token", "prefill_ms"):
            out[f"{name}_{key}"] = hi[key] / lo[key]
    return out


def plot(fig, m: dict) -> None:
    axes = fig.subplots(2, len(SWEEPS))
    titles = {"attention": "attention type", "ffn_ratio": "FFN ratio", "vocabulary": "vocabulary size",
              "depth_width": "depth vs width (~equal params)"}
    for column, sweep in enumerate(SWEEPS):
        rows = _sweep(m, sweep)
        labels = [r["variant"].replace(" (", "\n(").replace(", ", "\n") for r in rows]
        x = np.arange(len(rows))
        top, bottom = axes[0, column], axes[1, column]
        rounds = [m["per_round_decode_ms"][f"{sweep}: {r['variant']}"] for r in rows]
        medians = [r["decode_ms_per_token"] for r in rows]
        spread = [[md - min(v) for md, v in zip(medians, rounds)], [max(v) - md for md, v in zip(medians, rounds)]]
        top.bar(x, medians, yerr=spread, color="tab:blue", capsize=3)
        top.set(title=titles[sweep], xticks=x, xticklabels=[])
        if column == 0:
            top.set_ylabel("decode ms / token\n(median, range over rounds)")
        weights = np.array([r["weights_mb"] for r in rows])
        kv = np.array([r["kv_cache_mb"] for r in rows])
        rest = np.maximum(0.0, np.array([r["peak_memory_mb"] for r in rows]) - weights - kv)
        bottom.bar(x, weights, color="tab:grey", label="weights")
        bottom.bar(x, kv, bottom=weights, color="tab:orange", label="KV cache")
        bottom.bar(x, rest, bottom=weights + kv, color="tab:green", label="other transient at peak")
        bottom.set(xticks=x)
        bottom.set_xticklabels(labels, fontsize=7)
        for xi, r in zip(x, rows):
            bottom.annotate(f"{r['parameters_m']:.1f}M params", (xi, r["peak_memory_mb"]), ha="center", va="bottom", fontsize=7)
        if column == 0:
            bottom.set_ylabel("peak memory (MB)")
            bottom.legend(fontsize=7, loc="lower left")
