import math

import numpy as np
import pytest
import torch
from tiny_models import ARCHS, tiny

from paperzoo.compression.l_mul_multiplication import (
    attention_arithmetic,
    attention_operands,
    l_mul,
    l_mul_matmul,
    offset_exponent,
    round_mantissa,
    round_operand,
    round_to_fp8,
    simulated_attention,
    simulated_matmul,
    simulated_multiply,
)

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def test_offset_exponent_follows_the_paper():
    assert [offset_exponent(m) for m in range(1, 9)] == [1, 2, 3, 3, 4, 4, 4, 4]
    assert offset_exponent(23) == 4
    for bad in (0, 24, 3.0):
        with pytest.raises(ValueError):
            offset_exponent(bad)


@pytest.mark.parametrize("x, y, m, expected", [
    # no carry: (1 + x_m + y_m + 2^-l(m)) 2^(x_e + y_e)
    (1.25, 1.25, 3, 1 + 0.25 + 0.25 + 2 ** -3),
    (1.25, 1.25, 7, 1 + 0.25 + 0.25 + 2 ** -4),
    (1.25, 1.5, 4, 1 + 0.25 + 0.5 + 2 ** -3),
    (2.0, 4.0, 3, (1 + 2 ** -3) * 8),
    (0.5, 8.0, 7, (1 + 2 ** -4) * 4),
    (1.0, 1.0, 1, 1.5),
    # carry: x_m + y_m + 2^-l >= 1 overflows into the exponent, (x_m + y_m + 2^-l) 2^(x_e + y_e + 1)
    (1.5, 1.5, 3, (0.5 + 0.5 + 2 ** -3) * 2),  # 2.25, where the displayed formula would give 2.125
    (1.75, 1.75, 3, (0.75 + 0.75 + 2 ** -3) * 2),
    (1.5, 1.5, 7, (0.5 + 0.5 + 2 ** -4) * 2),
    # operands are first rounded to nearest even: 1.0625 = 1.0001b has no 3-bit mantissa -> 1.0
    (1.0625, 1.0, 3, 1 + 2 ** -3),
    (1.1875, 1.0, 3, 1 + 0.25 + 2 ** -3),  # 1.0011b -> 1.010b
])
def test_l_mul_by_hand(x, y, m, expected):
    got = l_mul(torch.tensor([x, -x, x, -x]), torch.tensor([y, y, -y, -y]), m)
    assert got.tolist() == [expected, -expected, -expected, expected]


@pytest.mark.parametrize("m", [1, 3, 7, 21, 22, 23])
def test_zeros_and_range_limits_for_every_width(m):
    big, small = 2.0 ** 126, 2.0 ** -125  # the product of big with itself overflows, of small with itself underflows
    x = torch.tensor([0.0, 0.0, big, -big, small, big, 2.0])
    y = torch.tensor([0.0, big, 0.0, big, small, small, 2.0 ** -100])
    got = l_mul(x, y, m)
    assert got[:3].abs().tolist() == [0.0, 0.0, 0.0]
    assert got[3] == float("-inf") and got[4] == 0.0
    assert got[5] == (1 + 2.0 ** -offset_exponent(m)) * 2.0
    assert got[6] == (1 + 2.0 ** -offset_exponent(m)) * 2.0 ** -99


def test_zero_overflow_underflow_and_bad_input():
    x = torch.tensor([0.0, -0.0, 3.0, 1e30, 1e-30])
    y = torch.tensor([5.0, 5.0, 0.0, 1e30, 1e-30])
    got = l_mul(x, y, 4)
    assert got[:3].abs().tolist() == [0.0, 0.0, 0.0]
    assert got[3] == float("inf") and got[4] == 0.0
    with pytest.raises(ValueError):
        l_mul(torch.tensor([float("nan")]), torch.tensor([1.0]), 3)
    with pytest.raises(ValueError):
        l_mul(torch.tensor([1.0]), torch.tensor([float("inf")]), 3)
    with pytest.raises(ValueError):
        simulated_multiply(torch.ones(1), torch.ones(1), "fp7")


