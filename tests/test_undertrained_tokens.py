import numpy as np
import pytest
import torch

from paperzoo.experiments.phenomena.undertrained_tokens import auroc, auroc_items, checks, preconditions
from paperzoo.phenomena.undertrained_tokens import (
    INDICATORS, candidates_below_percentile, default_indicator, find_undertrained_tokens, first_principal_component,
    indicator_values, input_embedding_norm, max_positions, ordinary_tokens, prompt_length, reference_unused_tokens,
    remove_component, single_byte_tokens, undertrained_indicator, verification_probability)
from tiny_models import tiny


def planted_matrix(V=600, d=24, planted=30, seed=0):
    """Trained-looking rows plus a planted group sharing one direction, all offset by a big constant vector."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(V, d, generator=g)
    direction = torch.randn(d, generator=g)
    ids = torch.randperm(V, generator=g)[:planted]
    U[ids] = direction + 0.05 * torch.randn(planted, d, generator=g)
    U += 8.0 * torch.randn(d, generator=g)  # the constant component softmax ignores
    return U, ids.tolist()


def test_indicator_recovers_planted_tokens():
    U, planted = planted_matrix()
    reference, hidden = planted[:5], planted[5:]
    indicator = undertrained_indicator(U, reference)
    found = candidates_below_percentile(indicator, 100 * len(planted) / len(U), exclude=reference)
    assert set(hidden) <= set(found)
    assert set(torch.argsort(indicator)[: len(planted)].tolist()) == set(planted)


def reference_indicator(U: np.ndarray, reference) -> np.ndarray:
    """The paper's indicator written independently in numpy, as the official code computes it (PCA of the
    centred rows, projected out of the uncentred matrix; mean of the reference rows; cosine distance)."""
    centred = U - U.mean(0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    c = vecs[:, -1]
    Up = U - np.outer(U @ c, c)
    u = Up[list(reference)].mean(0)
    return 1 - Up @ u / (np.linalg.norm(Up, axis=1) * np.linalg.norm(u))


def test_indicator_equals_an_independent_numpy_implementation():
    U = torch.randn(300, 16, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.2, 2.0, 16) + 1.5
    reference = [3, 50, 77, 120]
    got = undertrained_indicator(U.double(), reference).numpy()
    assert np.allclose(got, reference_indicator(U.double().numpy(), reference), atol=1e-9)


def constant_component_matrix(V=600, d=24, planted=30, seed=0):
    """Rows = a_i c + r_i: a constant direction c whose size a_i varies from row to row (so it is the first
    principal component), plus a residual. The planted rows' residual is one shared direction; the others'
    is a common offset m plus noise. Only after removing c does cosine distance find the planted rows, and
    only the planted (reference) rows' mean points at them: the mean of all rows points at m."""
    g = torch.Generator().manual_seed(seed)
    c, direction, m = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=torch.float64))[0].T
    a = 30 * torch.randn(V, 1, generator=g, dtype=torch.float64)  # either sign
    noise = torch.randn(V, d, generator=g, dtype=torch.float64)
    noise -= torch.outer(noise @ c, c)  # residuals live off c
    r = 3 * m + noise
    ids = torch.randperm(V, generator=g)[:planted]
    r[ids] = 3 * direction + 0.05 * noise[ids]
    return a * c + r, ids.tolist()


def test_the_principal_component_the_reference_rows_and_nothing_else_find_the_planted_tokens():
    U, planted = constant_component_matrix()
    indicator = undertrained_indicator(U, planted[:5])
    assert set(torch.argsort(indicator)[: len(planted)].tolist()) == set(planted)
    # what each step is there for: without removing c, or averaging every row, the planted rows are lost
    plain = 1 - torch.nn.functional.cosine_similarity(U, U[planted[:5]].mean(0, keepdim=True))
    assert len(set(torch.argsort(plain)[: len(planted)].tolist()) & set(planted)) < 0.8 * len(planted)
    U_prime = remove_component(U, first_principal_component(U))
    everything = 1 - torch.nn.functional.cosine_similarity(U_prime, U_prime.mean(0, keepdim=True))
    assert not set(torch.argsort(everything)[: len(planted)].tolist()) & set(planted)


def test_principal_component_matches_numpy_and_is_removed():
    U = torch.randn(200, 16, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 3.0, 16)
    c = first_principal_component(U)
    centred = (U - U.mean(0)).double().numpy()
    _, vecs = np.linalg.eigh(centred.T @ centred)
    assert abs(float(np.dot(c.double().numpy(), vecs[:, -1]))) == pytest.approx(1.0, abs=1e-6)
    U_prime = remove_component(U, c)
    assert torch.allclose(U_prime @ c, torch.zeros(200), atol=1e-4)
    assert torch.allclose(remove_component(U_prime, c), U_prime, atol=1e-5)


