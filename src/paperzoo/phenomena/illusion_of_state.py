r"""The Illusion of State in State-Space Models (Merrill, Petty & Sabharwal, arXiv:2404.08819).

SSMs look like RNNs, so one expects them to track state: read a word of group elements
$g_1 \dots g_L$ and output every prefix product $s_t = g_1 g_2 \cdots g_t$ (the *word
problem*). The paper proves that S4 and Mamba-style SSMs, like transformers, lie in
$\mathsf{TC}^0$, so (unless $\mathsf{TC}^0 = \mathsf{NC}^1$) no fixed depth solves the word
problem of a non-solvable group such as $S_5$ or $A_5$ at every length, while the
word problem of an abelian group ($\mathbb{Z}_{60}$) is easy. Empirically (the paper's
experiments section, its figure of the minimum number of layers against length) the depth a
transformer or Mamba needs to reach 90% accuracy grows with $L$ on $A_5$/$S_5$, while a
one-layer RNN, and the paper's minimal extension IDS4, solve it at every length.

This module holds the compared sequence mixers as plain PyTorch modules, the stack that
turns token ids of a `paperzoo.core.tasks.GroupWordProblem` into per-position logits,
and `min_depth`, the smallest depth reaching a held-out accuracy threshold.

- `ElmanRNN`, a one-layer nonlinear RNN:
  $h_t = \sigma(W_{hh} h_{t-1} + W_{ih} x_t + b)$, $y_t = C h_t$ ($\sigma$ = tanh or ReLU).
- `DiagonalSelectiveSSM`, Mamba's S6 layer: input-dependent
  $\Delta_t = \mathrm{softplus}(W_\Delta u_t + b_\Delta)$, $B_t = W_B u_t$, $C_t = W_C u_t$,
  a fixed negative diagonal $A = -\exp(A_{\log})$ (per channel d and state n), and
  $\bar A_t = \exp(\Delta_t A)$, $\bar B_t u_t = \Delta_t B_t u_t$ (Mamba's simplified
  discretisation of B), the sequential scan $h_t = \bar A_t \odot h_{t-1} + \bar B_t u_t$ and
  $y_t = C_t h_t + D \odot u_t$; around it Mamba's in-projection $u = \mathrm{SiLU}(W_{in} x)$
  and output gate $W_{out}(y \odot \mathrm{SiLU}(W_z x))$.
- `IDS4`, the paper's *input-dependent S4* (its section on extending the expressive power of
  SSMs, beside the nonlinear "RNN-SSM"): the recurrence stays **linear** in $h$ but the
  transition is a **dense** matrix chosen by the input,
  $h_t = A(x_t)\, h_{t-1} + B(x_t)$, $y_t = C h_t$, with $A(x) = \mathrm{mat}(W_A x + b_A)$
  and $B(x) = W_B x + b_B$ affine in $x$. With one-hot inputs this is a weighted finite
  automaton, so one layer can hold a permutation: $A(g) = P(g)^\top$ tracks $S_5$ exactly
  (see the tests). The review this project started from describes the extension as "adding
  non-linearity to A"; that mixes up the paper's two proposals (RNN-SSM adds the
  nonlinearity, IDS4 keeps the recurrence linear). The paper wins: IDS4 here is linear.

A model (`StateTrackingModel`) is an embedding, `num_layers` pre-norm residual blocks
(mixer, then a two-layer MLP), a final norm and an unembedding over the task's vocabulary.
It is called like a Hugging Face causal LM (``model(input_ids=..., labels=...)`` returns
``.logits`` and ``.loss`` with labels shifted inside), so `paperzoo.core.training.train`
uses it unchanged, and the every-prefix format of `GroupWordProblem` scores $s_t$ from the
output after $g_t$; accuracy is `paperzoo.core.tasks.task_accuracy`, the share of words with
every $s_t$ right.

Deviations from the paper:

- Mamba's short causal convolution before the SSM is left out, and $\Delta$'s projection is
  full rank rather than low rank; neither changes the layer's class (diagonal, input-dependent,
  linear in $h$), which is what the paper's $\mathsf{TC}^0$ bound is about.
- The scans are sequential Python loops in fp32 (autocast is switched off inside them:
  products of many bf16 transitions drift), not Mamba's parallel hardware scan; the words here
  are short (tens of tokens).
- IDS4's transition is initialised near the identity ($b_A = I$, small $W_A$) so that products
  over a word neither vanish nor explode at the start of training; the paper does not say how
  it initialises IDS4. $B(x)$ is made affine in $x$ like $A(x)$ (with one-hot tokens a
  constant $B$ applied to $x_t$ is the same thing).
- The RNN is PyTorch's Elman `nn.RNN` with a learned initial state; blocks add residual
  connections, LayerNorm and an MLP around every mixer, the same for all three, so depth
  means the same thing for each.
- Models are trained on fresh samples with the project's loop (`train_word_problem`), not
  cached: `train_on_task` saves and loads Hugging Face models only. The paper's code
  (github.com/jopetty/word-problem, src/main.py: `get_dataset` with its default
  ``strict_len=False``) trains on the words of every length from 2 to L together;
  `train_word_problem(min_length=2)` does the same by cutting each training word's targets at a
  length drawn uniformly from 2..L (`mixed_length_labels`; the files of the paper's code are not
  equally large, so its mixture is not exactly uniform). Held-out words are always of length L.
- The paper's section numbers could not be checked against its text from this machine; the
  equations follow the paper as summarised above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from paperzoo.core.tasks import GroupWordProblem, TaskTraining, task_accuracy

KINDS = ("rnn", "diagonal-ssm", "ids4")


def _fp32(x: torch.Tensor):
    """No autocast for a scan: long products of bf16 transitions lose the state."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class ElmanRNN(nn.Module):
    """$h_t = \\sigma(W_{hh} h_{t-1} + W_{ih} x_t + b)$ from a learned $h_0$, $y_t = C h_t$.

    [n, T, d_in] -> [n, T, d_out].
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int | None = None, nonlinearity: str = "tanh"):
        super().__init__()
        self.rnn = nn.RNN(d_in, d_hidden, nonlinearity=nonlinearity, batch_first=True)
        self.h0 = nn.Parameter(torch.zeros(d_hidden))
        self.C = nn.Linear(d_hidden, d_out or d_in, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _fp32(x):
            h, _ = self.rnn(x.float(), self.h0.expand(1, len(x), -1).contiguous())
        return self.C(h)


def diagonal_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """$h_t = a_t \\odot h_{t-1} + b_t$ from $h_0 = 0$, sequentially; a, b [n, T, ...] -> h [n, T, ...]."""
    h, states = torch.zeros_like(b[:, 0]), []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    return torch.stack(states, dim=1)


class DiagonalSelectiveSSM(nn.Module):
    """Mamba's selective SSM (S6) with its in-projection and gate; [n, T, d] -> [n, T, d].

    `scan(u)` is the SSM proper on channels u [n, T, d]; `forward` wraps it as Mamba does.
    """

    def __init__(self, d: int, N: int = 16):
        super().__init__()
        self.in_proj, self.gate, self.out_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.delta_proj = nn.Linear(d, d)
        self.B_proj = nn.Linear(d, N, bias=False)
        self.C_proj = nn.Linear(d, N, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1).float()).repeat(d, 1))  # S4D-real: A_dn = -(n+1)
        self.D = nn.Parameter(torch.ones(d))

    @property
    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log)  # [d, N], fixed sign: every channel decays

    def scan(self, u: torch.Tensor) -> torch.Tensor:
        with _fp32(u):
            u = u.float()
            delta = F.softplus(self.delta_proj(u))  # Δ_t [n, T, d]: the selection, input-dependent
            B, C = self.B_proj(u), self.C_proj(u)  # B_t, C_t [n, T, N]
            A_bar = torch.exp(delta[..., None] * self.A)  # exp(Δ_t A) [n, T, d, N]
            Bu = delta[..., None] * B[:, :, None, :] * u[..., None]  # B̄_t u_t = Δ_t B_t u_t
            h = diagonal_scan(A_bar, Bu)  # h_t = Ā_t ⊙ h_{t-1} + B̄_t u_t
            return torch.einsum("ntdm,ntm->ntd", h, C) + self.D * u  # y_t = C_t h_t + D u_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.scan(F.silu(self.in_proj(x)))
        return self.out_proj(y * F.silu(self.gate(x)))


class IDS4(nn.Module):
    """Input-dependent S4: $h_t = A(x_t) h_{t-1} + B(x_t)$, $y_t = C h_t$, $A(x) = \\mathrm{mat}(W_A x + b_A)$ dense.

    [n, T, d] -> [n, T, d_out]; the recurrence is linear in h (no nonlinearity: that would be
    the paper's other proposal, RNN-SSM).
    """

    def __init__(self, d: int, N: int = 16, d_out: int | None = None, init_scale: float = 0.01):
        super().__init__()
        self.N = N
        self.A_proj = nn.Linear(d, N * N)
        self.B_proj = nn.Linear(d, N)
        self.C = nn.Linear(N, d_out or d, bias=False)
        with torch.no_grad():  # A(x) ≈ I at the start, so products over a word stay bounded
            self.A_proj.weight.normal_(0.0, init_scale)
            self.A_proj.bias.copy_(torch.eye(N).flatten())

    def states(self, x: torch.Tensor) -> torch.Tensor:
        with _fp32(x):
            x = x.float()
            A = self.A_proj(x).unflatten(-1, (self.N, self.N))  # A(x_t) [n, T, N, N]
            b = self.B_proj(x)  # B(x_t) [n, T, N]
            h, states = torch.zeros_like(b[:, 0]), []
            for t in range(x.shape[1]):
                h = (A[:, t] @ h[..., None]).squeeze(-1) + b[:, t]  # h_t = A(x_t) h_{t-1} + B(x_t)
                states.append(h)
            return torch.stack(states, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.C(self.states(x))


@dataclass(frozen=True)
class StateTrackingConfig:
    """A stack of `num_layers` blocks of one mixer `kind` ("rnn", "diagonal-ssm", "ids4") at width `hidden_size`.

    `state_size` is N: states per channel (diagonal SSM) or the state dimension (IDS4); the
    RNN's state is `hidden_size` wide. `build(vocab_size, max_len)` mirrors
    `paperzoo.core.tasks.TaskModelConfig.build`.
    """

    kind: str
    hidden_size: int = 64
    num_layers: int = 1
    state_size: int = 16
    mlp_ratio: int = 2
    nonlinearity: str = "tanh"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")

    def mixer(self) -> nn.Module:
        d = self.hidden_size
        if self.kind == "rnn":
            return ElmanRNN(d, d, nonlinearity=self.nonlinearity)
        if self.kind == "diagonal-ssm":
            return DiagonalSelectiveSSM(d, self.state_size)
        return IDS4(d, self.state_size)

    def build(self, vocab_size: int, max_len: int | None = None) -> "StateTrackingModel":
        return StateTrackingModel(self, vocab_size)


class Block(nn.Module):
    def __init__(self, config: StateTrackingConfig):
        super().__init__()
        d = config.hidden_size
        self.norm1, self.mixer = nn.LayerNorm(d), config.mixer()
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, config.mlp_ratio * d), nn.GELU(), nn.Linear(config.mlp_ratio * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class StateTrackingModel(nn.Module):
    """Token ids [n, T] -> logits [n, T, vocab], called like a HF causal LM (labels shifted inside the loss)."""

    def __init__(self, config: StateTrackingConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_) -> CausalLMOutput:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)).float()
        loss = None
        if labels is not None:  # position t predicts the label at t + 1, as HF causal LMs do
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def mixed_length_labels(batch, min_length: int, seed: int) -> torch.Tensor:
    """Labels of every-prefix words cut at a length drawn uniformly from [min_length, L]: -100 after the cut.

    For a causal model a word whose targets stop after g_l is the length-l word (no scored position
    sees a later token), so this trains on a uniform mixture of lengths min_length..L, as the
    paper's code does (`get_dataset` with ``strict_len=False`` joins the files of lengths 2..L).
    """
    n, T = batch.tokens.shape
    L = T - 2  # <start> g_1 .. g_L <start>; s_t is the target at position t + 1
    cut = torch.randint(min_length, L + 1, (n, 1), generator=torch.Generator().manual_seed(seed))
    position = torch.arange(T)[None, :]
    return batch.labels.masked_fill(position > cut + 1, -100)


def train_word_problem(model: nn.Module, task: GroupWordProblem, training: TaskTraining, seed: int = 0,
                       eval_size: int = 1024, min_length: int | None = None, stop_at: float | None = None,
                       check_every: int = 250) -> dict:
    """Train `model` in place on samples of `task` (loss on scored positions only); history with held-out accuracy.

    The same pool, loop and held-out seed as `paperzoo.core.tasks.train_on_task`, without its
    Hugging Face cache, so any module called like a causal LM can be trained. With `min_length`
    the training words are a uniform mixture of lengths min_length..L (`mixed_length_labels`);
    the held-out words are always of length L. With `stop_at`, training ends once the accuracy
    on 256 validation words of length L (their own seed), read every `check_every` steps,
    reaches it: the paper's code stops at 99% validation accuracy (``max_val_acc=0.99``).
    """
    from paperzoo.core.training import TrainConfig, train

    if task.format != "every-prefix" and min_length is not None:
        raise ValueError("mixed lengths need the every-prefix format")
    batches = task.sample(training.steps * training.batch_size, seed=seed)
    labels = batches.labels if min_length is None else mixed_length_labels(batches, min_length, seed)
    validation = task.sample(256, seed=2 * 10**9 + seed)
    history = train(model, batches.tokens, TrainConfig(
        steps=training.steps, batch_size=training.batch_size, seq_len=task.length, lr=training.lr,
        warmup_steps=training.warmup_steps, weight_decay=training.weight_decay,
        eval_every=check_every if stop_at is not None else 0),
        labels=labels, seed=seed, desc=f"training on {task.group_name} (L={task.L})",
        stop=None if stop_at is None else lambda: task_accuracy(model, validation) >= stop_at)
    return {"train_loss": history["train_loss"], "seconds": history["seconds"], "steps": history["steps"],
            "accuracy": task_accuracy(model, task.sample(eval_size, seed=10**9 + seed))}


def min_depth(make_model: Callable[[int], nn.Module], group_name: str, length: int, depths=(1, 2, 3, 4),
              threshold: float = 0.9, training: TaskTraining = TaskTraining(steps=300), seed: int = 0,
              trainer: Callable = train_word_problem) -> tuple[int | None, dict[int, float]]:
    """The smallest depth whose trained model reaches `threshold` held-out accuracy on the word problem at `length`.

    `make_model(depth)` returns a fresh untrained model; each depth in `depths` (in order) is
    trained with ``trainer(model, task, training, seed)`` on the every-prefix format (every
    prefix product is a target, so accuracy is the share of words with every $s_t$ right), and
    the search stops at the first that passes. Returns (that depth, or None when none does;
    {depth: accuracy} of the depths trained).
    """
    task = GroupWordProblem(group_name, length, "every-prefix")
    accuracies = {}
    for depth in depths:
        torch.manual_seed(seed)
        accuracies[depth] = trainer(make_model(depth), task, training, seed)["accuracy"]
        if accuracies[depth] >= threshold:
            return depth, accuracies
    return None, accuracies
