"""Randomly initialised tiny HF causal LMs of several architectures, for method tests."""

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**COMMON)).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**COMMON)).eval()
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=6, n_head=4, n_positions=64)).eval()
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "mistral", "gpt2")
