"""Swap one block of an unmodified HF decoder, size variants to an equal budget, and compare them.

The architectures papers each replace one part of a transformer: the token mixer
(FFTNet, Mamba-style scans), the feed-forward block (product-key memory), the attention
function (adaptive-temperature softmax), the embedding or the head (T-FREE). Their
claims compare the variant with the standard block *at an equal budget, on the same
tokens*. This module is that comparison, written once:

- `swap(model, slot, factory, layers)` installs a block into an unmodified HF decoder
  (Llama, Qwen2, Mistral: every model whose layers have ``self_attn`` and ``mlp``).
  Slots:

  ============== ======================================================================
  ``mixer``      ``factory(config, layer_idx)`` -> a plain ``[B, T, D] -> [B, T, D]``
                 module, wrapped to answer HF's attention call; it ignores HF's mask
                 and rotary positions, so a causal LM needs a causal mixer
  ``ffn``        ``factory(config, layer_idx)`` -> ``[B, T, D] -> [B, T, D]``, for ``mlp``
  ``attention_fn`` a function with transformers' attention-interface signature,
                 registered under its ``__name__``; it always receives an explicit
                 additive mask (0 where attended, the dtype's minimum elsewhere)
  ``embedding``  ``factory(config)`` -> ``ids [B, T] -> [B, T, D]``
  ``head``       ``factory(config)`` -> ``[B, T, D] -> [B, T, V]``
  ============== ======================================================================

  A whole model (its own embedding, body and head) joins the comparison by following
  the HF causal-LM convention instead: ``forward(input_ids, labels=None)`` returning an
  object with ``.loss`` and ``.logits``, so the same training loop trains it.
- `is_causal` checks that no token after t changes the outputs up to t.
- `parameter_count` and `flops_per_token` measure budgets; `match_budget` sizes a
  variant by an integer knob (a width, a number of memory keys) to within 3% of a target.
- `compare_blocks(variants, task, training, seeds)` trains every variant on the same
  sampled examples, in the same batch order, from the same seed, and returns one row per
  variant and seed: held-out loss and accuracy on the task's scored positions,
  parameters, FLOPs per token and wall time.

FLOPs come from torch's FLOP counter (`torch.utils.flop_counter`), forward and backward
of one row. It counts matmul-class operations only (matrix products, convolutions,
scaled-dot-product attention): elementwise work such as a sequential scan or an FFT is
not counted, and an experiment whose variant spends its time there says so and adds an
analytic count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from paperzoo.core.models import decoder_layers
from paperzoo.core.tasks import TaskBatch, TaskModelConfig, TaskTraining, task_correct
from paperzoo.core.training import TrainConfig, train

SLOTS = ("mixer", "ffn", "attention_fn", "embedding", "head")


class MixerAdapter(nn.Module):
    """HF's attention call on a plain ``[B, T, D] -> [B, T, D]`` mixer; returns ``(output, None)`` as HF attention does."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.mixer(hidden_states), None


def swap(model: nn.Module, slot: str, factory: Callable, layers: Iterable[int] | None = None) -> nn.Module:
    """Install `factory`'s block in `slot` of `model` (in place; also returned). `layers`: None for every layer."""
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; choose one of {', '.join(SLOTS)}")
    config = model.config
    if slot in ("mixer", "ffn"):
        _, blocks = decoder_layers(model)
        chosen = range(len(blocks)) if layers is None else list(layers)
        for i in chosen:
            if not 0 <= i < len(blocks):
                raise ValueError(f"layer {i} does not exist: the model has {len(blocks)} layers")
            if slot == "mixer":
                blocks[i].self_attn = MixerAdapter(factory(config, i))
            else:
                blocks[i].mlp = factory(config, i)
        return model
    if layers is not None:
        raise ValueError(f"slot {slot!r} is model-wide; pass layers=None")
    if slot == "attention_fn":
        name = factory.__name__
        AttentionInterface.register(name, factory)
        AttentionMaskInterface.register(name, eager_mask)  # an explicit mask: the function never has to infer causality
        model.set_attn_implementation(name)
    elif slot == "embedding":
        model.set_input_embeddings(factory(config))
    else:
        model.set_output_embeddings(factory(config))
    return model


def standard_model(vocab_size: int, length: int, hidden_size: int, num_layers: int = 2, num_heads: int = 2,
                   mlp_ratio: int = 4, seed: int | None = None) -> nn.Module:
    """The tiny Llama every variant is compared with (`core.tasks.TaskModelConfig`)."""
    if seed is not None:
        torch.manual_seed(seed)
    return TaskModelConfig(hidden_size, num_layers, num_heads, mlp_ratio).build(vocab_size, length)


