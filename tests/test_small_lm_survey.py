"""The small-LM survey's measurement: exact sizes, KV-cache bytes, allocator peaks, greedy decoding, the predicate."""

import numpy as np
import pytest
import torch
from tiny_models import tiny

from paperzoo.compression.small_lm_survey import (
    SLMArchitecture,
    _Generation,
    kv_cache_bytes,
    measure_inference,
    peak_allocated_bytes,
    weight_bytes,
)
from paperzoo.experiments.compression.small_lm_survey import AA_KEY, checks, layers_for_budget, preconditions

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "ffn_ratio": 3.0, "vocab_size": 96,
        "max_seq_len": 64}


@pytest.mark.parametrize("kv, ratio, vocab", [(4, 3.0, 96), (2, 2.0, 96), (1, 8.0, 96), (4, 3.0, 500)])
def test_parameter_count_is_exact(kv, ratio, vocab):
    a = SLMArchitecture(**{**TINY, "num_kv_heads": kv, "ffn_ratio": ratio, "vocab_size": vocab})
    model = a.build()
    assert sum(p.numel() for p in model.parameters()) == a.parameter_count()
    assert model.config.num_key_value_heads == kv and model.config.intermediate_size == round(ratio * 32)
    assert weight_bytes(model) == 4 * a.parameter_count() + sum(b.numel() * 4 for b in model.buffers())


