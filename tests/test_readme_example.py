"""The README's Python example, run as written on locally saved tiny random models (no downloads)."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_PATH = "path/to/any-hf-causal-lm"


def readme_example() -> str:
    """The first Python block after "The methods are plain functions you call on your own model"."""
    text = README.read_text()
    after = text[text.index("The methods are plain functions you call on your own model"):]
    block = re.search(r"```python\n(.*?)```", after, re.S)
    assert block, "the README lost its Python example"
    code = block.group(1)
    assert MODEL_PATH in code, "the example no longer loads a model from a path"
    return code


def tiny_model(arch: str, vocab: int):
    torch.manual_seed(0)
    if arch == "llama":  # untied embeddings, rotary positions
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    # tied embeddings, 128 learned positions: shorter than the verification prompts, which are clipped
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=6, n_head=4, n_positions=128))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_readme_python_example_runs(arch, smoke_lm, tmp_path, monkeypatch, capsys):
    tokenizer = smoke_lm.tokenizer
    directory = tmp_path / arch
    tiny_model(arch, len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    code = readme_example().replace(MODEL_PATH, str(directory))
    monkeypatch.chdir(tmp_path)  # the example saves to a relative "pruned"
    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.", "import os"]
    namespace = {"texts": texts}
    exec(compile(code, "README.md", "exec"), namespace)

    result, report = namespace["result"], namespace["report"]
    assert result.report["layers_before"] == 6 and result.report["layers_after"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert reloaded.config.num_hidden_layers == 2
    assert report.candidates and set(report.verified) <= set(report.candidates)
    assert capsys.readouterr().out.strip().startswith("[")  # the printed token list
    model = namespace["model"]
    assert model.config._attn_implementation == "adaptive_temperature_attention"
    assert torch.isfinite(namespace["sharper"]).all()
