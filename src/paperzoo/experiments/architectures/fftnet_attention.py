"""Reproduction of 2502.18394: FFTNet's adaptive spectral mixer against attention and FNet at equal width.

Three tiny two-layer models, identical but for the token mixer, are trained from the same
seed on the same examples in the same order, on three tasks read out at the last
position (the answer never enters the input, so non-causal mixers cannot peek):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits as a sequence of 64 pixel
  intensities (tokens 0..16), classified into 10 classes (`DigitsPixels`; a fixed 80/20
  split, every test image scored once);
- ``recall``: associative recall, 8 key-value pairs then a key (`core.tasks.AssociativeRecall`),
  each pair one token (``pair_tokens=True``), so recall is one content-based look-up;
- ``max``: the largest of 16 tokens out of 64 (`core.tasks.MaxRetrieval`).

Arms (`paperzoo.core.blocks`, one tiny Llama each, width 64, MLPs and head shared in form):

- ``attention``: the standard block with softmax attention over *all* tokens (the Llama's
  own attention with rotary positions, its causal mask replaced by none: `bidirectional_sdpa`),
  the non-causal attention FFTNet is compared with in the paper;
- ``FFTNet``: the mixer slot holds `SpectralAttention` (heads as the attention's);
- ``FNet``: the mixer slot holds `FNetMixer` (real part of a 2-D FFT), the paper's
  fixed-Fourier baseline.

The spectral mixers see no rotary positions, so their arms embed tokens plus a learned
absolute position embedding, as the paper's models (and FNet's) do. Each spectral mixer
keeps its own residual and LayerNorm inside the host's pre-norm residual (the layer as
published, dropped into the slot).

Margins: accuracy is scored per held-out example (right or wrong), and every comparison
is paired over the same examples with a 95% bootstrap interval. "Beats" passes when the
interval of the difference lies above zero and fails when it lies below; "within 3
points" passes when the interval's low end is above -0.03 and fails when its high end
is below -0.03. Chance on a task is the accuracy of always answering its most frequent
held-out answer.

Time: the O(N log N) claim is measured, not checked here: `benchmarks/fftnet_time.py`
times one FFTNet layer against one attention layer for N = 256..16k on one thread and
reports the log-log slopes. The experiment records torch's FLOP count per token (which
leaves out FFTs) and an analytic count of the FFT work (`fft_flops_per_token`).

Precondition: the control has *learned* each task, i.e. the 95% interval of attention's
held-out accuracy lies above ``LEARNED`` = 0.8 on every task. The comparisons ask whether
FFTNet matches a model that can do the task; against a control that has not (say 0.22 on
recall against chance 0.07) a tie only says both are still early in training, and "within 3
points of attention" means nothing. 0.8 is a fixed level, not a fraction of chance: on every
task it is more than three times the chance rate (0.13, 0.07, 0.22-0.25 here) and means the control
answers four examples in five, yet leaves room above it (a two-layer width-64 model is not
expected to be perfect on pixel digits). It was set before the calibration below and not moved.

Set-up, chosen on the attention arm only (its held-out accuracy and the precondition), never on
FFTNet's or FNet's numbers: width 64, two layers, two heads (the family's standard model),
AdamW at 3e-3 with 50 warm-up steps (core.tasks defaults), batch 32; all unchanged from the
first calibration. History, honestly: an earlier version ran 300 steps on every task with
two-token recall, with the weaker precondition "attention above chance". Its checks were seen
at seeds 0 and 1 (attention / FFTNet / FNet, digits 0.73-0.75 / 0.87 / 0.95, recall 0.22 /
0.25 / 0.17, max 0.94-0.98 / 0.86 / 0.86; not reproduced on both seeds, FFTNet below FNet on
digits). No arm had learned recall, so that comparison could not test the claim. The revision
changes only the control's set-up and the precondition; the claim, predicate, checks and
their thresholds (beats: interval above 0; within 3 points) are unchanged. The revision's
calibration printed attention's accuracy only (one thread, CPU time of attention's training):

- recall: pair tokens, 8 pairs, the last-position single query kept (multi-query recall writes
  answers into the input, which a non-causal mixer would see). Attention reached 0.963
  [0.951, 0.974] at 500 steps (seed 0) and 0.996, 0.999, 0.992 (low ends >= 0.986) at 1000
  steps (seeds 0, 1, 2); 1000 steps chosen for a margin above 0.8 (12 s of attention).
- digits: 300 steps left attention at 0.73-0.75, below the level. 600 steps gave 0.889,
  0.856, 0.850 (low ends 0.856, 0.819, 0.811: barely above 0.8); 1000 steps gave 0.886,
  0.894, 0.875 (low ends 0.853, 0.861, 0.842); 1000 steps chosen (47 s of attention).
- max: 300 steps kept (attention 0.94-0.98 at seeds 0, 1, then 0.988 at seed 2).

One seed at `small` trains nine models in about 2.4 minutes of CPU on one thread (seeds 0-2:
434 s user+system in all, /usr/bin/time, on a shared machine). `large` is untested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from paperzoo.architectures.fftnet_attention import fftnet_mixer, fnet_mixer
from paperzoo.core.blocks import flops_per_token, parameter_count, standard_model, swap
from paperzoo.core.experiment import Claim, Outcome, RunContext
from paperzoo.core.margins import all_of, beats, bootstrap_mean, paired_difference
from paperzoo.core.tasks import AssociativeRecall, MaxRetrieval, TaskBatch
from paperzoo.core.training import TrainConfig, single_thread, train

WITHIN = 0.03  # "within 3 points of attention"
LEARNED = 0.8  # the control has learned a task when its accuracy interval lies above this (see the docstring)
ARMS = ("attention", "FFTNet", "FNet")
TASKS = ("digits", "recall", "max")


@dataclass(frozen=True)
class DigitsPixels:
    """scikit-learn's 8x8 digits as 64 pixel tokens (0..16), a placeholder, and the class (17 + 1 + c) read out there.

    A fixed 80/20 split (permutation seed 0). `sample(n, seed)` walks fresh permutations of
    the split, so n = the split's size scores every image exactly once.
    """

    split: str = "train"

    vocab_size = 28  # 17 intensities, the placeholder, 10 classes
    length = 65

    def sample(self, n: int, seed: int) -> TaskBatch:
        pixels, labels = _digits(self.split)
        g = torch.Generator().manual_seed(int(seed))
        rounds = math.ceil(n / len(labels))
        idx = torch.cat([torch.randperm(len(labels), generator=g) for _ in range(rounds)])[:n]
        tokens = torch.cat([pixels[idx], torch.full((n, 1), 17)], dim=1)
        targets = tokens.clone()
        targets[:, -1] = 18 + labels[idx]
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, -1] = True
        return TaskBatch(tokens, scored, targets)


@lru_cache(maxsize=2)
def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()  # bundled with scikit-learn: nothing downloads
    order = np.random.default_rng(0).permutation(len(data.target))
    cut = int(0.8 * len(order))
    rows = order[:cut] if split == "train" else order[cut:]
    return torch.as_tensor(data.images.reshape(len(data.target), 64)[rows], dtype=torch.long), \
        torch.as_tensor(data.target[rows], dtype=torch.long)


def bidirectional_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Softmax attention over every token (no mask): [B, H, T, hd] -> ([B, T, H, hd], None). Rotary is already applied."""
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out = nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