def test_attention_names_and_bad_architectures():
    assert [SLMArchitecture(**{**TINY, "num_kv_heads": k}).attention for k in (4, 2, 1)] == ["MHA", "GQA", "MQA"]
    with pytest.raises(ValueError, match="not divisible by num_kv_heads"):
        SLMArchitecture(**{**TINY, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        SLMArchitecture(**{**TINY, "num_heads": 5, "num_kv_heads": 1})
    with pytest.raises(ValueError, match="ffn_ratio"):
        SLMArchitecture(**{**TINY, "ffn_ratio": 0.0})


def test_kv_cache_matches_the_formula_and_shrinks_with_kv_heads():
    torch.manual_seed(0)
    batch, prompt, new = 2, 9, 3
    measured = {}
    for kv in (4, 2, 1):
        a = SLMArchitecture(**{**TINY, "num_kv_heads": kv})
        r = measure_inference(a.build(), batch, prompt, new, repeats=1, warmup=0, measure_memory=False)
        # 2 (K, V) * L * n_kv * d_h * T * b * 4 bytes; T = prompt + one cached token per decode pass
        assert r["kv_cache_bytes"] == 2 * 2 * kv * 8 * (prompt + new) * batch * 4 == a.kv_bytes_per_token() * (prompt + new) * batch
        measured[kv] = r["kv_cache_bytes"]
    assert measured[4] == 2 * measured[2] == 4 * measured[1]


def test_peak_allocated_bytes_by_hand():
    def run():
        a = torch.empty(250_000)  # 1,000,000 bytes
        b = torch.empty(500_000)  # 2,000,000: 3 MB live
        del a
        c = torch.empty(125_000)  # 500,000: 2.5 MB live
        del b, c

    assert peak_allocated_bytes(run) == 3_000_000
    assert peak_allocated_bytes(lambda: None) == 0


def test_peak_memory_holds_weights_and_cache():
    a = SLMArchitecture(**{**TINY, "num_kv_heads": 2})
    model = a.build()
    r = measure_inference(model, 1, 20, 5, repeats=2)
    assert r["peak_memory_bytes"] == r["weight_bytes"] + r["activation_peak_bytes"]
    assert r["activation_peak_bytes"] >= r["kv_cache_bytes"] > 0  # the cache is alive at the end of generation
    assert len(r["decode_ms_per_token_all"]) == 2 and r["decode_ms_per_token"] > 0 and r["prefill_ms"] > 0


def test_greedy_loop_matches_transformers_generate():
    """The timed loop must really use the cache: its tokens equal generate()'s greedy tokens."""
    for model in (SLMArchitecture(**{**TINY, "num_kv_heads": 2}).build(), tiny("gpt2")):
        ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
        generation = _Generation(model, ids, new_tokens=5)
        generation()
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)[:, 7:]
        assert torch.equal(generation.tokens, reference)


def test_other_architectures_and_threads_restored():
    model = tiny("gpt2")  # 6 layers, n_embd 32: K and V are 32 wide per layer
    threads = torch.get_num_threads()
    r = measure_inference(model, 1, 10, 2, repeats=1, warmup=0, measure_memory=False, threads=1)
    assert r["kv_cache_bytes"] == 2 * 6 * 32 * 12 * 4 and r["threads"] == 1
    assert torch.get_num_threads() == threads


def test_bad_input_is_a_value_error():
    model = SLMArchitecture(**TINY).build()
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        measure_inference(model, 1, 60, 5)
    for name, args, kwargs in (("batch", (0, 4, 4), {}), ("prompt_len", (1, 1.5, 4), {}), ("new_tokens", (1, 4, -1), {}),
                               ("repeats", (1, 4, 4), {"repeats": 0}), ("warmup", (1, 4, 4), {"warmup": -1}),
                               ("threads", (1, 4, 4), {"threads": 0}), ("batch", (True, 4, 4), {})):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= "):
            measure_inference(model, *args, **kwargs)
    with pytest.raises(ValueError, match="cannot read"):
        kv_cache_bytes(object())
    with pytest.raises(ValueError, match="run must be callable"):
        peak_allocated_bytes(None)
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1"):
        SLMArchitecture(**{**TINY, "num_layers": 2.5})
    with pytest.raises(ValueError, match="ffn_ratio must be a finite number > 0"):
        SLMArchitecture(**{**TINY, "ffn_ratio": float("nan")})


def test_layers_for_budget_is_the_fewest_layers_reaching_the_budget():
    base = SLMArchitecture(**{**TINY, "num_kv_heads": 4})
    for width in (16, 32, 64):
        a = layers_for_budget(base, width, 40_000, head_dim=8)
        assert a.hidden_size == width and a.num_heads == width // 8 and a.parameter_count() >= 40_000
        if a.num_layers > 1:
            fewer = SLMArchitecture(width, a.num_layers - 1, a.num_heads, a.num_kv_heads, a.ffn_ratio, a.vocab_size)
            assert fewer.parameter_count() < 40_000


def _row(sweep, attention="MHA", vocab=8192, hidden=256, decode=10.0, peak=50.0, kv=4.0):
    return {"sweep": sweep, "variant": f"{attention} {vocab} {hidden}", "attention": attention, "vocab_size": vocab,
            "hidden_size": hidden, "decode_ms_per_token": decode, "peak_memory_mb": peak, "kv_cache_mb": kv}


def _metrics(rows, noise=0.0, rounds=8, aa=1.0):
    """Per-round decode times around each row's value; every round scales all variants alike (shared load)."""
    rng = np.random.default_rng(0)
    load = np.exp(rng.normal(0.0, 0.3, rounds))  # busy and idle rounds: cancels in a within-round ratio

    def times(ms):
        return list(ms * load * np.exp(rng.normal(0.0, noise, rounds)))

    per_round = {f"{r['sweep']}: {r['variant']}": times(r["decode_ms_per_token"]) for r in rows}
    base = rows[0]
    per_round[AA_KEY] = times(base["decode_ms_per_token"] * aa)
    return {"variants": rows, "per_round_decode_ms": per_round, "base_variant": f"{base['sweep']}: {base['variant']}",
            "threads": 1}


def _rows():
    return [_row("attention", "MHA", decode=10.0, peak=50.0, kv=4.0), _row("attention", "GQA", decode=9.0, peak=47.0, kv=1.0),
            _row("attention", "MQA", decode=9.5, peak=46.5, kv=0.5),
            _row("vocabulary", vocab=32768, decode=20.0, peak=90.0), _row("vocabulary", vocab=2048, decode=8.0, peak=35.0),
            _row("vocabulary", vocab=8192, decode=10.0, peak=50.0),
            _row("depth_width", hidden=384, decode=6.0), _row("depth_width", hidden=128, decode=15.0),
            _row("depth_width", hidden=256, decode=10.0)]


def test_predicate_by_hand():
    rows = _rows()
    assert list(checks(_metrics(rows)).values()) == [True, True, True, True]
    assert list(checks(_metrics(rows, noise=0.02)).values()) == [True, True, True, True]
    rows[1]["decode_ms_per_token"] = 11.0  # GQA slower than MHA: fails
    rows[2]["kv_cache_mb"] = 1.0  # MQA's cache not below GQA's
    rows[5]["decode_ms_per_token"] = 25.0  # 8k vocab slower than 32k: not increasing
    rows[7]["decode_ms_per_token"] = 5.0  # the narrow model faster than the wide one
    assert list(checks(_metrics(rows)).values()) == [False, False, False, False]
    # GQA faster on average (8.9 vs 10 ms) but slower in two of five rounds: undecided, not beyond the spread
    m = _metrics(_rows(), rounds=5)
    m["per_round_decode_ms"]["attention: MHA 8192 256"] = [10.0] * 5
    m["per_round_decode_ms"]["attention: GQA 8192 256"] = [7.0, 7.5, 11.0, 7.0, 12.0]
    assert list(checks(m).values())[1] is None


def test_preconditions_by_hand():
    assert list(preconditions(_metrics(_rows(), noise=0.02)).values()) == [True, True]
    assert list(preconditions(_metrics(_rows(), noise=0.02, aa=1.3)).values()) == [True, False]  # copies disagree
    assert list(preconditions(_metrics(_rows(), noise=0.5)).values())[1] is False  # too noisy to tell
    assert list(preconditions({**_metrics(_rows()), "threads": 2}).values())[0] is False
