"""core.blocks: block swaps on an unmodified HF decoder, budgets, and the one comparison; the retrieval tasks."""

import copy

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from paperzoo.core.blocks import (compare_blocks, flops_per_token, held_out_loss, is_causal, match_budget,
                                  parameter_count, standard_model, swap)
from paperzoo.core.tasks import AssociativeRecall, MaxRetrieval, Passkey, TaskTraining

V, T = 40, 12


@pytest.fixture
def llama():
    return standard_model(V, T, hidden_size=32, num_layers=2, num_heads=2, seed=0)


def ids(n=3, seed=1):
    return torch.randint(V, (n, T), generator=torch.Generator().manual_seed(seed))


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


class CausalMean(nn.Module):
    """A causal mixer: the running mean of the tokens so far."""

    def forward(self, x):
        return x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)


class GlobalMean(nn.Module):
    def forward(self, x):
        return x.mean(1, keepdim=True).expand_as(x)


@torch.no_grad()
def test_a_zero_mixer_equals_silencing_that_layers_attention(llama):
    reference = copy.deepcopy(llama)
    reference.model.layers[1].self_attn.o_proj.weight.zero_()
    swap(llama, "mixer", lambda config, i: Zero(), layers=[1])
    torch.testing.assert_close(llama(input_ids=ids()).logits, reference(input_ids=ids()).logits)


@torch.no_grad()
def test_ffn_slot_replaces_the_mlp_and_only_in_the_chosen_layers(llama):
    reference = copy.deepcopy(llama)
    original = [copy.deepcopy(layer.mlp) for layer in llama.model.layers]
    swap(llama, "ffn", lambda config, i: original[i])
    torch.testing.assert_close(llama(input_ids=ids()).logits, reference(input_ids=ids()).logits)
    reference.model.layers[0].mlp.down_proj.weight.zero_()
    swap(llama, "ffn", lambda config, i: Zero(), layers=[0])
    torch.testing.assert_close(llama(input_ids=ids()).logits, reference(input_ids=ids()).logits)