def test_percentile_candidates_by_hand():
    ind = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.3, 0.05, 0.7, 0.8, 0.6, 0.4])
    assert candidates_below_percentile(ind, 20.0) == [5, 1]  # 20th percentile = 0.14, lowest first
    assert candidates_below_percentile(ind, 20.0, exclude=[5]) == [1]


def test_byte_level_alphabet_matches_the_tokenizers_library():
    from tokenizers import pre_tokenizers

    from paperzoo.phenomena.undertrained_tokens import byte_level_alphabet

    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n")


def test_reference_tokens_of_the_base_tokenizer(smoke_lm):
    tok = smoke_lm.tokenizer
    ref = reference_unused_tokens(tok)
    reserved = tok.convert_tokens_to_ids([f"<|reserved_{i}|>" for i in range(16)])
    assert set(reserved) <= set(ref)
    assert tok.eos_token_id not in ref
    never_bytes = {i for i, b in single_byte_tokens(tok).items() if b in (0xC0, 0xC1) or b >= 0xF5}
    assert len(never_bytes) == 13 and never_bytes <= set(ref)
    assert tok.convert_ids_to_tokens(tok.encode("A", add_special_tokens=False)) == ["A"]
    assert single_byte_tokens(tok)[tok.convert_tokens_to_ids("A")] == ord("A")
    ordinary = set(ordinary_tokens(tok))
    assert not ordinary & set(ref) and tok.convert_tokens_to_ids("Ġthe") in ordinary
    assert tok.convert_tokens_to_ids("Ã") not in ordinary  # byte 0xC3 alone: a partial UTF-8 sequence


def test_verification_probability_is_the_softmax_at_the_copy_position(smoke_lm):
    model, tok = smoke_lm.model, smoke_lm.tokenizer
    template = "copy: {token} ="
    ids = [50, 300, 700]
    got = verification_probability(model, tok, ids, templates=(template,))
    for k, i in enumerate(ids):
        row = tok.encode("copy: ", add_special_tokens=False) + [i] + tok.encode(" =", add_special_tokens=False)
        p = model(input_ids=torch.tensor([row])).logits[0, -1].softmax(-1)[i]
        assert got[k].item() == pytest.approx(p.item(), rel=1e-4)


def test_pipeline_on_a_model_runs_end_to_end(smoke_lm):
    report = find_undertrained_tokens(smoke_lm.model, smoke_lm.tokenizer, percentile=2.0)
    assert report.indicator.shape == (len(smoke_lm.tokenizer),)
    assert not set(report.candidates) & set(report.reference)
    assert set(report.candidates) <= set(ordinary_tokens(smoke_lm.tokenizer))
    assert set(report.verified) <= set(report.candidates)


def test_auroc_by_hand():
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert auroc(np.array([0.1, 0.4]), np.array([0.2, 0.3])) == 0.5
    # per positive: the share of negatives above it, ties counting half
    assert auroc_items(np.array([0.1, 0.25, 0.3]), np.array([0.2, 0.3])).tolist() == [1.0, 0.5, 0.25]


def test_auroc_items_average_to_the_rank_statistic():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0, 1, 40), rng.normal(1, 1, 300)
    pairs = (pos[:, None] < neg[None, :]).mean()
    assert auroc(pos, neg) == pytest.approx(pairs) and auroc_items(pos, neg).mean() == pytest.approx(pairs)


@pytest.mark.parametrize("arch, tied, expected", [("llama", False, "input_embedding_norm"),
                                                  ("gpt2", True, "unembedding_cosine_first_pc_removed")])
def test_default_indicator_follows_the_architecture(arch, tied, expected):
    from paperzoo.phenomena.undertrained_tokens import embeddings_tied

    model = tiny(arch)
    assert embeddings_tied(model) is tied and default_indicator(model) == expected
    assert torch.equal(indicator_values(model, "input_embedding_norm"), input_embedding_norm(model))
    U = model.get_output_embeddings().weight.detach().float()
    assert torch.allclose(indicator_values(model, "unembedding_cosine_first_pc_removed", [1, 2]),
                          undertrained_indicator(U, [1, 2]))
    assert set(INDICATORS) >= {expected}


