r"""Small Language Models: Survey, Measurements, and Insights (Lu, Li, Cai, Yi, Liu, Zhang, Lane, Xu; arXiv:2409.15790).

The survey reads the architectures, training data and training recipes of 59 (70 in
v3) open decoder-only language models of 100M-5B parameters, tests their capabilities,
and measures what they cost on devices: prefill and decode latency and peak memory
with llama.cpp on a Jetson Orin and on smartphones. Its runtime insights are that
latency depends on the architecture and not on the parameter count alone (Qwen1.5-0.5B
has 25.4% more parameters than Qwen2-0.5B yet runs 31.9% faster on the Jetson), that
memory grows roughly linearly with the parameter count but is inflated by a large
vocabulary (Bloom) and by the attention choice, and, as the review reads it, that GQA
models beat MHA models on both latency and memory. The architecture axes it tracks
are the attention type (MHA, GQA, MQA), the FFN (gated or not, intermediate ratio 2
to 8), the activation, the normalisation and the vocabulary size.

The survey is a measurement study, so its "method" is the measurement. This module
provides it for any Hugging Face causal LM, plus the architecture switches to build
the variants it compares:

- `measure_inference(model, batch, prompt_len, new_tokens)`: greedy decoding with a
  KV cache, timed in the survey's two stages -- *prefill* (one forward pass over the
  prompt, filling the cache) and *decode* (one forward pass per new token) -- and
  the peak memory of the whole generation.
- `SLMArchitecture`: a Llama-style decoder (RMSNorm, rotary positions, SwiGLU,
  untied embeddings, like `paperzoo.core.models.TinyLMConfig`) with the survey's
  switches exposed: query and key/value head counts, FFN ratio, vocabulary size,
  depth and width. Its analytic parameter count and KV-cache size are tested
  against the built model.

What is measured, with $b$ sequences, prompt length $T_p$ and $n$ new tokens:

$$ t_\text{prefill} = \text{time of } f(x_{1..T_p}),\qquad
   t_\text{decode} = \frac{1}{n}\sum_{i=1}^{n} \text{time of } f(x_{T_p+i} \mid \text{cache}) $$

$$ M_\text{peak} = M_\text{weights} + \max_\tau \Big(\sum_{\text{allocations before }\tau} s
   - \sum_{\text{frees before }\tau} s\Big) $$

and the KV cache a Llama-style model holds after $T = T_p + n$ tokens is

$$ M_\text{KV} = 2 \cdot L \cdot n_{kv} \cdot d_h \cdot T \cdot b \cdot \text{bytes per element}, $$

so GQA with $n_{kv} = n_h / g$ key/value heads holds $1/g$ of MHA's cache and MQA
($n_{kv} = 1$) $1/n_h$ of it.

Choices and deviations, with reasons:

- *Runtime and device.* The survey runs llama.cpp (mostly 4-bit GGUF weights) on
  edge hardware; here it is PyTorch fp32 through transformers on a CPU, because that
  is what paperzoo's models run on. Absolute numbers are not comparable; the
  directions of the architecture effects are what the experiment checks.
- *Random weights.* Latency and memory do not depend on the weight values when the
  decode length is fixed (no stop on EOS), so the variants are randomly initialised.
- *Peak memory* is read from the PyTorch profiler's memory events (every allocation
  and free through PyTorch's CPU allocator, in time order), not from the process
  RSS: RSS is dominated by the interpreter and libraries (hundreds of MB against
  models of tens of MB), never goes down (``ru_maxrss`` cannot be reset between
  variants) and is noisy under contention; ``tracemalloc`` sees only Python's own
  allocations, not tensor storage. What the profiler does not see -- oneDNN scratch
  space, the interpreter -- is left out; weights are counted from the parameters
  and buffers, which exist before the measured region.
- *Logits.* Prefill asks for the last position's logits only (``logits_to_keep=1``
  where the model accepts it), as llama.cpp and transformers' ``generate`` do; a
  full ``[b, T_p, V]`` logits tensor would make vocabulary memory depend on the prompt
  length.
- *Timing.* Wall-clock (``time.perf_counter``) of the forward passes, after untimed
  warm-up generations; the median over ``repeats`` generations is returned. Decode
  includes the greedy argmax, which is part of producing a token. ``threads`` pins
  PyTorch's intra-op threads: the experiment times single-threaded, because on a
  shared 2-core machine a two-thread OpenMP region waits for whichever core another
  process holds, which made decode ~10x slower and erratic in our trials. Devices
  in the survey run several threads.
- *CPU only.* Timings do not synchronise an accelerator and memory is read from
  the CPU allocator, so the measurement is meant for models on the CPU.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

BYTES_PER_MB = 2**20


@dataclass(frozen=True)
class SLMArchitecture:
    """A Llama-style decoder with the survey's architecture switches.

    ``num_kv_heads == num_heads`` is MHA, ``1`` is MQA, anything in between GQA.
    ``ffn_ratio`` is the gated FFN's intermediate size over the hidden size.
    """

    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    ffn_ratio: float = 4.0
    vocab_size: int = 8192
    max_seq_len: int = 1024

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SLMArchitecture: {name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"SLMArchitecture: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"SLMArchitecture: num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if isinstance(self.ffn_ratio, bool) or not isinstance(self.ffn_ratio, (int, float)) \
                or not 0 < self.ffn_ratio < float("inf") or round(self.ffn_ratio * self.hidden_size) < 1:
            raise ValueError(f"SLMArchitecture: ffn_ratio must be a finite number > 0 giving an intermediate size "
                             f">= 1, got {self.ffn_ratio!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return round(self.ffn_ratio * self.hidden_size)

    @property
    def attention(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    def parameter_count(self) -> int:
        """Exact parameter count of `build()`: embeddings, blocks, final norm, untied head."""
        d, d_h, d_ff = self.hidden_size, self.head_dim, self.intermediate_size
        attention = d * self.num_heads * d_h * 2 + d * self.num_kv_heads * d_h * 2  # W_q, W_o; W_k, W_v
        ffn = 3 * d * d_ff  # gate, up, down
        norms = 2 * d  # RMSNorm before attention and before the FFN
        return 2 * self.vocab_size * d + self.num_layers * (attention + ffn + norms) + d

    def kv_bytes_per_token(self, bytes_per_element: int = 4) -> int:
        """2 (K and V) * L * n_kv * d_h elements per token of context, per sequence."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def build(self) -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, max_position_embeddings=self.max_seq_len,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        )
        return LlamaForCausalLM(config).eval()

    def describe(self) -> dict:
        return {**asdict(self), "attention": self.attention, "head_dim": self.head_dim,
                "intermediate_size": self.intermediate_size, "parameters": self.parameter_count()}