class TokensAndPositions(nn.Module):
    """Token embedding plus a learned absolute position embedding (the spectral mixers' only source of position)."""

    def __init__(self, config):
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.positions = nn.Parameter(torch.empty(1, config.max_position_embeddings, config.hidden_size))
        for p in (self.tokens.weight, self.positions):
            nn.init.normal_(p, std=0.02)  # HF's Llama initialisation

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions[:, : ids.shape[1]]


def build_arm(name: str, vocab_size: int, length: int, s: dict) -> nn.Module:
    model = standard_model(vocab_size, length, s["hidden_size"], s["num_layers"], s["num_heads"])
    if name == "attention":
        return swap(model, "attention_fn", bidirectional_sdpa)
    swap(model, "embedding", TokensAndPositions)
    return swap(model, "mixer", fftnet_mixer if name == "FFTNet" else fnet_mixer)


def fft_flops_per_token(name: str, length: int, s: dict) -> float:
    """Analytic FFT work per token, forward only (torch's counter leaves FFTs out): ~2.5 N log2 N real flops per rFFT
    of length N (5 N log2 N for a complex FFT); FFTNet does an rFFT and an inverse per channel, FNet a complex 2-D FFT."""
    N, D = length, s["hidden_size"]
    per_layer = (2 * 2.5 * N * math.log2(N) * D if name == "FFTNet"
                 else 5 * N * D * math.log2(N * D) if name == "FNet" else 0.0)
    return s["num_layers"] * per_layer / N