def test_input_embedding_norm_finds_rows_that_only_decayed():
    model = tiny("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[[5, 9]] *= 0.01  # never-seen inputs: weight decay only
    assert set(torch.argsort(indicator_values(model, "input_embedding_norm"))[:2].tolist()) == {5, 9}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pipeline_on_llama_and_gpt2_with_fewer_positions_than_the_prompts(arch, smoke_lm):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = smoke_lm.tokenizer
    torch.manual_seed(0)
    if arch == "gpt2":  # 32 positions: the verification prompts are longer, and clipped
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=32))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32))
    model.eval()
    assert max_positions(model) == 32
    report = find_undertrained_tokens(model, tok, percentile=2.0)
    assert report.indicator_name == default_indicator(model) and report.candidates
    longest = max(prompt_length(tok, t) for t in __import__(
        "paperzoo.phenomena.undertrained_tokens", fromlist=["REPEAT_TEMPLATES"]).REPEAT_TEMPLATES)
    assert report.prompt_tokens_clipped == longest - 32 > 0
    # clipping keeps the last positions: the same probability as feeding those positions by hand
    i = report.candidates[0]
    template = "copy " * 40 + "{token} ="
    row = (tok.encode("copy " * 40, add_special_tokens=False) + [i] + tok.encode(" =", add_special_tokens=False))[-32:]
    expected = model(input_ids=torch.tensor([row])).logits[0, -1].softmax(-1)[i]
    got = verification_probability(model, tok, [i], templates=(template,))
    assert got[0].item() == pytest.approx(expected.item(), rel=1e-4)


def test_bad_arguments_are_refused_before_work(smoke_lm):
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tok = smoke_lm.model, smoke_lm.tokenizer
    for kw, match in (({"percentile": 0}, "percentile"), ({"percentile": 101}, "percentile"),
                      ({"percentile": "2"}, "percentile"), ({"max_probability": 0}, "max_probability"),
                      ({"max_probability": 1.5}, "max_probability"), ({"indicator": "norm"}, "indicator")):
        with pytest.raises(ValueError, match=match):
            find_undertrained_tokens(model, tok, **kw)
    small = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok) // 2, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ValueError, match="tokenizer has"):
        find_undertrained_tokens(small, tok)


def test_predicate_and_preconditions_by_hand():
    base = {"never_seen": 50, "common": 500, "uniform_loss": 7.0, "base_sequence_loss": [4.0, 4.1, 3.9]}
    assert all(preconditions(base).values())
    assert list(preconditions({**base, "never_seen": 9}).values()) == [True, False]
    assert list(preconditions({**base, "base_sequence_loss": [7.5, 7.4]}).values()) == [False, True]
    m = {"candidates_never_or_rare": [1.0] * 60 + [0.0] * 20, "auroc_items": [1.0] * 45 + [0.9] * 5}
    assert list(checks(m).values()) == [True, True]
    # point estimates above the thresholds are not enough: the interval must clear them (else undecided)
    m = {"candidates_never_or_rare": [1.0] * 11 + [0.0] * 9, "auroc_items": [1.0] * 8 + [0.6] * 2}
    assert np.mean(m["candidates_never_or_rare"]) > 0.5 and np.mean(m["auroc_items"]) > 0.9
    assert list(checks(m).values()) == [None, None]
    # 6% of candidates under-trained fails; an AUROC of 0.88 over 88 tokens is too close to 0.9 to decide
    m = {"candidates_never_or_rare": [1.0] * 5 + [0.0] * 74, "auroc_items": [1.0] * 70 + [0.4] * 18}
    assert list(checks(m).values()) == [False, None]
    assert list(checks({**m, "auroc_items": [1.0] * 50 + [0.4] * 38}).values()) == [False, False]
    assert list(checks({"candidates_never_or_rare": [], "auroc_items": []}).values()) == [None, None]


def test_unembedding_matrix_of_gpt2_and_a_headless_model():
    from paperzoo.phenomena.undertrained_tokens import unembedding_matrix

    class Headless(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError):
        unembedding_matrix(Headless())
    assert unembedding_matrix(tiny("gpt2")).shape == (64, 32)


def test_experiment_scores_the_official_indicator_for_an_untied_model(smoke_lm, tmp_path):
    from paperzoo.core.experiment import run_experiment

    record = run_experiment("undertrained-tokens", "smoke", out=tmp_path)
    m = record["metrics"]
    assert not smoke_lm.model.config.tie_word_embeddings and m["indicator"] == "input_embedding_norm"
    assert m["auroc_never_vs_seen"] == m["auroc_input_embedding_norm"]
    assert np.mean(m["auroc_items"]) == pytest.approx(m["auroc_never_vs_seen"], abs=1e-4)
    assert {f"auroc_{name}" for name in INDICATORS} <= set(m)  # the others, reported beside it
    assert len(m["candidates_never_or_rare"]) == m["by_percentile"][2]["candidates"]  # the 2nd percentile
    assert set(record["preconditions"]) and record["seed_varies"] and record["source"]
