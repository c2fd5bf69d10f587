"""The one training loop every paper reuses.

AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast where
it pays (`autocast_pays`: native bf16 and, on a CPU, matrices at least 128 wide),
a rich progress bar and periodic validation. A non-finite loss stops training
with `NonFiniteLossError` instead of silently producing a broken model.

Multi-device: launch with ``torchrun --nproc-per-node N``. When torchrun's
environment is present the model is wrapped in DistributedDataParallel and each
rank draws its own batches; nothing else changes.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import get_cosine_schedule_with_warmup

from paperzoo.core.evaluation import evaluate


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: validate only at the end


def training_device() -> torch.device:
    """Where paperzoo trains its cached models: the GPU when there is one (PAPERZOO_DEVICE overrides)."""
    name = os.environ.get("PAPERZOO_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_autocast_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


AUTOCAST_MIN_WIDTH = 128


def model_width(model: torch.nn.Module) -> int:
    """The smaller side of the model's widest weight matrix: its hidden width for a transformer."""
    return max((min(p.shape) for p in model.parameters() if p.ndim == 2), default=0)


def autocast_pays(model: torch.nn.Module, device: torch.device) -> bool:
    """Train under bf16 autocast: where the device has native bf16 and, on a CPU, the model is >= 128 wide.

    On a CPU, autocast casts every weight and activation at each step; below width 128 the
    casts cost more than the bf16 matmuls save. Measured one thread, interleaved, one training
    step (benchmarks/autocast_width.py), bf16/fp32 time: 1.88 at width 32, 1.85 at 64, 0.76 at 128
    and 0.60 at 256 (AMD EPYC with AVX512-BF16). GPUs keep bf16 at every width.
    """
    if not bf16_autocast_available(device):
        return False
    return device.type != "cpu" or model_width(model) >= AUTOCAST_MIN_WIDTH


@contextmanager
def single_thread():
    """Run the block on one CPU thread, then restore the thread count.

    Tiny models do many small operations that two threads cannot split usefully; on a
    busy machine a second thread makes them wait for each other (measured here: a
    tiny-MoE training step took 6.0 s with two threads and 0.57 s with one).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def token_blocks(tokenizer, docs, seq_len: int) -> torch.Tensor:
    """Concatenate documents, each followed by EOS (when the tokenizer has one), and cut into [N, seq_len] blocks."""
    ids: list[int] = []
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for row in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        ids.extend(row + separator)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def progress(desc: str, disable: bool | None = None) -> Progress:
    """A progress bar on stderr; silent when stderr is not a terminal (logs and pipes stay clean)."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False, console=console,
        disable=not console.is_terminal if disable is None else disable,
    )


def train(model, blocks: torch.Tensor, config: TrainConfig, val_blocks: torch.Tensor | None = None,
          params=None, desc: str = "training", seed: int = 0, labels: torch.Tensor | None = None,
          stop: Callable[[], bool] | None = None) -> dict:
    """Train `model` (in place) on random batches of `blocks`; return the loss history.

    `params` restricts the optimiser (e.g. to LoRA weights); by default every
    parameter with requires_grad is trained. `labels` (the shape of `blocks`, -100 on
    positions left out of the loss) defaults to `blocks` itself. `stop`, asked every
    `config.eval_every` steps, ends training early when it returns True (single process only; the
    schedule stays the one for `config.steps`); the history's "steps" counts the steps taken.
    """
    if labels is not None and labels.shape != blocks.shape:
        raise ValueError(f"labels must have the shape of blocks {tuple(blocks.shape)}, not {tuple(labels.shape)}")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    device = next(model.parameters()).device
    net = model
    if distributed:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = torch.distributed.get_rank()
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            model.to(device)
        net = torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95),
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    use_bf16 = autocast_pays(model, device)
    history = {"train_loss": [], "val": [], "tokens": 0, "bf16": use_bf16}
    model.train()
    start = time.perf_counter()
    with progress(desc) as bar:
        task = bar.add_task(desc, total=config.steps, status="")
        for step in range(1, config.steps + 1):
            idx = torch.randint(len(blocks), (config.batch_size,), generator=generator)
            x = blocks[idx, : config.seq_len].to(device)
            y = x if labels is None else labels[idx, : config.seq_len].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = net(input_ids=x, labels=y).loss
            if not math.isfinite(loss.item()):
                if not all(torch.isfinite(p).all() for p in model.parameters()):
                    raise NonFiniteLossError(f"{desc}: the model's weights hold NaN or inf (loss {loss.item()} at step "
                                             f"{step}); check the checkpoint")
                raise NonFiniteLossError(f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history["train_loss"].append(loss.item())
            history["tokens"] += x.numel()
            status = f"loss {loss.item():.3f}"
            last = step == config.steps
            if val_blocks is not None and rank == 0 and (last or (config.eval_every and step % config.eval_every == 0)):
                metrics = evaluate(model, val_blocks)
                history["val"].append({"step": step, **metrics})
                model.train()
                status += f"  val ppl {metrics['perplexity']:.1f}"
            bar.update(task, advance=1, status=status)
            if stop is not None and config.eval_every and step % config.eval_every == 0 and stop():
                break
    history["steps"] = step
    history["seconds"] = time.perf_counter() - start
    history["tokens_per_second"] = history["tokens"] / history["seconds"]
    model.eval()
    return history
