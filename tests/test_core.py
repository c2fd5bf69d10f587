import json
import math

import pytest
import torch

from paperzoo.core import results, store
from paperzoo.core.corpus import CorpusError, is_validation_unit, load_corpus
from paperzoo.core.evaluation import evaluate
from paperzoo.core.experiment import verdict
from paperzoo.core.models import ModelLoadError, base_model, decoder_layers, load_causal_lm
from paperzoo.core.tasks import TaskModelConfig
from paperzoo.core.training import (NonFiniteLossError, TrainConfig, autocast_pays, model_width,
                                    token_blocks, train)
from tiny_models import tiny


def test_stable_hash_ignores_key_order():
    assert store.stable_hash({"a": 1, "b": [1, 2]}) == store.stable_hash({"b": [1, 2], "a": 1})
    assert store.stable_hash({"a": 1}) != store.stable_hash({"a": 2})


def test_cached_dir_is_atomic(tmp_path):
    target = tmp_path / "entry"

    def broken(tmp):
        (tmp / "half-written").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.cached_dir(target, broken)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    calls = []
    store.cached_dir(target, lambda tmp: calls.append((tmp / "done").write_text("ok")))
    store.cached_dir(target, lambda tmp: calls.append("built again"))
    assert (target / "done").read_text() == "ok" and len(calls) == 1


def test_write_atomic_leaves_no_temporaries(tmp_path):
    store.write_atomic(tmp_path / "a" / "f.json", "{}")
    store.write_atomic(tmp_path / "a" / "f.json", "[1]")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.json"]
    assert (tmp_path / "a" / "f.json").read_text() == "[1]"


def test_embedded_corpus_is_split_by_module_deterministically(paperzoo_home):
    c = load_corpus()
    assert load_corpus().fingerprint == c.fingerprint
    assert sum(map(len, c.train)) > 1_500_000 and sum(map(len, c.validation)) > 40_000
    units_and_docs = json.loads(next((paperzoo_home / "corpus").glob("stdlib-*.json")).read_text())
    val_units = {u for u, _ in units_and_docs if is_validation_unit(u)}
    assert 0 < len(val_units) < len({u for u, _ in units_and_docs}) / 4
    assert list(c.validation) == [d for u, d in units_and_docs if u in val_units]


def test_text_file_corpus_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"paragraph number {i} of a small text" for i in range(400)))
    c = load_corpus(f)
    assert len(c.train) + len(c.validation) == 400 and c.validation
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CorpusError, match="UTF-8"):
        load_corpus(tmp_path / "bin.txt")


def test_token_blocks_put_eos_between_documents(smoke_lm):
    tok = smoke_lm.tokenizer
    blocks = token_blocks(tok, ["hello world", "again"], seq_len=2)
    flat = tok(["hello world"], add_special_tokens=False)["input_ids"][0] + [tok.eos_token_id]
    assert blocks.shape[1] == 2 and blocks.flatten().tolist() == (flat + tok.encode("again") + [tok.eos_token_id])[: blocks.numel()]


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = tiny("llama")
    torch.nn.init.zeros_(model.lm_head.weight)
    m = evaluate(model, torch.randint(0, 64, (3, 10)))
    assert m["perplexity"] == pytest.approx(64.0, rel=1e-5) and m["loss"] == pytest.approx(math.log(64))


def test_training_stops_on_non_finite_loss():
    model = tiny("llama")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 1"):
        train(model, torch.randint(0, 64, (8, 10)), TrainConfig(steps=3, batch_size=2, seq_len=10, lr=1e-3))


def test_training_lowers_loss():
    model = tiny("llama")
    data = torch.arange(64).repeat(8, 1)[:, :32] % 7  # a periodic sequence
    before = evaluate(model, data)["loss"]
    history = train(model, data, TrainConfig(steps=40, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=4))
    assert evaluate(model, data)["loss"] < before - 1.0 and history["tokens"] == 40 * 4 * 32


def test_training_stops_when_asked_at_a_check():
    model, data = tiny("llama"), torch.randint(0, 64, (8, 10))
    asked = []
    history = train(model, data, TrainConfig(steps=40, batch_size=2, seq_len=10, lr=1e-3, eval_every=5),
                    stop=lambda: asked.append(1) or len(asked) == 2)
    assert history["steps"] == 10 and len(history["train_loss"]) == 10


def test_autocast_only_where_it_pays_on_a_cpu(monkeypatch):
    narrow, wide = TaskModelConfig(64, 1, 4).build(50, 8), TaskModelConfig(128, 1, 4).build(50, 8)
    assert (model_width(narrow), model_width(wide)) == (64, 128)
    cpu = torch.device("cpu")
    monkeypatch.setattr("paperzoo.core.training.bf16_autocast_available", lambda device: True)
    assert not autocast_pays(narrow, cpu) and autocast_pays(wide, cpu)
    monkeypatch.setattr("paperzoo.core.training.bf16_autocast_available", lambda device: False)
    assert not autocast_pays(wide, cpu)


