r"""The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks
(Frankle & Carbin, arXiv:1803.03635, ICLR 2019).

Pruning removes most of a trained network's weights without hurting it, yet the
pruned architecture trained from a fresh initialisation learns slower and ends up
worse. The paper's hypothesis: a dense, randomly initialised network
$f(x; \theta_0)$ contains a subnetwork $f(x; m \odot \theta_0)$, a *winning ticket*,
that trained in isolation reaches at least the dense network's test accuracy in at
most as many iterations (paper, §1):

$$ \exists\, m \in \{0, 1\}^{|\theta|}:\quad j' \le j,\quad a' \ge a,\quad \lVert m \rVert_0 \ll |\theta| . $$

What makes it a winning ticket is the pairing of the mask with the *original*
initial values: the same mask with values drawn afresh,
$f(x; m \odot \theta_0')$, $\theta_0' \sim \mathcal{D}_\theta$, loses that advantage.
Tickets are found by *iterative magnitude pruning* (IMP, paper §1 and §2):

1. initialise $f(x; \theta_0)$, $m = 1^{|\theta|}$;
2. train $f(x; m \odot \theta)$ for $j$ iterations, reaching $\theta_j$;
3. in each layer, prune the fraction $p$ of the *surviving* weights with the
   smallest $|\theta_j|$, updating $m$;
4. reset the surviving weights to $\theta_0$ and go to 2; after $n$ rounds a
   fraction $\approx (1 - p)^n$ of each layer remains.

*Late rewinding* (Frankle et al., "Stabilizing the Lottery Ticket Hypothesis",
arXiv:1903.01611, the follow-up that makes IMP work on deep networks) resets to
$\theta_k$, the dense network's weights after $k$ training iterations, instead of
$\theta_0$, and trains each pruned network from iteration $k$. `rewind_to=k` selects
it; `rewind_to=0` is the original paper.

The model is any plain PyTorch module. Masks are held by ``torch.nn.utils.prune``
(a ``weight_mask`` buffer and a forward pre-hook computing
``weight = weight_orig * weight_mask``), so pruned weights are zero in every forward
pass and receive zero gradient; the per-layer magnitude selection among surviving
weights is ``prune.l1_unstructured``, which counts its ``amount`` among the weights
not yet pruned. It ranks by ``module.weight`` as the last forward pass computed it,
one optimiser step stale after training, so the current values are passed as
importance scores.

Implementation notes and deviations:

- Prunable layers are the weights of every ``nn.Linear`` and ``nn.ConvNd`` in module
  order; biases are never pruned (as in the paper and its official code). The last
  prunable layer is the output layer and is pruned at half the rate: the paper's
  fully-connected rate is 20% with 10% for the output layer (Lenet appendix; the
  authors' code, google-research/lottery-ticket-hypothesis ``mnist_fc/constants.py``,
  has ``PRUNE_PERCENTS = {layer0: .2, layer1: .2, layer2: .1}``).
- Each round prunes exactly ``round(p * surviving)`` weights of a layer (torch's
  rule). The authors' code prunes every weight with magnitude at most the
  ``round(p * surviving)``-th smallest, one weight more; the difference is
  immaterial and ties are measure-zero for trained weights.
- Rewinding resets *every* parameter and buffer to $\theta_0$ (or $\theta_k$),
  biases included, as in the authors' code, which restores the whole network.
- With late rewinding, $\theta_k$ is taken from a separate run of ``train_fn`` that
  stops at iteration $k$; for a seeded, deterministic ``train_fn`` that is the same
  point on the dense trajectory. Pruned networks then train from iteration $k$ to
  the end of the schedule (with a fresh optimiser, as in facebookresearch/open_lth).
- Random re-initialisation samples $\theta_0'$ with the model's own initialiser
  (``init_fn``, or each module's ``reset_parameters``). The paper draws from the
  same distribution as $\theta_0$, so pass the initialiser the model was built with.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from paperzoo.compression import Compressed, parameter_bits

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Mask = dict[str, torch.Tensor]  # module name -> bool tensor shaped like its weight; True = kept

# train_fn(model, start, stop) trains `model` in place from iteration `start` to iteration
# `stop` of its schedule (None: to the end) and returns whatever record it likes.
TrainFn = Callable[[nn.Module, int, "int | None"], object]


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_rate(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}")


def prunable_layers(model: nn.Module) -> list[str]:
    """Names of the Linear and Conv modules whose weights IMP prunes, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, PRUNABLE)]


def pruning_rates(model: nn.Module, rate: float = 0.2, output_rate: float | None = None,
                  layers: list[str] | None = None) -> dict[str, float]:
    """Per-layer rate p: `rate` everywhere, `output_rate` (default rate / 2) on the last layer."""
    layers = prunable_layers(model) if layers is None else list(layers)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layers to prune; pass layers")
    known = dict(model.named_modules())
    missing = [name for name in layers if not isinstance(known.get(name), PRUNABLE)]
    if missing:
        raise ValueError(f"not Linear or Conv modules of the model: {', '.join(missing)}")
    _check_rate("rate", rate)
    output_rate = rate / 2 if output_rate is None else output_rate
    _check_rate("output_rate", output_rate)
    return {name: (output_rate if i == len(layers) - 1 else rate) for i, name in enumerate(layers)}