def hand_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Softmax attention written out, trusting only the mask it is given (no is_causal)."""
    scores = query @ key.transpose(-1, -2) * scaling + attention_mask
    return (scores.softmax(-1) @ value).transpose(1, 2), None


@torch.no_grad()
def test_an_attention_function_gets_an_explicit_causal_mask(llama):
    reference = llama(input_ids=ids()).logits
    swap(llama, "attention_fn", hand_attention)
    torch.testing.assert_close(llama(input_ids=ids()).logits, reference, atol=1e-5, rtol=1e-5)
    assert is_causal(llama, V, T)


@torch.no_grad()
def test_swaps_work_on_qwen2_too():
    config = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=T)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    reference = model(input_ids=ids()).logits
    swap(model, "attention_fn", hand_attention)
    torch.testing.assert_close(model(input_ids=ids()).logits, reference, atol=1e-5, rtol=1e-5)
    swap(model, "mixer", lambda config, i: CausalMean())
    assert is_causal(model, V, T)


@torch.no_grad()
def test_embedding_and_head_slots(llama):
    reference = llama(input_ids=ids()).logits
    embedding, head = copy.deepcopy(llama.get_input_embeddings()), copy.deepcopy(llama.get_output_embeddings())
    swap(llama, "embedding", lambda config: embedding)
    swap(llama, "head", lambda config: head)
    torch.testing.assert_close(llama(input_ids=ids()).logits, reference)
    assert llama.get_input_embeddings() is embedding and llama.get_output_embeddings() is head


def test_causality_check_tells_a_causal_mixer_from_a_global_one(llama):
    assert is_causal(swap(copy.deepcopy(llama), "mixer", lambda c, i: CausalMean()), V, T)
    assert not is_causal(swap(llama, "mixer", lambda c, i: GlobalMean()), V, T)


def test_bad_slots_and_layers_are_refused(llama):
    with pytest.raises(ValueError, match="unknown slot"):
        swap(llama, "norm", lambda c, i: Zero())
    with pytest.raises(ValueError, match="does not exist"):
        swap(llama, "mixer", lambda c, i: Zero(), layers=[2])
    with pytest.raises(ValueError, match="model-wide"):
        swap(llama, "embedding", lambda c: Zero(), layers=[0])


def test_parameter_count_without_embeddings(llama):
    d = 32
    assert parameter_count(llama) - parameter_count(llama, embeddings=False) == 2 * V * d


def test_flops_per_token_counts_six_flops_per_added_mlp_weight():
    # A matmul weight costs 2 FLOPs per token forward and 4 backward (input and weight gradients).
    narrow = standard_model(V, T, hidden_size=32, mlp_ratio=2, seed=0)
    wide = standard_model(V, T, hidden_size=32, mlp_ratio=4, seed=0)
    added = parameter_count(wide) - parameter_count(narrow)
    assert flops_per_token(wide, T, V) - flops_per_token(narrow, T, V) == pytest.approx(6 * added)


def test_match_budget_finds_the_width_and_refuses_an_unreachable_target():
    target = parameter_count(standard_model(V, T, hidden_size=32))
    knob, model, ratio = match_budget(lambda r: standard_model(V, T, hidden_size=32, mlp_ratio=r), 1, 16, target)
    assert knob == 4 and ratio == pytest.approx(1.0)
    knob, _, ratio = match_budget(lambda k: nn.Linear(10, k), 1, 1000, 11 * 370 * 1.012)
    assert knob == 374 and abs(ratio - 1) <= 0.03
    with pytest.raises(ValueError, match="no knob"):
        match_budget(lambda k: nn.Linear(10, k), 1, 100, 11 * 370)
    knob, _, ratio = match_budget(lambda r: standard_model(V, T, hidden_size=32, mlp_ratio=r), 1, 16,
                                  flops_per_token(standard_model(V, T, hidden_size=32, mlp_ratio=3), T, V), by="flops",
                                  seq_len=T, vocab_size=V)
    assert knob == 3 and ratio == pytest.approx(1.0)


def test_held_out_loss_reads_only_the_scored_positions(llama):
    batch = AssociativeRecall(pairs=4, keys=8, values=8).sample(16, seed=0)
    model = standard_model(batch.tokens.max().item() + 1, batch.tokens.shape[1], hidden_size=16, seed=0)
    logits = model(input_ids=batch.tokens).logits.detach()
    by_hand = torch.nn.functional.cross_entropy(logits[:, -2], batch.expected[:, -1])
    assert held_out_loss(model, batch, chunk=5) == pytest.approx(by_hand.item(), rel=1e-5)


def test_compare_blocks_trains_variants_on_the_same_tokens():
    task = MaxRetrieval(items=4, values=8)
    build = lambda: standard_model(task.vocab_size, task.length, hidden_size=16)  # noqa: E731
    rows = compare_blocks({"a": build, "b": build, "no mixing": lambda: swap(build(), "mixer", lambda c, i: Zero())},
                          task, TaskTraining(steps=300, batch_size=32, lr=1e-2), seeds=(0,), eval_size=256)
    a, b, blind = rows
    assert (a["loss"], a["accuracy"]) == (b["loss"], b["accuracy"])  # same seed: same init, tokens and batch order
    assert a["accuracy"] > 0.8 > blind["accuracy"]  # the max needs every item: a model that cannot mix cannot learn it
    assert a["params"] > blind["params"] and a["flops_per_token"] > blind["flops_per_token"] > 0


def test_retrieval_tasks_answer_what_they_say():
    recall = AssociativeRecall(pairs=5, keys=9, values=7).sample(50, seed=3)
    for row, answer in zip(recall.tokens.tolist(), recall.expected[:, -1].tolist()):
        keys, values, query = row[0:10:2], row[1:10:2], row[10]
        assert len(set(keys)) == 5 and answer == values[keys.index(query)] and row[-1] == 9 + 7
    biggest = MaxRetrieval(items=6, values=20).sample(50, seed=3)
    assert biggest.expected[:, -1].tolist() == biggest.tokens[:, :-1].max(1).values.tolist()
    task = Passkey(length=20, keys=5, filler=4)
    key = task.sample(50, seed=3)
    for row, answer in zip(key.tokens.tolist(), key.expected[:, -1].tolist()):
        assert len(row) == 20 and row.count(task.marker) == 1 and row[row.index(task.marker) + 1] == answer
        assert row[-2:] == [task.marker + 1, task.marker + 2]
    for batch in (recall, biggest, key):  # only the last position is scored, and its answer is not in the input
        assert batch.scored[:, -1].all() and batch.scored.sum() == len(batch.tokens)
        assert (batch.tokens[:, -1] != batch.expected[:, -1]).all()


def test_multi_query_recall_with_pair_tokens():
    task = AssociativeRecall(pairs=5, keys=7, values=6, queries=3, pair_tokens=True)
    batch = task.sample(40, seed=2)
    assert batch.tokens.shape == (40, task.length) == (40, 5 + 6) and batch.tokens.max() < task.vocab_size
    for row, scored in zip(batch.tokens.tolist(), batch.scored.tolist()):
        pairs = [divmod(t - task.placeholder - 1, task.values) for t in row[:5]]
        memory = {k: task.keys + v for k, v in pairs}
        assert len(memory) == 5 and all(0 <= k < task.keys for k in memory)
        asked = row[5::2]
        assert len(set(asked)) == 3 and row[6::2] == [memory[k] for k in asked]
        assert [i for i, s in enumerate(scored) if s] == [6, 8, 10]  # every answer, nothing else
    with pytest.raises(ValueError, match="queries"):
        AssociativeRecall(pairs=2, queries=3)