def test_base_model_is_cached_and_reloadable(smoke_lm, paperzoo_home):
    again = base_model("smoke")
    assert again.record == smoke_lm.record  # read from the cache, not retrained
    entries = list((paperzoo_home / "models").glob("base-smoke-*"))
    assert len(entries) == 1
    assert smoke_lm.model.config.num_hidden_layers >= 12 and smoke_lm.trained_here
    model, tok = load_causal_lm(str(entries[0]))
    ids = smoke_lm.blocks("validation")[:2]
    assert torch.equal(model(input_ids=ids).logits, smoke_lm.model(input_ids=ids).logits)


def test_default_small_base_model_is_deep_enough():
    from paperzoo.core.models import BASE_MODELS

    assert BASE_MODELS["small"].model.num_layers >= 12


def test_load_causal_lm_refuses_bad_input(tmp_path):
    from transformers import BertConfig, BertModel

    with pytest.raises(ModelLoadError, match="not found"):
        load_causal_lm(str(tmp_path / "nothing"))
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="BertModel checkpoint, not a causal LM"):
        load_causal_lm(str(tmp_path / "bert"))
    model = tiny("llama")  # weights only as a pickle: refused, never unpickled
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError):
        load_causal_lm(str(tmp_path / "pickled"))


def test_load_causal_lm_messages_say_what_is_wrong(smoke_lm, tmp_path, monkeypatch):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(ModelLoadError, match="has no usable tokenizer .* save one beside the weights$"):
        load_causal_lm(str(tmp_path / "no-tokenizer"))
    small = tiny("llama")  # fewer embedding rows than the tokenizer has tokens
    assert small.get_input_embeddings().num_embeddings < len(smoke_lm.tokenizer)
    small.save_pretrained(tmp_path / "small-vocab")
    smoke_lm.tokenizer.save_pretrained(tmp_path / "small-vocab")
    with pytest.raises(ModelLoadError, match="embeds .* tokens but its tokenizer has"):
        load_causal_lm(str(tmp_path / "small-vocab"))
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)  # 'models/typo' is a local typo, not a hub id: no network wait
    with pytest.raises(ModelLoadError, match="model directory not found: models/typo"):
        load_causal_lm("models/typo")


def test_a_text_without_blank_lines_still_splits(tmp_path):
    (tmp_path / "one-line.txt").write_text("word " * 200_000)
    corpus = load_corpus(tmp_path / "one-line.txt")
    assert corpus.train and corpus.validation
    (tmp_path / "tiny.txt").write_text("too short")
    with pytest.raises(CorpusError, match="too small .* to hold out validation text"):
        load_corpus(tmp_path / "tiny.txt")


def test_nan_weights_are_not_blamed_on_the_learning_rate():
    model = tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="weights hold NaN"):
        train(model, torch.zeros(4, 8, dtype=torch.long), TrainConfig(steps=1, batch_size=2, seq_len=8, lr=1e-3))


def test_decoder_layers_found_for_gpt2_and_llama():
    assert decoder_layers(tiny("gpt2"))[0] == "transformer.h"
    assert decoder_layers(tiny("llama"))[0] == "model.layers"
    with pytest.raises(ModelLoadError):
        decoder_layers(torch.nn.Linear(2, 2))


def test_verdict_combines_checks():
    assert verdict({"a": True, "b": True}) == "reproduced"
    assert verdict({"a": True, "b": False}) == "not-reproduced"
    assert verdict({"a": True, "b": None}) == "inconclusive"
    assert verdict({}) == "inconclusive"


def _record(**kw):
    return {"paper": {"slug": "x"}, "scale": "small", "checks": {}, "metrics": {}, "finished_at": "1",
            "verdict": "reproduced", **kw}


def test_records_are_never_overwritten(tmp_path):
    a = results.write_new_record(tmp_path / "x", "stem", _record(finished_at="1", verdict="reproduced"))
    b = results.write_new_record(tmp_path / "x", "stem", _record(finished_at="2", verdict="smoke"))
    assert a != b and json.loads(a.read_text())["verdict"] == "reproduced"
    assert results.latest("x", tmp_path)["verdict"] == "reproduced"  # a later smoke run does not hide a verdict
    assert [r["verdict"] for r in results.records("x", tmp_path)] == ["reproduced", "smoke"]
    assert results.latest("nothing", tmp_path) is None


DDP_SCRIPT = """
import torch
from paperzoo.core.training import TrainConfig, train
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2))
before = m.model.layers[0].mlp.down_proj.weight.detach().clone()
train(m, torch.randint(0, 64, (32, 16)), TrainConfig(steps=3, batch_size=4, seq_len=16, lr=1e-2))
w = m.model.layers[0].mlp.down_proj.weight.detach().contiguous()
replicas = [torch.zeros_like(w) for _ in range(torch.distributed.get_world_size())]
torch.distributed.all_gather(replicas, w)
assert not torch.equal(before, w), "training changed nothing"
assert all(torch.equal(replicas[0], r) for r in replicas), "replicas diverged"
print("ddp ok")
torch.distributed.destroy_process_group()
"""


def test_training_under_torchrun_keeps_replicas_in_sync(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("ddp ok") == 2
