r"""Energy-Based Transformers: a decoder that scores a candidate next token, and predicts by descending that score.

Gladstone et al., *Energy-Based Transformers are Scalable Learners and Thinkers*,
arXiv:2507.02092 (2025); official code alexiglad/EBT (``model/nlp/ebt.py``,
``model/ar_ebt_default.py``).

A Transformer++ maps a context to next-token logits in one forward pass. An EBT instead
learns a scalar **energy** $E_\theta(x_{\le t}, \hat y_{t+1})$ of the context and a
*candidate* prediction, and predicts by gradient descent on the candidate (Sec. 3).
For text the candidate is a vector of logits $\hat y \in \mathbb{R}^V$; the model reads
the distribution $p = \mathrm{softmax}(\hat y)$ as its expected embedding, $p\,W_{\mathrm{emb}}$
(``vocab_to_embed_uses_prob_dist`` in the official code). Starting from random logits,
each step differentiates the energy with respect to the distribution and steps on it
(``step_space="probabilities"``, the official ``normalize_initial_condition`` path of
``model/nlp/ebt.py``):

$$\hat y_0 \sim \mathcal N(0, \sigma_0^2 I),\qquad p_i = \mathrm{softmax}(\hat y_i),\qquad
  \hat y_{i+1} = p_i - \alpha\, \nabla_{p}\, E_\theta(x_{\le t}, p_i),\qquad i = 0..K-1,$$

with a learnable step size $\alpha$ and $K = 2$ (the paper's System-1 setting). The result
of the step is not a distribution: it is used as is as the next step's logits (and as the
prediction's logits), so a step of size 0 maps logits $\hat y$ to logits $p$. Because $E$
reads $p$ linearly through $W_{\mathrm{emb}}$, $\nabla_p E$ is an embedding row dotted with
$\partial E / \partial (pW)$: every vocabulary entry moves on the same scale.
``step_space="logits"`` instead steps on the logits as the paper's equations read,
$\hat y_{i+1} = \hat y_i - \alpha \nabla_{\hat y} E$, where
$\nabla_{\hat y} E = p \odot (\nabla_p E - p^\top \nabla_p E)$ scales each entry's move by
its own $p_v$ (about $1/V$ from a random start).

Training is *through* the optimisation: every step's logits are scored against the true
next token and the losses averaged,

$$\mathcal L = \frac1K \sum_{i=1}^{K} \mathrm{CE}\big(\hat y_i,\ x_{t+1}\big),$$

so $\theta$ (and $\alpha$) learn a landscape whose gradient steps land on the data: the
second-order term $\partial \nabla E / \partial \theta$ is what trains the energy.

**How the candidate enters the sequence** (the paper's autoregressive EBT, Sec. 3 and
App. C; the official ``ar_ebt_default.py``): the decoder reads $2T$ embeddings, the $T$
observed tokens $x_1..x_T$ followed by the $T$ candidates $\hat y_2..\hat y_{T+1}$.
Observed tokens attend causally among themselves. The candidate at stream position $t$
(for $x_{t+1}$) attends to the observed $x_{\le t}$ and to itself only -- never to
another candidate, never to $x_{t+1}$ -- and carries rotary position $t+1$, the position
it predicts. A linear head on the final hidden state of candidate $t$ gives
$E_t$. Because no energy reads another position's candidate, $\nabla_{\hat y_t} \sum_s E_s
= \nabla_{\hat y_t} E_t$ and all $T$ predictions are optimised in parallel, causally.

Regularisers of the energy landscape (Sec. 3.3; the System-2 recipe), all off by default:
Langevin noise $\hat y_i \leftarrow \hat y_i + \eta,\ \eta \sim \mathcal N(0, \sigma^2)$
on the logits before each step (before the softmax, where the official code adds it);
random step sizes $\alpha \sim U[\alpha/s, \alpha s]$ per position; a random number of
steps $K + U\{0..r\}$ per batch; a replay buffer whose rows restart from the logits a
previous batch ended with, so the landscape is trained further along the optimisation path.

Inference (System-2 thinking, Sec. 4.2): more steps than trained, and/or $n$ random
initial candidates optimised in parallel, keeping per position the one of lowest final
energy (`think`).

`EnergyBasedTransformer(config)` wraps an unmodified HF base decoder built from any
Llama-style config (``AutoModel.from_config``: LlamaModel, Qwen2Model, ...) and follows
the HF causal-LM convention: ``forward(input_ids, labels=None)`` returns ``.logits``
(the last step's $\hat y_K$ at every position, for the next token) and ``.loss``.

Deviations from the paper and its code:

- ``step_space="logits"`` (an option; the default follows the official code) steps on
  the logits as the paper's equations read, not on the distribution.
- The candidate is embedded by the input embedding, $p\,W_{\mathrm{emb}}$ (the official
  ``vocab_to_embed_uses_prob_dist`` option); the official NLP scripts leave that option off
  and embed $p$ with a separate linear map $V \to d$.
- ``final_step_loss`` keeps the second-order graph of every step; the official
  ``truncate_mcmc`` takes the earlier steps' gradients first-order only.
- ``.loss`` is the training objective (mean CE over the steps) in ``train()`` mode and
  the final step's CE in ``eval()`` mode -- the validation number the paper reports.
- In ``eval()`` mode the initial candidates are a fixed, seeded draw (``eval_seed``),
  so evaluation is deterministic; the official code draws fresh noise every call.
- No step-index conditioning (the official "time_embed" EBT adds an embedding of the
  step); no gradient clamping, no label smoothing across steps, no contrastive term.
  The step size has no separate learning-rate multiplier (the official code uses one);
  $\alpha$ is clamped at 0 (the official code at $10^{-4}$).
- Random step counts draw one total count per batch, $K + U\{0..r\}$; the official code
  repeats each step a random number of times.
- Attention is the eager implementation: training differentiates through $\nabla_{\hat y} E$,
  which needs attention's second derivative.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PretrainedConfig


@dataclass(frozen=True)
class EBTConfig:
    steps: int = 2  # K, gradient steps on the candidate, trained through
    step_space: Literal["probabilities", "logits"] = "probabilities"  # what is differentiated and stepped on
    alpha: float = 500.0  # initial step size (official System-1 NLP script: 500; System-2: 5, fixed)
    learn_alpha: bool = True
    init_std: float = 1.0  # sigma_0 of the random initial logits
    detach: bool = True  # cut the graph between steps (official System-1 default); False backpropagates the whole unroll
    final_step_loss: bool = False  # train on the last step's CE only (the official System-2 "truncate_mcmc")
    langevin_std: float = 0.0  # sigma of the noise added before each step (training only)
    step_size_scale: float = 1.0  # s > 1: alpha ~ U[alpha/s, alpha*s] per position (training only)
    extra_steps: int = 0  # r > 0: each batch trains with K + U{0..r} steps
    replay_size: int = 0  # rows kept in the replay buffer; 0 turns it off
    replay_fraction: float = 0.5  # replayed rows added to a batch, as a share of its rows
    eval_seed: int = 0  # seed of the fixed initial candidates in eval() mode

    def __post_init__(self):
        if self.steps < 1 or self.extra_steps < 0 or self.step_size_scale < 1:
            raise ValueError("need steps >= 1, extra_steps >= 0 and step_size_scale >= 1")
        if self.step_space not in ("probabilities", "logits"):
            raise ValueError(f"step_space is 'probabilities' or 'logits', not {self.step_space!r}")


@dataclass
class EBTOutput:
    logits: torch.Tensor  # [B, T, V]: y_hat after the last step
    loss: torch.Tensor | None  # train(): the training objective; eval(): the last step's CE
    step_losses: list[torch.Tensor] = field(default_factory=list)  # CE after each step 1..K
    step_logits: list[torch.Tensor] = field(default_factory=list)  # y_hat_1..y_hat_K, [B, T, V] each
    energies: list[torch.Tensor] = field(default_factory=list)  # E(x, y_hat_i) before each step i, [B, T]


def candidate_mask(T: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[1, 1, 2T, 2T] additive mask: observed tokens causal; candidate t sees x_<=t and itself."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    allowed = torch.zeros(2 * T, 2 * T, dtype=torch.bool, device=device)
    allowed[:T, :T] = causal  # x_s attends x_<=s
    allowed[T:, :T] = causal  # candidate for x_{t+1} attends x_<=t
    allowed[T:, T:] = torch.eye(T, dtype=torch.bool, device=device)  # ... and itself, never another candidate
    mask = torch.zeros(2 * T, 2 * T, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class EnergyBasedTransformer(nn.Module):
    """An autoregressive EBT around an HF base decoder; HF-style ``forward(input_ids, labels=None)``."""

    def __init__(self, config: PretrainedConfig, ebt: EBTConfig = EBTConfig()):
        super().__init__()
        config = copy.deepcopy(config)
        config.use_cache = False
        self.config, self.ebt = config, ebt
        # eager attention: its second derivative exists on every backend, and it reads our additive mask as is
        self.decoder = AutoModel.from_config(config, attn_implementation="eager")
        self.energy_head = nn.Linear(config.hidden_size, 1, bias=False)
        nn.init.normal_(self.energy_head.weight, std=config.initializer_range)
        self.alpha = nn.Parameter(torch.tensor(float(ebt.alpha)), requires_grad=ebt.learn_alpha)
        self.replay: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (ids, labels, final logits) rows

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def get_output_embeddings(self) -> None:
        return None  # no LM head: predictions come from the energy's gradient

    def energy(self, input_ids: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        """E_theta(x_<=t, softmax(y_hat_{t+1})) at every t: [B, T] for ids [B, T] and candidate logits [B, T, V]."""
        return self.distribution_energy(input_ids, y_hat.softmax(-1))

    def distribution_energy(self, input_ids: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """E_theta(x_<=t, p_{t+1}) at every t: [B, T] for ids [B, T] and candidate distributions p [B, T, V]."""
        T = input_ids.shape[1]
        W = self.get_input_embeddings().weight  # [V, D]
        x = self.get_input_embeddings()(input_ids)
        candidate = p.to(W.dtype) @ W  # p W_emb, [B, T, D]
        positions = torch.cat([torch.arange(T), torch.arange(1, T + 1)]).to(input_ids.device)[None]  # candidate t sits at t+1
        h = self.decoder(inputs_embeds=torch.cat([x, candidate], 1), attention_mask=candidate_mask(T, x.dtype, x.device),
                         position_ids=positions, use_cache=False).last_hidden_state
        return self.energy_head(h[:, T:]).squeeze(-1)

    def energy_gradient(self, input_ids: torch.Tensor, v: torch.Tensor, create_graph: bool = False):
        """(E [B, T], grad_v sum_t E_t [B, T, V]) at the point the step moves: the distribution p in step_space
        "probabilities", the logits y_hat in "logits". `v` must require grad (or be computed from one that does)."""
        E = self.distribution_energy(input_ids, v) if self.ebt.step_space == "probabilities" else self.energy(input_ids, v)
        (grad,) = torch.autograd.grad(E.sum(), v, create_graph=create_graph)
        return E, grad

    def initial_logits(self, rows: int, T: int, dtype=torch.float32, candidates: int | None = None) -> torch.Tensor:
        """y_hat_0 ~ N(0, sigma_0^2): fresh in train() mode, a fixed seeded draw in eval() mode."""
        shape = (rows, T, self.config.vocab_size) if candidates is None else (candidates, rows, T, self.config.vocab_size)
        generator = None if self.training else torch.Generator().manual_seed(self.ebt.eval_seed)
        device = self.alpha.device
        return (torch.randn(shape, generator=generator) * self.ebt.init_std).to(device=device, dtype=dtype)

    def optimise(self, input_ids: torch.Tensor, y_hat: torch.Tensor, steps: int, alpha: torch.Tensor,
                 langevin_std: float = 0.0, create_graph: bool = False):
        """`steps` steps y_hat_{i+1} = v_i - alpha grad_v E(x, v_i), v_i = softmax(y_hat_i) (step_space "probabilities")
        or y_hat_i ("logits"): ([y_hat_1..y_hat_K], [E_0..E_{K-1}])."""
        ys, energies = [], []
        with torch.enable_grad():  # the steps need gradients even where the caller evaluates under no_grad
            for i in range(steps):
                if i == 0 or self.ebt.detach or not create_graph:
                    y_hat = y_hat.detach().requires_grad_()
                if langevin_std:
                    y_hat = y_hat + langevin_std * torch.randn_like(y_hat)
                v = y_hat.softmax(-1) if self.ebt.step_space == "probabilities" else y_hat  # noise enters before the softmax
                E, grad = self.energy_gradient(input_ids, v, create_graph=create_graph)
                y_hat = v - alpha * grad  # p - alpha grad_p E is the next step's logits, not renormalised
                if not create_graph:
                    y_hat, E = y_hat.detach(), E.detach()
                ys.append(y_hat)
                energies.append(E)
        return ys, energies

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, y_hat: torch.Tensor | None = None,
                **_) -> EBTOutput:
        ebt, training = self.ebt, self.training
        create_graph = training and torch.is_grad_enabled()
        B, T = input_ids.shape
        dtype = self.get_input_embeddings().weight.dtype
        y_hat = self.initial_logits(B, T, dtype) if y_hat is None else y_hat
        if training and ebt.replay_size and labels is not None and self.replay:
            input_ids, labels, y_hat = self._with_replayed_rows(input_ids, labels, y_hat)
        steps = ebt.steps + (int(torch.randint(ebt.extra_steps + 1, ())) if training and ebt.extra_steps else 0)
        alpha = self.alpha.clamp(min=0.0)
        if training and ebt.step_size_scale > 1:  # alpha ~ U[alpha/s, alpha*s], one per position
            s = ebt.step_size_scale
            alpha = alpha * (1 / s + torch.rand(*input_ids.shape, 1, device=input_ids.device, dtype=dtype) * (s - 1 / s))
        ys, energies = self.optimise(input_ids, y_hat, steps, alpha, ebt.langevin_std if training else 0.0, create_graph)
        step_losses, loss = [], None
        if labels is not None:
            # y_hat at t predicts x_{t+1}: HF's shift
            step_losses = [F.cross_entropy(y[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
                           for y in ys]
            if training and not ebt.final_step_loss:
                loss = torch.stack(step_losses).mean()  # (1/K) sum_i CE(y_hat_i, x_{t+1})
            else:
                loss = step_losses[-1]
            if training and ebt.replay_size:
                self._remember(input_ids[:B], labels[:B], ys[-1][:B])
        return EBTOutput(ys[-1][:B], loss, step_losses, [y[:B] for y in ys], [E[:B] for E in energies])

    def _with_replayed_rows(self, input_ids, labels, y_hat):
        """Append replayed rows (of the same length) that restart from the logits they ended with."""
        pool = [r for r in self.replay if r[0].shape[0] == input_ids.shape[1]]
        k = min(len(pool), max(1, int(self.ebt.replay_fraction * input_ids.shape[0])))
        if not pool:
            return input_ids, labels, y_hat
        picked = [pool[i] for i in torch.randperm(len(pool))[:k].tolist()]
        ids, lab, y = (torch.stack([r[j] for r in picked]) for j in range(3))
        return (torch.cat([input_ids, ids]), torch.cat([labels, lab]), torch.cat([y_hat, y.to(y_hat.dtype)]))

    def _remember(self, input_ids, labels, y_final):
        for row in zip(input_ids, labels, y_final.detach()):
            self.replay.append(row)
        del self.replay[:-self.ebt.replay_size]  # keep the newest replay_size rows


@torch.no_grad()
def think(model: EnergyBasedTransformer, input_ids: torch.Tensor, steps: int | None = None, candidates: int = 1,
          y_hat: torch.Tensor | None = None, langevin_std: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """System-2 prediction: `steps` gradient steps from `candidates` initial logits, keeping per position the lowest
    final energy. Returns (logits [B, T, V], energy [B, T] of the kept candidate). `y_hat`: [n, B, T, V] initial
    logits; by default the model's draw (fixed in eval() mode).
    """
    B, T = input_ids.shape
    steps = model.ebt.steps if steps is None else steps
    dtype = model.get_input_embeddings().weight.dtype
    y0 = model.initial_logits(B, T, dtype, candidates) if y_hat is None else y_hat
    n = y0.shape[0]
    ids = input_ids.repeat(n, 1)  # candidate-major: row c * B + b
    alpha = model.alpha.clamp(min=0.0)
    ys, _ = model.optimise(ids, y0.flatten(0, 1), steps, alpha, langevin_std, create_graph=False)
    final = ys[-1]
    E = model.energy(ids, final).view(n, B, T)  # energy of where each candidate ended
    best = E.argmin(0)  # [B, T]
    logits = final.view(n, B, T, -1).gather(0, best[None, ..., None].expand(1, B, T, final.shape[-1]))[0]
    return logits, E.gather(0, best[None])[0]


def energy_based_transformer(config: PretrainedConfig, **ebt) -> EnergyBasedTransformer:
    """An EBT from any Llama-style config: ``energy_based_transformer(config, steps=2, alpha=500.0)``."""
    return EnergyBasedTransformer(config, EBTConfig(**ebt))
