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
single-threaded, in interleaved rounds (every variant once per round, median over
rounds), so that load from other processes on a shared CPU falls on all variants
alike instead of on whichever ran during a busy spell.
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

SWEEPS = ("attention", "ffn_ratio", "vocabulary", "depth_width")


def _sweep(m: dict, name: str) -> list[dict]:
    return [r for r in m["variants"] if r["sweep"] == name]


def _increasing(values: list[float]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def checks(m: dict) -> dict[str, bool]:
    attention = {r["attention"]: r for r in _sweep(m, "attention")}
    mha, gqa, mqa = attention["MHA"], attention["GQA"], attention["MQA"]
    vocab = sorted(_sweep(m, "vocabulary"), key=lambda r: r["vocab_size"])
    shapes = sorted(_sweep(m, "depth_width"), key=lambda r: r["hidden_size"])
    narrow, wide = shapes[0], shapes[-1]
    return {
        "GQA and MQA hold less KV cache and peak memory than MHA (MQA < GQA < MHA)": (
            mqa["kv_cache_mb"] < gqa["kv_cache_mb"] < mha["kv_cache_mb"]
            and mqa["peak_memory_mb"] < gqa["peak_memory_mb"] < mha["peak_memory_mb"]),
        "GQA decodes faster per token than MHA": gqa["decode_ms_per_token"] < mha["decode_ms_per_token"],
        "a larger vocabulary costs peak memory and decode latency": (
            _increasing([r["peak_memory_mb"] for r in vocab])
            and _increasing([r["decode_ms_per_token"] for r in vocab])),
        "at about equal parameters the deep-narrow model decodes slower than the shallow-wide one": (
            narrow["decode_ms_per_token"] > wide["decode_ms_per_token"]),
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
        "medians over 5 interleaved rounds: (1) KV cache and peak memory strictly fall from MHA (8 KV heads) to "
        "GQA (2) to MQA (1); (2) GQA's per-token decode latency is below MHA's; (3) peak memory and decode "
        "latency strictly rise with the vocabulary (2k, 8k, 32k); (4) at about the base parameter count, the "
        "narrowest, deepest model (d=128) decodes slower than the widest, shallowest one (d=384). FFN ratios "
        "2/4/8 are measured and reported but carry no predicate: the survey ties the ratio to accuracy, not to "
        "a runtime finding."
    ),
    checks=checks,
)

# What a user may swap in (--model / --corpus), and the shared cached models this runs on.
INPUTS = ()
SUBSTRATE = ()

SCALES = {
    "smoke": {"hidden_size": 32, "num_layers": 2, "head_dim": 8, "ffn_ratio": 4.0, "vocab_size": 256,
              "kv_heads": [4, 2, 1], "ffn_ratios": [2.0, 4.0, 8.0], "vocab_sizes": [128, 256, 1024],
              "widths": [16, 32, 64], "batch": 1, "prompt_len": 16, "new_tokens": 4, "rounds": 1, "threads": 1},
    "small": {"hidden_size": 256, "num_layers": 8, "head_dim": 32, "ffn_ratio": 4.0, "vocab_size": 8192,
              "kv_heads": [8, 2, 1], "ffn_ratios": [2.0, 4.0, 8.0], "vocab_sizes": [2048, 8192, 32768],
              "widths": [128, 256, 384], "batch": 1, "prompt_len": 512, "new_tokens": 64, "rounds": 5, "threads": 1},
}


def layers_for_budget(base: SLMArchitecture, width: int, budget: int, head_dim: int) -> SLMArchitecture:
    """The variant of `base` with hidden size `width` and the fewest layers reaching `budget` parameters."""
    heads = width // head_dim
    one = SLMArchitecture(width, 1, heads, heads, base.ffn_ratio, base.vocab_size, base.max_seq_len)
    per_layer = SLMArchitecture(width, 2, heads, heads, base.ffn_ratio, base.vocab_size, base.max_seq_len
                                ).parameter_count() - one.parameter_count()
    layers = 1 + max(0, math.ceil((budget - one.parameter_count()) / per_layer))
    return SLMArchitecture(width, layers, heads, heads, base.ffn_ratio, base.vocab_size, base.max_seq_len)


def variants(s: dict) -> list[tuple[str, str, SLMArchitecture]]:
    """(sweep, label, architecture) for every sweep; the base model appears in each."""
    seq = s["prompt_len"] + s["new_tokens"]
    base = SLMArchitecture(s["hidden_size"], s["num_layers"], s["hidden_size"] // s["head_dim"],
                           s["hidden_size"] // s["head_dim"], s["ffn_ratio"], s["vocab_size"], seq)
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
    if ctx.model is not None:
        raise ExperimentError("small-lm-survey builds its own architecture variants; --model is not supported")
    s = ctx.settings
    plan = variants(s)
    unique = list(dict.fromkeys(a for _, _, a in plan))  # the base model is measured once for all sweeps
    models = {a: a.build() for a in unique}
    first, decode, prefill = {}, {a: [] for a in unique}, {a: [] for a in unique}
    for round_index in range(s["rounds"]):
        for a in unique:
            r = measure_inference(models[a], s["batch"], s["prompt_len"], s["new_tokens"], repeats=1,
                                  warmup=1 if round_index == 0 else 0, measure_memory=round_index == 0,
                                  threads=s["threads"], seed=ctx.seed)
            first.setdefault(a, r)
            decode[a].append(r["decode_ms_per_token"])
            prefill[a].append(r["prefill_ms"])
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
    metrics = {"variants": rows, "batch": s["batch"], "prompt_len": s["prompt_len"], "new_tokens": s["new_tokens"],
               "rounds": s["rounds"], "threads": s["threads"],
               "memory_method": first[unique[0]]["memory_method"],
               "per_round_decode_ms": {f"{sw}: {lb}": decode[a] for sw, lb, a in plan},
               "per_round_prefill_ms": {f"{sw}: {lb}": prefill[a] for sw, lb, a in plan}}
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