def is_masked(module: nn.Module) -> bool:
    return hasattr(module, "weight_mask")


def _refresh(module: nn.Module) -> None:
    """Recompute a masked layer's ``weight`` now rather than at the next forward pass."""
    with torch.no_grad():
        module.weight = module.weight_orig * module.weight_mask


def copy_network(model: nn.Module) -> nn.Module:
    """A deep copy that also works after a forward pass (a masked ``weight`` is then not a graph leaf)."""
    for module in model.modules():
        if is_masked(module):
            _refresh(module)
    return copy.deepcopy(model)


def current_mask(model: nn.Module, layers: list[str] | None = None) -> Mask:
    """The mask each layer carries now (all True for a layer without one)."""
    out = {}
    for name in prunable_layers(model) if layers is None else layers:
        module = model.get_submodule(name)
        out[name] = module.weight_mask.bool().clone() if is_masked(module) else torch.ones_like(module.weight, dtype=torch.bool)
    return out


def apply_mask(model: nn.Module, mask: Mask) -> nn.Module:
    """Fix `mask` on `model` (in place): masked weights read as zero and get no gradient.

    A layer that already carries a mask has it replaced, not combined.
    """
    for name, m in mask.items():
        module = model.get_submodule(name)
        if m.shape != module.weight.shape:
            raise ValueError(f"mask for {name} has shape {tuple(m.shape)}, its weight {tuple(module.weight.shape)}")
        if is_masked(module):
            module.weight_mask.copy_(m.to(module.weight_mask.dtype))
            _refresh(module)
        else:
            torch_prune.custom_from_mask(module, "weight", m.to(module.weight.device))
    return model


def remove_masks(model: nn.Module) -> nn.Module:
    """Make every mask permanent (in place): plain ``weight`` parameters with zeros where pruned."""
    for module in model.modules():
        if is_masked(module):
            torch_prune.remove(module, "weight")
    return model


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the state dict under unmasked names ('x.weight', never 'x.weight_orig'); no masks.

    For a masked layer the value is the underlying ``weight_orig``, pruned positions included.
    """
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("_mask"):
            continue
        out[key.removesuffix("_orig")] = value.detach().clone()
    return out


@torch.no_grad()
def rewind(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Reset every parameter and buffer to `state` (a `dense_state`) in place, keeping the masks."""
    for key, value in state.items():
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        target = getattr(module, f"{attr}_orig", None)
        target = getattr(module, attr) if target is None else target
        target.copy_(value)
        if is_masked(module):
            _refresh(module)
    return model


@torch.no_grad()
def magnitude_prune(model: nn.Module, rates: dict[str, float]) -> Mask:
    """Prune, in each layer, the fraction p of its surviving weights with the smallest |w| (paper, step 3).

    Exactly round(p * surviving) weights go per layer; already-pruned weights stay pruned.
    Returns the new mask (also fixed on `model`).
    """
    known = dict(model.named_modules())
    for name, p in rates.items():
        if not isinstance(known.get(name), PRUNABLE):
            raise ValueError(f"rates: {name!r} is not a Linear or Conv module of the model")
        _check_rate(f"rates[{name!r}]", p)
    for name, p in rates.items():
        module = model.get_submodule(name)
        # torch ranks by `module.weight`, which the pre-hook last computed in a forward pass: one
        # optimiser step stale after training. Rank by the current values instead.
        scores = (module.weight_orig * module.weight_mask if is_masked(module) else module.weight).detach()
        torch_prune.l1_unstructured(module, "weight", amount=float(p), importance_scores=scores)
    return current_mask(model, list(rates))


def remaining_fraction(mask: Mask) -> float:
    """P_m: the fraction of prunable weights the mask keeps."""
    total = sum(m.numel() for m in mask.values())
    if total == 0:
        raise ValueError("mask must hold at least one layer with at least one weight")
    return sum(int(m.sum()) for m in mask.values()) / total


@dataclass
class Ticket:
    """A winning ticket: the mask m and the weights it is rewound to (theta_0, or theta_k with late rewinding).

    `history` has one entry per IMP round r = 0 .. rounds - 1: the mask trained in that round
    (round 0 is the dense network), its remaining fraction, and what `train_fn` returned.
    """

    mask: Mask
    init_state: dict[str, torch.Tensor]
    rewind_to: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def remaining(self) -> float:
        return remaining_fraction(self.mask)

    def network(self, model: nn.Module) -> nn.Module:
        """f(x; m ⊙ θ_k): a copy of `model` rewound to the ticket's weights, with its mask fixed."""
        net = copy_network(model)
        apply_mask(net, self.mask)
        return rewind(net, self.init_state)


def _check_unmasked(model: nn.Module) -> None:
    if any(is_masked(m) for m in model.modules()):
        raise ValueError("the model already carries torch.nn.utils.prune masks; pass the dense, unpruned network")