def parameter_count(model: nn.Module, embeddings: bool = True) -> int:
    """Parameters of `model`; ``embeddings=False`` leaves out the input embedding and the output head."""
    skip = set()
    if not embeddings:
        for get in ("get_input_embeddings", "get_output_embeddings"):
            module = getattr(model, get, lambda: None)()
            if module is not None:
                skip |= {id(p) for p in module.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def flops_per_token(model: nn.Module, seq_len: int, vocab_size: int) -> float:
    """Training FLOPs per token (forward and backward of one row of `seq_len` random tokens), by torch's counter."""
    ids = torch.randint(vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops() / seq_len


def match_budget(build: Callable[[int], nn.Module], low: int, high: int, target: float, by: str = "params",
                 seq_len: int = 64, vocab_size: int = 64, tolerance: float = 0.03) -> tuple[int, nn.Module, float]:
    """The knob in [low, high] whose model's budget is nearest `target`: (knob, model, budget / target).

    The budget (``by="params"`` or ``"flops"`` per token) must grow with the knob; the search
    is a bisection. Raises ValueError when the nearest budget is off by more than `tolerance`.
    """
    if by not in ("params", "flops"):
        raise ValueError(f"by must be 'params' or 'flops', not {by!r}")

    def budget(model: nn.Module) -> float:
        return parameter_count(model) if by == "params" else flops_per_token(model, seq_len, vocab_size)

    lo, hi = low, high
    while hi - lo > 1:  # invariant after the loop: the target lies between budget(lo) and budget(hi)
        mid = (lo + hi) // 2
        if budget(build(mid)) < target:
            lo = mid
        else:
            hi = mid
    best = min(((k, build(k)) for k in {lo, hi}), key=lambda km: abs(budget(km[1]) - target))
    ratio = budget(best[1]) / target
    if abs(ratio - 1) > tolerance:
        raise ValueError(f"no knob in [{low}, {high}] brings the {by} within {tolerance:.0%} of {target:.4g} "
                         f"(nearest: {best[0]}, ratio {ratio:.3f})")
    return best[0], best[1], ratio


@torch.no_grad()
def is_causal(model: nn.Module, vocab_size: int, seq_len: int, atol: float = 1e-5) -> bool:
    """True when changing the tokens after position t never changes the logits up to t (checked at every t)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab_size, (1, seq_len), generator=g)
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids).logits
    try:
        for t in range(seq_len - 1):
            changed = ids.clone()
            changed[0, t + 1:] = torch.randint(vocab_size, (seq_len - t - 1,), generator=g)
            if not torch.allclose(model(input_ids=changed).logits[0, : t + 1], logits[0, : t + 1], atol=atol):
                return False
        return True
    finally:
        model.train(was_training)


@torch.no_grad()
def held_out_loss(model: nn.Module, batch: TaskBatch, chunk: int = 256) -> float:
    """Mean cross-entropy (nats) over the scored positions of `batch`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(batch.tokens), chunk):
        labels = batch.labels[i:i + chunk]
        n = int((labels[:, 1:] != -100).sum())  # HF shifts: the first position is never predicted
        total += model(input_ids=batch.tokens[i:i + chunk], labels=labels).loss.item() * n
        count += n
    model.train(was_training)
    return total / count


def compare_blocks(variants: dict[str, Callable[[], nn.Module]], task, training: TaskTraining,
                   seeds: Sequence[int] = (0,), eval_size: int = 1024, eval_task=None) -> list[dict]:
    """Train every variant on the same examples and batch order per seed; one row per (variant, seed).

    Each model is built right after ``torch.manual_seed(seed)``, so a seed fixes the
    initialisation, the sampled training examples and the batch order. Rows hold
    ``variant, seed, loss`` (held-out, nats per scored token), ``accuracy`` (rows whose
    every scored token is the greedy prediction), ``correct`` (that, per held-out row: a
    bool array, the same rows for every variant of a seed, for paired intervals),
    ``params``, ``flops_per_token`` and ``seconds`` (training wall time). `eval_task` evaluates on another task (longer
    sequences, held-out templates) instead of fresh samples of `task`.
    """
    rows = []
    for seed in seeds:
        examples = task.sample(training.steps * training.batch_size, seed=seed)
        held_out = (eval_task or task).sample(eval_size, seed=10**9 + seed)
        for name, build in variants.items():
            torch.manual_seed(seed)
            model = build()
            flops = flops_per_token(model, task.length, task.vocab_size)
            start = time.perf_counter()
            train(model, examples.tokens, TrainConfig(
                steps=training.steps, batch_size=training.batch_size, seq_len=task.length, lr=training.lr,
                warmup_steps=training.warmup_steps, weight_decay=training.weight_decay),
                labels=examples.labels, seed=seed, desc=f"{name} on {type(task).__name__}, seed {seed}")
            seconds = time.perf_counter() - start
            correct = task_correct(model, held_out)
            rows.append({"variant": name, "seed": seed, "loss": held_out_loss(model, held_out),
                         "accuracy": correct.float().mean().item(), "correct": correct.numpy(),
                         "params": parameter_count(model), "flops_per_token": flops, "seconds": seconds})
    return rows