def make_task(name: str, split: str = "train"):
    return {"digits": DigitsPixels(split), "recall": AssociativeRecall(pairs=8, keys=16, values=16, pair_tokens=True),
            "max": MaxRetrieval(items=16, values=64)}[name]


@torch.no_grad()
def per_example_correct(model, batch: TaskBatch) -> np.ndarray:
    model.eval()
    logits = torch.cat([model(input_ids=batch.tokens[i:i + 256]).logits[:, -2].float()
                        for i in range(0, len(batch.tokens), 256)])  # the last position is predicted from the one before
    return (logits.argmax(-1) == batch.expected[:, -1]).float().numpy()


def chance(batch: TaskBatch) -> float:
    answers = batch.expected[:, -1]
    return float(torch.bincount(answers).max() / len(answers))


def _diff(m: dict, task: str, a: str, b: str):
    return paired_difference(m["correct"][task][a], m["correct"][task][b])


def within(interval) -> bool | None:
    if interval.low > -WITHIN:
        return True
    return False if interval.high < -WITHIN else None


def at_least_two(values) -> bool | None:
    values = list(values)
    if sum(v is True for v in values) >= 2:
        return True
    return False if sum(v is False for v in values) >= 2 else None


def preconditions(m: dict) -> dict[str, bool | None]:
    return {f"attention has learned {task} (accuracy interval above {LEARNED})":
            bootstrap_mean(m["correct"][task]["attention"]).above(LEARNED) for task in TASKS}


def checks(m: dict) -> dict[str, bool | None]:
    return {
        "FFTNet beats FNet on all three tasks (paired interval over examples above 0 on each)":
            all_of(beats(m["correct"][t]["FFTNet"], m["correct"][t]["FNet"]) for t in TASKS),
        f"FFTNet is within {WITHIN:.0%} accuracy of attention on at least two of the three tasks":
            at_least_two(within(_diff(m, t, "FFTNet", "attention")) for t in TASKS),
    }


CLAIM = Claim(
    statement=(
        "FFTNet -- an FFT over tokens, a spectral filter adapted to the input's global context by an MLP, modReLU "
        "and the inverse FFT -- mixes tokens globally in O(N log N) instead of self-attention's O(N^2), and is "
        "competitive with self-attention while outperforming the fixed Fourier mixing of FNet (Long Range Arena "
        "and ImageNet)."
    ),
    predicate=(
        "Two-layer width-64 models identical but for the token mixer (bidirectional softmax attention; FFTNet; FNet), "
        "trained on the same examples of three tasks read out at the last position: 8x8 digits as 64-pixel "
        "sequences, associative recall (8 pairs, one token each), max retrieval (16 of 64). Accuracy per held-out "
        "example. "
        "Reproduced when FFTNet beats FNet on all three tasks (paired bootstrap interval above 0 on each) and is "
        f"within {WITHIN:.0%} of attention on at least two (interval low end above -{WITHIN}). Not reproduced when "
        "FNet is clearly better on any task, or FFTNet clearly more than 3 points below attention on two. "
        f"Precondition: attention has learned every task (95% accuracy interval above {LEARNED}). Time versus N is "
        "a benchmark (benchmarks/fftnet_time.py), not a check."
    ),
    checks=checks,
    preconditions=preconditions,
    source=("arXiv:2502.18394 abstract (O(n log n), superior to fixed Fourier and standard attention) and the LRA "
            "and ImageNet result tables; official code jacobfa/fft fftnet_modules.py (MultiHeadSpectralAttention)"),
)

