"""DPP bias (2507.22887): the same block in four places of a chat prompt, and prediction change."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paperzoo.core.evaluation import candidate_log_probs
from paperzoo.core.reasoning import reasoning_tokenizer
from paperzoo.phenomena.demo_position_bias import (
    PLACEMENTS, Item, dpp_report, placement_ids, placement_predictions, prediction_change)

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
SYSTEM, USER, DEMOS = "Answer with a digit.", "What is 2+2?", "1+1 -> 2\n3+3 -> 6"


@pytest.fixture(scope="module")
def tokenizer():
    t = reasoning_tokenizer()  # one token per character: splicing must equal tokenising the whole text
    t.chat_template = TEMPLATE
    return t


def _find(sequence: list, block: list) -> list[int]:
    return [i for i in range(len(sequence) - len(block) + 1) if sequence[i:i + len(block)] == block]


def test_the_block_is_token_identical_and_where_the_placement_says(tokenizer):
    block = tokenizer(DEMOS, add_special_tokens=False)["input_ids"]
    expected_text = {
        "ssp": f"[system]{DEMOS}\n\n{SYSTEM}\n[user]{USER}\n[assistant]",
        "esp": f"[system]{SYSTEM}\n\n{DEMOS}\n[user]{USER}\n[assistant]",
        "sum": f"[system]{SYSTEM}\n[user]{DEMOS}\n\n{USER}\n[assistant]",
        "eum": f"[system]{SYSTEM}\n[user]{USER}\n\n{DEMOS}\n[assistant]",
    }
    for placement in PLACEMENTS:
        ids = placement_ids(tokenizer, SYSTEM, USER, DEMOS, placement).tolist()
        assert len(_find(ids, block)) == 1
        assert ids == tokenizer(expected_text[placement], add_special_tokens=False)["input_ids"]


def test_the_block_keeps_its_ids_even_where_a_tokeniser_would_merge_across_its_edge(tokenizer):
    block = torch.tensor([5, 6, 7])  # ids given directly are spliced as they are
    for placement in PLACEMENTS:
        ids = placement_ids(tokenizer, SYSTEM, USER, block, placement).tolist()
        assert len(_find(ids, [5, 6, 7])) == 1


def test_prediction_change_and_report_on_hand_set_predictions():
    preds = {"ssp": torch.tensor([0, 1, 2, 3]), "esp": torch.tensor([0, 1, 2, 0]), "eum": torch.tensor([1, 0, 2, 0])}
    answers = torch.tensor([0, 1, 2, 3])
    assert prediction_change(preds["ssp"], preds["eum"]) == 0.75
    report = dpp_report(preds, answers)
    assert report["accuracy"] == {"ssp": 1.0, "esp": 0.75, "eum": 0.25}
    assert report["prediction_change"] == {"ssp": 0.0, "esp": 0.25, "eum": 0.75}


def test_predictions_score_the_spliced_prompts(tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=128))
    items = [Item("What is 2+2?", 0), Item("What is 1+2?", 1)]
    candidates = ["4", "3"]
    got = placement_predictions(model, tokenizer, SYSTEM, items, DEMOS, candidates, placements=("sum", "eum"))
    answers = [torch.tensor(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in candidates]
    for placement in ("sum", "eum"):
        prompts = [placement_ids(tokenizer, SYSTEM, item.user, DEMOS, placement) for item in items]
        assert torch.equal(got[placement], candidate_log_probs(model, prompts, answers).argmax(-1))


def test_bad_inputs_say_so_in_one_line(tokenizer):
    with pytest.raises(ValueError, match="placement must be one of"):
        placement_ids(tokenizer, SYSTEM, USER, DEMOS, "middle")
    plain = reasoning_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        placement_ids(plain, SYSTEM, USER, DEMOS, "ssp")
    plain.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(ValueError, match="cannot render a system"):
        placement_ids(plain, SYSTEM, USER, DEMOS, "ssp")


def test_the_chat_shaped_task_puts_the_same_block_in_each_segment_and_labels_by_the_map():
    from paperzoo.experiments.phenomena.demo_position_bias import ChatICL

    task = ChatICL()
    g = torch.Generator().manual_seed(0)
    block, query, label = task.draw(64, g)
    sys_open, sys_close, user_open, user_close, assistant = range(task.first_marker, task.first_marker + 5)
    rows = {}
    for p in PLACEMENTS:
        rows[p] = task.build(block, query, label, [p] * 64, torch.Generator().manual_seed(1)).tokens
        assert rows[p].shape == (64, task.length)
    for i in range(64):
        b = block[i, :, :2].reshape(-1).tolist()  # x (x, y) per demonstration
        for p in PLACEMENTS:
            r = rows[p][i].tolist()
            start = [k for k in range(len(r) - len(b) + 1) if r[k:k + len(b)] == b]
            assert len(start) == 1
            k = start[0]
            where = {"ssp": r[k - 1] == sys_open, "esp": r[k + len(b)] == sys_close,
                     "sum": r[k - 1] == user_open, "eum": r[k + len(b)] == user_close}
            assert where[p], p
            assert r[-2] == assistant and r[-1] == int(label[i])
            assert r[r.index(user_close) - 1 - (len(b) if p == "eum" else 0)] == int(query[i])  # the question
        # the label is the map's label of the query's cluster, as a demonstration of that cluster would show it
        for pair in b[1::2]:
            x, y = divmod(pair - task.pairs.items, task.pairs.labels)
            if x // task.pairs.cluster_size == int(query[i]) // task.pairs.cluster_size:
                assert task.pairs.label_token(torch.tensor(y)) == label[i]
