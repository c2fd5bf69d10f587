import copy

import pytest
import torch

from paperzoo.architectures.memory3_explicit_memory import (
    Memory3Config, MemoryBank, attached, generate, install, mean_hidden_state, most_attended, quantize, retrieve,
    train_with_memory, write_memories)
from paperzoo.core.blocks import standard_model


def tiny(layers=2, seed=0):
    torch.manual_seed(seed)
    base = standard_model(40, 96, 16, layers, 2).double()
    base.set_attn_implementation("eager")
    return base, install(copy.deepcopy(base))


def test_memory_off_gives_the_base_logits_exactly():
    base, model = tiny()
    ids = torch.randint(40, (3, 11), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    # and after memories were attached and detached again
    bank = write_memories(model, torch.randint(40, (2, 9)), Memory3Config(tokens_per_head=3))
    with attached(model, bank, torch.tensor([[0, 1]] * 3)):
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_keeping_every_token_equals_the_reference_as_a_prefix():
    """All layers memory layers and k >= n: attending to the memory is reading reference + text."""
    base, model = tiny(layers=3)
    g = torch.Generator().manual_seed(2)
    reference, text = torch.randint(40, (1, 12), generator=g), torch.randint(40, (2, 9), generator=g)
    bank = write_memories(model, reference, Memory3Config(tokens_per_head=12))
    with attached(model, bank, torch.zeros(2, 1, dtype=torch.long)):
        with_memory = model(input_ids=text).logits
    prefixed = torch.cat([reference.expand(2, -1), text], dim=1)
    want = base(input_ids=prefixed, position_ids=torch.arange(-12, 9).expand(2, -1)).logits[:, 12:]
    assert torch.allclose(with_memory, want, atol=1e-6)
    assert torch.allclose(with_memory, base(input_ids=prefixed).logits[:, 12:], atol=1e-5)  # RoPE is relative
    # two references are two prefixes each ending at -1; with one only, the other's tokens are absent
    bank2 = write_memories(model, torch.cat([reference, reference.flip(1)]), Memory3Config(tokens_per_head=12))
    with attached(model, bank2, torch.ones(2, 1, dtype=torch.long)):
        assert not torch.allclose(model(input_ids=text).logits, with_memory, atol=1e-3)


def test_sparsified_memory_keeps_the_most_attended_tokens():
    # by hand: column sums of a causal attention matrix, summed over the two query heads of one kv head
    A = torch.zeros(1, 2, 4, 4)
    A[0, 0] = torch.tensor([[1, 0, 0, 0], [.5, .5, 0, 0], [.1, .1, .8, 0], [.1, .1, .1, .7]])
    A[0, 1] = torch.tensor([[1, 0, 0, 0], [.9, .1, 0, 0], [.9, .05, .05, 0], [0, .9, .1, 0]])
    # received: head 0 [1.7, .7, .9, .7], head 1 [2.8, 1.05, .15, 0]
    assert most_attended(A, 2, 2).tolist() == [[[0, 2], [0, 1]]]
    assert most_attended(A, 1, 2).tolist() == [[[0, 1]]]  # one kv head for both: [4.5, 1.75, 1.05, .7]
    # in a model: the stored key-values are those of the tokens receiving the most attention
    _, model = tiny()
    reference = torch.randint(40, (2, 10), generator=torch.Generator().manual_seed(3))
    config = Memory3Config(tokens_per_head=3)
    full = write_memories(model, reference, Memory3Config(tokens_per_head=10))
    sparse = write_memories(model, reference, config)
    for layer in (0, 1):
        from paperzoo.architectures.memory3_explicit_memory import Recording, _attention_modules, _set
        with _set(_attention_modules(model, [layer]), [Recording()]) as (record,):
            model(input_ids=reference, position_ids=torch.arange(-10, 0).expand(2, -1))
        received = record.attention.sum(dim=-2)  # [2, H, n]
        want = received.topk(3, dim=-1).indices.sort(-1).values
        assert torch.equal(sparse.kept[layer], want)
        gathered = full.keys[layer].gather(2, want[..., None].expand(-1, -1, -1, full.keys[layer].shape[-1]))
        assert torch.equal(sparse.keys[layer], gathered)


def test_retrieval_picks_the_most_similar_references():
    bank = torch.eye(6) + 0.1  # six references, nearly orthogonal
    query = torch.stack([3 * bank[4] + 0.5 * bank[1], -bank[2]])
    index = retrieve(bank, query, 2)
    assert index[0].tolist() == [4, 1]
    assert 2 not in index[1].tolist()  # the opposite vector is the least similar
    # cosine, not dot product: a long vector does not win by its norm
    assert retrieve(torch.stack([bank[0], 100 * bank[3]]), bank[0][None], 1).item() == 0
    g = torch.Generator().manual_seed(4)
    bank, query = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    cos = torch.nn.functional.cosine_similarity(query[:, None], bank[None], dim=-1)
    assert torch.equal(retrieve(bank, query, 5), cos.argsort(dim=-1, descending=True)[:, :5])


def test_memory_heads_only_in_memory_layers_and_generation_refreshes_per_chunk():
    base, model = tiny(layers=3)
    refs = torch.randint(40, (4, 10), generator=torch.Generator().manual_seed(5))
    config = Memory3Config(memory_layers=(1,), tokens_per_head=4, references=2, chunk=3)
    bank = write_memories(model, refs, config)
    assert set(bank.keys) == {1} and bank.keys[1].shape == (4, 2, 4, 8)
    bank.embeddings = mean_hidden_state(model, refs)
    prompt = torch.randint(40, (1, 5))
    out, stats = generate(model, bank, prompt, 7, config, lambda ids: mean_hidden_state(model, ids))
    assert out.shape == (1, 12) and len(stats["retrieved"]) == 3  # refreshed at tokens 0, 3, 6
    assert stats["attended_positions"][0] == 5 + 2 * 4
    # memory only in layer 1: the first layer's output is the base model's
    with attached(model, bank, torch.tensor([[0, 1]])):
        h = model(input_ids=prompt, output_hidden_states=True).hidden_states
    h0 = base(input_ids=prompt, output_hidden_states=True).hidden_states
    assert torch.equal(h[1], h0[1]) and not torch.allclose(h[2], h0[2])


def test_stage_two_trains_through_the_memory_and_quantisation_approximates_it():
    _, model = tiny()
    model = model.float()
    refs = torch.randint(40, (5, 10))
    rows = torch.randint(40, (32, 6))
    labels = rows.clone()
    retrieved = torch.randint(5, (32, 2))
    before = copy.deepcopy(model.state_dict())
    history = train_with_memory(model, rows, labels, retrieved, refs, Memory3Config(tokens_per_head=3),
                                steps=3, batch_size=4, lr=1e-2, rewrite_every=2)
    assert len(history["train_loss"]) == 3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    bank = write_memories(model, refs, Memory3Config(tokens_per_head=3))
    exact, error = quantize(bank, clusters=10_000)
    assert all(e["keys"] < 1e-6 and e["values"] < 1e-6 for e in error.values())  # one centroid per vector
    coarse, error = quantize(bank, clusters=4)
    assert all(0 < e["keys"] < 1 for e in error.values())
    assert isinstance(coarse, MemoryBank) and coarse.keys[0].shape == bank.keys[0].shape


def test_experiment_verdict_logic_on_made_up_recalls():
    import numpy as np

    from paperzoo.core.experiment import verdict
    from paperzoo.experiments.architectures.memory3_explicit_memory import checks, preconditions

    rng = np.random.default_rng(0)
    good = (rng.random(400) < 0.9).astype(float)
    half = good * (rng.random(400) < 0.5)

    def metrics(memory, plain, big, rag, hit=0.95, positions=(47, 147)):
        return {"recall": {"memory": memory, "no memory": plain, "2x": big, "RAG": rag}, "retrieval_hit": hit,
                "references": 5, "attended_positions": {"memory": positions[0], "RAG": positions[1]}}

    m = metrics(good, half, half, good)
    assert verdict(checks(m), preconditions(m)) == "reproduced"
    m = metrics(half, half, half, good)  # memory adds nothing over the same model
    assert verdict(checks(m), preconditions(m)) == "not-reproduced"
    m = metrics(good, half, half, good, positions=(200, 147))
    assert verdict(checks(m), preconditions(m)) == "not-reproduced"
    m = metrics(good, half, half * 0, half * 0)  # no control learns
    assert verdict(checks(m), preconditions(m)) == "inconclusive"
    m = metrics(good, half, half, good, hit=0.3)  # retrieval fails
    assert verdict(checks(m), preconditions(m)) == "inconclusive"