INPUTS: tuple = ()
SUBSTRATE: tuple = ()
SEED_VARIES = ("the models' initialisation, the sampled recall and max examples and the batch order; the digits "
               "split is fixed")

_BASE = dict(hidden_size=64, num_layers=2, num_heads=2, batch_size=32, lr=3e-3, warmup_steps=50, eval_size=1024)
SCALES = {
    "smoke": {**_BASE, "hidden_size": 16, "steps": {t: 3 for t in TASKS}, "batch_size": 8, "warmup_steps": 1,
              "eval_size": 64},
    "small": {**_BASE, "steps": {"digits": 1000, "recall": 1000, "max": 300}},
    "large": {**_BASE, "steps": {t: 2000 for t in TASKS}, "batch_size": 64, "hidden_size": 128, "num_heads": 4,
              "eval_size": 4096},
}


def run(ctx: RunContext) -> Outcome:
    s = ctx.settings
    metrics = {"correct": {}, "chance": {}, "arms": {}}
    with single_thread():
        for task_name in TASKS:
            task = make_task(task_name)
            steps = s["steps"][task_name]
            rows = task.sample(steps * s["batch_size"], seed=ctx.seed)
            held_out = (make_task(task_name, "test").sample(len(_digits("test")[1]), seed=0) if task_name == "digits"
                        else task.sample(s["eval_size"], seed=10**9 + ctx.seed))
            metrics["chance"][task_name] = chance(held_out)
            metrics["correct"][task_name], metrics["arms"][task_name] = {}, {}
            for arm in ARMS:
                torch.manual_seed(ctx.seed)
                model = build_arm(arm, task.vocab_size, task.length, s)
                history = train(model, rows.tokens, TrainConfig(
                    steps=steps, batch_size=s["batch_size"], seq_len=task.length, lr=s["lr"],
                    warmup_steps=s["warmup_steps"], weight_decay=0.0), labels=rows.labels, seed=ctx.seed,
                    desc=f"{arm} on {task_name}, seed {ctx.seed}")
                correct = per_example_correct(model, held_out)
                metrics["correct"][task_name][arm] = correct.tolist()
                metrics["arms"][task_name][arm] = {
                    "accuracy": float(correct.mean()), "params": parameter_count(model),
                    "flops_per_token": flops_per_token(model, task.length, task.vocab_size),
                    "fft_flops_per_token": fft_flops_per_token(arm, task.length, s),
                    "seconds": history["seconds"], "final_train_loss": history["train_loss"][-1]}
    metrics["FFTNet_minus"] = {t: {b: _diff(metrics, t, "FFTNet", b).as_dict() for b in ("attention", "FNet")}
                               for t in TASKS}
    return Outcome(metrics, lambda fig: plot(fig, metrics))


def plot(fig, m: dict) -> None:
    ax = fig.subplots(1, 1)
    width, colours = 0.27, {"attention": "tab:blue", "FFTNet": "tab:green", "FNet": "tab:gray"}
    for j, arm in enumerate(ARMS):
        for x, task in enumerate(TASKS):
            i = bootstrap_mean(m["correct"][task][arm])
            ax.bar(x + (j - 1) * width, i.mean, width, color=colours[arm], label=arm if x == 0 else None,
                   yerr=[[i.mean - i.low], [i.high - i.mean]], capsize=3)
    for x, task in enumerate(TASKS):
        ax.hlines(m["chance"][task], x - 1.5 * width, x + 1.5 * width, color="black", ls=":",
                  label="chance" if x == 0 else None)
    ax.set_xticks(range(len(TASKS)), ["8x8 digits as pixels", "associative recall", "max retrieval"])
    ax.set(ylabel="held-out accuracy (95% bootstrap)", ylim=(0, 1.05), title="Equal width, same data and order")
    ax.legend(fontsize=8)
