import numpy as np
import pytest
import torch

from paperzoo.experiments.phenomena.undertrained_tokens import auroc
from paperzoo.phenomena.undertrained_tokens import (
    candidates_below_percentile, find_undertrained_tokens, first_principal_component, reference_unused_tokens,
    ordinary_tokens, remove_component, single_byte_tokens, undertrained_indicator, verification_probability)
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


def test_unembedding_matrix_of_gpt2_and_a_headless_model():
    from paperzoo.phenomena.undertrained_tokens import unembedding_matrix

    class Headless(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError):
        unembedding_matrix(Headless())
    assert unembedding_matrix(tiny("gpt2")).shape == (64, 32)