def find_winning_ticket(model: nn.Module, train_fn: TrainFn, rounds: int, rate: float = 0.2,
                        output_rate: float | None = None, rewind_to: int = 0,
                        layers: list[str] | None = None) -> Ticket:
    """Iterative magnitude pruning with rewinding (paper, §1 steps 1-4): `rounds` of train, prune, rewind.

    `model` is the dense network at its initialisation θ_0 and is left untouched.
    Round 0 trains the dense network from iteration 0; every later round trains the pruned
    network from iteration `rewind_to` (k) starting at θ_k. Each round then prunes the fraction
    `rate` of every layer's surviving weights (`output_rate`, default rate / 2, for the last
    layer) and rewinds. The returned ticket's mask keeps about (1 - rate)^rounds of each layer
    and has not been trained yet: train `ticket.network(model)` from iteration `rewind_to`.
    """
    _check_int("rounds", rounds, 0)
    _check_int("rewind_to (an iteration)", rewind_to, 0)
    if not callable(train_fn):
        raise ValueError(f"train_fn must be callable as train_fn(model, start, stop), got {type(train_fn).__name__}")
    _check_unmasked(model)
    rates = pruning_rates(model, rate, output_rate, layers)
    net = copy.deepcopy(model)
    theta_k = dense_state(net)
    if rewind_to > 0:  # late rewinding: θ_k from the dense run stopped at iteration k
        probe = copy.deepcopy(model)
        train_fn(probe, 0, rewind_to)
        theta_k = dense_state(probe)
    apply_mask(net, {name: torch.ones_like(net.get_submodule(name).weight, dtype=torch.bool) for name in rates})
    history = []
    for r in range(rounds):
        mask = current_mask(net, list(rates))
        record = train_fn(net, 0 if r == 0 else rewind_to, None)
        history.append({"round": r, "remaining": remaining_fraction(mask), "mask": mask, "train": record})
        magnitude_prune(net, rates)
        rewind(net, theta_k)
    return Ticket(current_mask(net, list(rates)), theta_k, rewind_to, history)


def random_reinit(model: nn.Module, mask: Mask, init_fn: Callable[[nn.Module], None] | None = None,
                  seed: int = 0) -> nn.Module:
    """f(x; m ⊙ θ_0'), θ_0' ~ D_θ: a copy of `model` with fresh random values and the same mask.

    `init_fn(model)` re-initialises a dense model in place; by default every module's own
    ``reset_parameters``. Pass the initialiser the model was built with, so that θ_0' comes
    from the same distribution as θ_0 (the paper's control).
    """
    _check_int("seed", seed, 0)
    if init_fn is not None and not callable(init_fn):
        raise ValueError(f"init_fn must be callable as init_fn(model), got {type(init_fn).__name__}")
    known = dict(model.named_modules())
    for name, m in mask.items():
        if not isinstance(known.get(name), PRUNABLE) or m.shape != known[name].weight.shape:
            raise ValueError(f"mask[{name!r}] must be shaped like the weight of a Linear or Conv module of the model")
    net = remove_masks(copy_network(model))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if init_fn is not None:
            init_fn(net)
        else:
            for module in net.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return apply_mask(net, mask)


def early_stop_iteration(iterations: list[int], val_losses: list[float]) -> int:
    """The paper's speed measure: the iteration with the lowest validation loss (the first one on ties)."""
    if len(iterations) != len(val_losses) or not iterations:
        raise ValueError(f"iterations and val_losses must have the same length, at least 1; got "
                         f"{len(iterations)} and {len(val_losses)}")
    best = min(range(len(val_losses)), key=lambda i: (val_losses[i], i))
    return int(iterations[best])


def sparsity_report(model: nn.Module, original: nn.Module) -> dict:
    """Remaining fraction of nonzero parameters and size ratio, counting only nonzero values.

    ``size_ratio`` is the bits of the nonzero parameters over the bits of all the original's
    parameters; it ignores the cost of storing sparse indices.
    """
    params = list(model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in params)
    total = sum(p.numel() for p in params)
    nonzero_bits = sum(int((p != 0).sum()) * p.element_size() * 8 for p in params)
    return {
        "nonzero_parameters": nonzero,
        "parameters": total,
        "remaining": nonzero / total,
        "sparsity": 1 - nonzero / total,
        "size_ratio": nonzero_bits / parameter_bits(original),
    }


def prune(model: nn.Module, train_fn: TrainFn, rounds: int, rate: float = 0.2, output_rate: float | None = None,
          rewind_to: int = 0, layers: list[str] | None = None) -> Compressed:
    """IMP to a winning ticket, then the ticket trained with `train_fn`: the family's Compressed.

    The returned model is a plain module (masks made permanent, zeros in the weights).
    """
    ticket = find_winning_ticket(model, train_fn, rounds, rate, output_rate, rewind_to, layers)
    net = ticket.network(model)
    train_fn(net, rewind_to, None)
    remove_masks(net)
    return Compressed(net, {
        "method": "lottery ticket: iterative magnitude pruning with rewinding (1803.03635)",
        "rounds": rounds,
        "rewind_to": rewind_to,
        "weights_remaining": ticket.remaining,  # P_m over the prunable weights
        **sparsity_report(net, model),
    })