def test_fp32_l_mul_is_the_papers_integer_addition():
    """The paper's GPU routine (its Figure 2): bits(x) + bits(y) - 0x3F780000, sign by XOR."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10_000, generator=g) * 5, torch.randn(10_000, generator=g) * 5
    bx, by = x.view(torch.int32).long(), y.view(torch.int32).long()
    magnitude = (bx & 0x7FFFFFFF) + (by & 0x7FFFFFFF) - 0x3F780000
    sign = (bx ^ by) & (1 << 31)
    expected = (magnitude | sign).to(torch.int64)
    expected = torch.where(expected >= 1 << 31, expected - (1 << 32), expected).to(torch.int32).view(torch.float32)
    assert torch.equal(l_mul(x, y, 23), expected)


def test_rounding_matches_torch_casts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * 3
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -4 + 2 ** -5])  # exact halfway cases
    for v in (x, ties):
        assert torch.equal(round_mantissa(v, 7), v.bfloat16().float())
    normal = x[(x.abs() > 2 ** -6) & (x.abs() < 200)]
    assert torch.equal(round_mantissa(normal, 3), normal.to(torch.float8_e4m3fn).float())
    assert torch.equal(round_mantissa(normal, 2), normal.to(torch.float8_e5m2).float())
    assert torch.equal(round_mantissa(x, 23), x)


def test_fp8_per_tensor_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    x = x / x.abs().max() * 300  # max |x| = 300: the power-of-two scale is 1
    assert torch.equal(round_to_fp8(x, torch.float8_e4m3fn), x.to(torch.float8_e4m3fn).float())
    # a power-of-two rescaling of the tensor is undone exactly
    assert torch.equal(round_to_fp8(x * 2 ** -20, torch.float8_e4m3fn), round_to_fp8(x, torch.float8_e4m3fn) * 2 ** -20)
    tiny_values = torch.full((4,), 1e-5)  # below e4m3's smallest subnormal unscaled: 0 without the scale
    assert round_to_fp8(tiny_values, torch.float8_e4m3fn, scaled=False).eq(0).all()
    assert torch.allclose(round_to_fp8(tiny_values, torch.float8_e4m3fn), tiny_values, rtol=2 ** -4)


@pytest.mark.parametrize("m", [3, 4, 7])
def test_matmul_is_elementwise_l_mul_summed(m):
    g = torch.Generator().manual_seed(m)
    a, b = torch.randn(2, 3, 9, 16, generator=g), torch.randn(3, 16, 5, generator=g)  # b broadcasts over a's batch
    a[0, 0, 0, :4] = 0.0
    expected = l_mul(a[..., :, None, :], b.transpose(-1, -2)[..., None, :, :], m).sum(-1)
    assert torch.equal(l_mul_matmul(a, b, m), expected)
    assert torch.equal(l_mul_matmul(a, b, m, max_elements=50), expected)  # row-chunked
    assert torch.equal(l_mul_matmul(a, b, m, max_elements=3000), expected)  # several matrices per chunk
    with pytest.raises(ValueError):
        l_mul_matmul(a, b.transpose(-1, -2), m)
    a[1, 2, 3, :2], b[2, :2, 1] = 1e30, 1e30  # products that overflow and underflow
    a[1, 2, 4, :2], b[2, :2, 2] = 1e-30, 1e-30
    expected = l_mul(a[..., :, None, :], b.transpose(-1, -2)[..., None, :, :], m).sum(-1)
    assert torch.equal(l_mul_matmul(a, b, m), expected) and torch.isinf(expected).any()


def test_simulated_matmul_arithmetics():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 32, generator=g), torch.randn(32, 8, generator=g)
    assert torch.equal(simulated_matmul(a, b, "exact"), a @ b)
    assert torch.equal(simulated_matmul(a, b, "bf16"), a.bfloat16().float() @ b.bfloat16().float())
    errors = {ar: (simulated_matmul(a, b, ar) - a @ b).abs().mean().item()
              for ar in ("bf16", "fp8-e4m3", "fp8-e5m2", "l-mul-3", "l-mul-7")}
    assert errors["bf16"] < errors["fp8-e4m3"] < errors["fp8-e5m2"]
    assert errors["l-mul-7"] < errors["l-mul-3"] and 0 < errors["l-mul-7"]


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_attention_reproduces_the_models_logits(arch):
    model = tiny(arch)
    own = model(input_ids=IDS).logits  # the model's default (sdpa) attention
    model.set_attn_implementation("eager")
    eager = model(input_ids=IDS).logits
    with attention_arithmetic(model, "exact"):
        assert model.config._attn_implementation == "paperzoo-exact"
        exact = model(input_ids=IDS).logits
    assert model.config._attn_implementation == "eager", "the previous implementation must be restored"
    assert torch.equal(exact, eager)
    assert torch.allclose(exact, own, atol=1e-5)
    with attention_arithmetic(model, "l-mul-3"):
        approx = model(input_ids=IDS).logits
    assert not torch.equal(approx, exact) and torch.allclose(approx, exact, atol=0.2)


def test_l_mul_attention_stays_causal():
    model = tiny("llama")
    changed = IDS.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    with attention_arithmetic(model, "l-mul-4"):
        a, b = model(input_ids=IDS).logits, model(input_ids=changed).logits
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.equal(a[:, 8:], b[:, 8:])


def test_attention_operands_are_the_models():
    model = tiny("llama")
    model.set_attn_implementation("eager")
    weights = model(input_ids=IDS, output_attentions=True).attentions
    record = attention_operands(model, IDS)
    assert len(record) == len(weights) == 6
    for rec, w in zip(record, weights):
        assert torch.equal(rec["probs"], w)
        assert rec["key"].shape == rec["query"].shape  # kv heads repeated for grouped-query attention
        assert torch.equal(rec["probs"].triu(1), torch.zeros_like(w))  # causal


def _gemma2(softcap, seed=0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
                          attn_logit_softcapping=softcap, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # larger queries: scores beyond the cap's linear range, so the cap matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    return model


def test_gemma2_soft_capping_and_sliding_window_are_followed():
    capped, uncapped = _gemma2(0.01), _gemma2(None)  # a cap small enough to bend this model's small scores
    own = capped(input_ids=IDS).logits
    assert not torch.allclose(own, uncapped(input_ids=IDS).logits, atol=1e-3), "the cap must matter here"
    with attention_arithmetic(capped, "exact"):
        exact = capped(input_ids=IDS).logits
    assert torch.allclose(exact, own, atol=1e-6)
    with attention_arithmetic(capped, "l-mul-3"):
        approx = capped(input_ids=IDS).logits
    assert not torch.equal(approx, exact) and torch.isfinite(approx).all()
    # the cap by hand on the scores: c tanh(s / c), before the mask
    q, k = torch.randn(1, 2, 4, 8) * 3, torch.randn(1, 2, 4, 8) * 3
    out, probs = simulated_attention(torch.nn.Module(), q, k, k, None, scaling=1.0, arithmetic="exact", softcap=2.0)
    assert torch.allclose(probs, torch.softmax(2.0 * torch.tanh(q @ k.transpose(-1, -2) / 2.0), -1), atol=1e-6)


def test_unsupported_attention_features_and_bad_input_raise():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="sinks"):
        simulated_attention(torch.nn.Module(), q, q, q, None, arithmetic="l-mul-3", s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        simulated_attention(torch.nn.Module(), q, q, q, None, arithmetic="l-mul-3", softcap=-1.0)
    with pytest.raises(ValueError, match="unknown arithmetic"):
        simulated_attention(torch.nn.Module(), q, q, q, None, arithmetic="fp4")
    model = tiny("llama")
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))  # as gpt-oss holds them
    with pytest.raises(ValueError, match="attention sinks"):
        with attention_arithmetic(model, "l-mul-3"):
            pass
    with pytest.raises(ValueError, match="unknown arithmetic"):
        with attention_arithmetic(tiny("llama"), "fp7"):
            pass
    with pytest.raises(ValueError, match="AttentionInterface"):
        with attention_arithmetic(torch.nn.Linear(2, 2), "exact"):
            pass
    with pytest.raises(ValueError, match=r"mantissa bits m must be an integer in 1\.\.23"):
        l_mul(torch.ones(2), torch.ones(2), 0)
    with pytest.raises(ValueError, match="broadcast"):
        l_mul(torch.ones(2), torch.ones(3), 3)
    with pytest.raises(ValueError, match="max_elements must be an integer >= 1"):
        l_mul_matmul(torch.ones(2, 2), torch.ones(2, 2), 3, max_elements=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        round_to_fp8(torch.ones(2), torch.bfloat16)
    with pytest.raises(ValueError, match="positions"):
        attention_operands(tiny("llama"), torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        attention_operands(tiny("llama"), torch.zeros(4))


def _metrics(errors: dict, nll: dict, noise: float = 0.0, n_seq: int = 16):
    """errors[source][arithmetic]: mean relative error; nll[arithmetic]: mean NLL. Paired items around them."""
    rng = np.random.default_rng(0)
    chunks = rng.normal(0.0, 0.002, 200)  # chunk-to-chunk variation shared by every arithmetic
    seqs = rng.normal(0.0, 0.2, n_seq)

    def items(base, mean, scale):
        return list(mean + base - base.mean() + rng.normal(0.0, noise * scale, len(base)))

    ppl = {a: math.exp(v) for a, v in nll.items()}
    return {"elementwise_chunks": {src: {a: items(chunks, v, 0.01) for a, v in table.items()}
                                   for src, table in errors.items()},
            "sequence_nll": {a: items(seqs, v, 1.0) for a, v in nll.items()},
            "perplexity": ppl, "model_perplexity": ppl["exact"]}


def test_checks_by_hand():
    from paperzoo.experiments.compression.l_mul_multiplication import checks, preconditions

    def table(l3, l4, e4, e5):
        return {"l-mul-3": l3, "l-mul-4": l4, "fp8-e4m3": e4, "fp8-e5m2": e5}

    errors = {"gaussian": table(0.05, 0.0370, 0.03, 0.06), "attention": table(0.06, 0.05, 0.03, 0.06)}
    log = math.log
    nll = {"exact": log(100.0), "l-mul-7": log(100.5), "l-mul-3": log(101.5), "fp8-e5m2": log(101.0),
           "l-mul-4": log(103.0), "fp8-e4m3": log(100.0), "l-mul-1": log(110.0)}
    m = _metrics(errors, nll)
    # gaussian: 0.05 < 0.06, 0.037 <= 1.25 * 0.03; attention: 0.06 = 0.06 (a tie: undecided), 0.05 > 0.0375;
    # perplexity: 100.5 <= 101, 101.5 <= 102.01, 103 > 101
    assert list(checks(m).values()) == [True, True, None, False, True, True, False]
    assert list(preconditions(m).values()) == [True]
    # the coarse probe costs under 1%: the perplexity checks cannot fail here, so they are undecidable
    flat = _metrics(errors, {**nll, "l-mul-1": log(100.8)})
    assert list(checks(flat).values())[4:] == [None, None, None]
    # within the allowance on average, but per-sequence noise makes the interval cross it: undecided
    noisy = _metrics(errors, {**nll, "l-mul-7": log(100.9)}, noise=0.05)
    assert list(checks(noisy).values())[4] is None
    # exact simulated attention that does not reproduce the model: the precondition fails
    assert list(preconditions({**m, "model_perplexity": 99.0}).values()) == [False]


def test_chunked_errors_are_paired_chunk_means():
    from paperzoo.experiments.compression.l_mul_multiplication import ELEMENTWISE, chunked_errors

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    x[:10] = 0.0  # zero products are left out
    rounded = {a: round_operand(x, a) for a in ELEMENTWISE if not a.startswith("l-mul")}
    rounded_y = {a: round_operand(y, a) for a in ELEMENTWISE if not a.startswith("l-mul")}
    chunks = chunked_errors(x, y, rounded, rounded_y, torch.Generator().manual_seed(1), chunks=50)
    assert set(chunks) == set(ELEMENTWISE) and all(len(v) == 50 for v in chunks.values())
    exact = (x.double() * y.double())[10:]
    rel = ((l_mul(x, y, 3).double()[10:] - exact) / exact.abs()).abs()
    assert np.mean(chunks["l-mul-3"]) == pytest.approx(rel.mean().item(), rel=1e-3)