def kv_cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a transformers cache (or nested tuples of tensors)."""
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, (tuple, list)):
        return sum(kv_cache_bytes(c) for c in cache)
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(kv_cache_bytes(t) for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if t is not None)
    raise ValueError(f"cannot read the key/value tensors of a {type(cache).__name__}")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (each shared tensor counted once)."""
    tensors = {t.data_ptr(): t for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence stderr at the file-descriptor level: some PyTorch builds log every profiler start and stop."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_allocated_bytes(run) -> int:
    """The largest net number of bytes PyTorch's CPU allocator held at once while `run()` ran.

    Every allocation and free is a profiler memory event with a signed size; the peak
    of their running sum, in time order, is the high-water mark above what was
    allocated before `run` started.
    """
    from torch.profiler import ProfilerActivity, profile

    if not callable(run):
        raise ValueError(f"run must be callable with no arguments, got {type(run).__name__}")
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


class _Generation:
    """Greedy decoding with a KV cache, timed stage by stage, on an unmodified HF causal LM."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, new_tokens: int):
        self.model, self.input_ids, self.new_tokens = model, input_ids, new_tokens
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; accept either
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        self.last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        self.cache = None
        self.tokens: torch.Tensor | None = None  # [b, new_tokens + 1]: the prefill's token, then one per decode pass

    def _output_cache(self, out):
        cache = getattr(out, self.cache_name, None)
        return cache if cache is not None else getattr(out, "past_key_values", None)

    @torch.inference_mode()
    def __call__(self) -> None:
        start = time.perf_counter()
        out = self.model(input_ids=self.input_ids, use_cache=True, **self.last_logits_only)
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # [b, 1]
        self.prefill_seconds = time.perf_counter() - start
        cache = self._output_cache(out)
        if cache is None:
            raise ValueError(f"{type(self.model).__name__} returned no KV cache; measure_inference needs use_cache=True")
        tokens = [token]
        start = time.perf_counter()
        for _ in range(self.new_tokens):
            out = self.model(input_ids=token, use_cache=True, **{self.cache_name: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = self._output_cache(out)
            tokens.append(token)
        self.decode_seconds = time.perf_counter() - start
        self.cache, self.tokens = cache, torch.cat(tokens, dim=1)


def measure_inference(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
                      warmup: int = 1, measure_memory: bool = True, threads: int | None = None, seed: int = 0) -> dict:
    """Prefill latency, per-token decode latency and peak memory of greedy generation with a KV cache.

    `batch` sequences of `prompt_len` random token ids are prefilled, then `new_tokens`
    decode passes follow, each feeding the last generated token. Latencies are
    medians over `repeats` timed generations after `warmup` untimed ones; memory comes
    from one extra, profiled generation (profiling slows it, so it is never timed).
    `threads` sets PyTorch's intra-op threads for the call (restored afterwards).
    Returns milliseconds and bytes.
    """
    for name, value, low in (("batch", batch, 1), ("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1),
                             ("repeats", repeats, 1), ("warmup", warmup, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 (or None to keep the current count), got {threads!r}")
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise ValueError(f"{type(model).__name__} has no config.vocab_size; measure_inference needs a HF causal LM")
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_len is not None and prompt_len + new_tokens > max_len:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's {max_len} positions")
    device = next(model.parameters()).device
    if device.type != "cpu":  # timings would need synchronisation and memory the accelerator's allocator
        raise ValueError(f"measure_inference measures CPU inference; the model is on {device}")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator)
    generation = _Generation(model, input_ids, new_tokens)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):  # first-call allocations and kernel selection are not inference latency
            generation()
        prefill, decode = [], []
        for _ in range(repeats):
            generation()
            prefill.append(generation.prefill_seconds)
            decode.append(generation.decode_seconds / new_tokens)
        kv = kv_cache_bytes(generation.cache)
        generation.cache = None
        transient = peak_allocated_bytes(generation) if measure_memory else None
        generation.cache = None
    finally:
        torch.set_num_threads(previous_threads)
    weights = weight_bytes(model)
    out = {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "threads": threads or previous_threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prefill_ms": 1e3 * statistics.median(prefill),
        "decode_ms_per_token": 1e3 * statistics.median(decode),
        "prefill_tokens_per_s": batch * prompt_len / statistics.median(prefill),
        "decode_tokens_per_s": batch / statistics.median(decode),
        "weight_bytes": weights,
        "kv_cache_bytes": kv,  # prompt_len + new_tokens positions: each decode pass caches the token it is fed
        "prefill_ms_all": [1e3 * s for s in prefill],
        "decode_ms_per_token_all": [1e3 * s for s in decode],
    }
    if transient is not None:
        out.update(activation_peak_bytes=transient, peak_memory_bytes=weights + transient,
                   memory_method="weights + peak of PyTorch CPU-allocator events (torch.profiler)")
    return out
