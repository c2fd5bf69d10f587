r"""The Unreasonable Ineffectiveness of the Deeper Layers (Gromov et al., arXiv:2403.17887).

Deep LLMs carry whole blocks of consecutive layers that barely change the residual
stream. The paper finds them with one number per block: the *angular distance*
between the residual stream entering layer $\ell$ and the one entering layer
$\ell + n$, read at the last token and averaged over calibration text,

$$ d\big(x^{(\ell)}, x^{(\ell+n)}\big) = \frac{1}{\pi} \arccos
   \frac{x^{(\ell)}_T \cdot x^{(\ell+n)}_T}{\lVert x^{(\ell)}_T \rVert \, \lVert x^{(\ell+n)}_T \rVert}
   \qquad \text{(paper, eq. 7)} $$

For a chosen block size $n$ it removes the layers $\ell^*, \dots, \ell^* + n - 1$ with
$\ell^* = \arg\min_\ell d(x^{(\ell)}, x^{(\ell+n)})$, then *heals* the damage with a
short parameter-efficient fine-tune. The paper's simpler alternative drops the
deepest layers just before the last one, $\ell^* = L - n - 1$, and heals the same way.

Implementation notes:

- The residual stream is read with forward hooks on the unmodified HF model (the
  input of layer 0, then every layer's output), so $x^{(L)}$ is the raw output of
  the last block, not the final-norm output that ``output_hidden_states`` returns
  as its last entry in most HF models. The angle is then the block's own effect.
- All $L(L+1)/2$ pairs $(\ell, \ell + n)$ come from *one* forward pass per batch:
  the hooks keep every layer's last-token state and a single Gram matrix gives
  every angle (`angular_distances`). The naive scheme runs one pass per $n$.
- The simple heuristic's indices are ambiguous in the paper ("layers L-n to L-1",
  but also "excluding the final layer" and "beginning at the penultimate layer");
  we follow the stated intent and keep the last layer: remove L-n-1 .. L-2.
- Calibration batches are token-id tensors ``[batch, T]`` or any mapping with
  ``input_ids`` and ``attention_mask`` (a tokenizer's ``BatchEncoding`` included).
- A block size n must satisfy 1 <= n <= L - 1: removing every layer leaves no model.
- Healing follows the paper's appendix: LoRA on the feed-forward (MLP) linear
  layers only (found generically: every linear layer of a decoder block outside its
  attention, so Llama ``mlp.*``, GPT-2 ``mlp.c_fc``/``c_proj``, OPT ``fc1``/``fc2``), alpha = rank, dropout 0.05, cosine schedule with warm-up, on the
  pre-training distribution. Deviations: plain LoRA through peft (bf16 autocast on
  CPU) instead of QLoRA, whose 4-bit base weights (bitsandbytes) only save GPU
  memory on 70B models and do not run on a CPU; and far fewer steps (the paper uses
  5,000 steps of 16 sequences), with the learning rate set by the caller.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from paperzoo.compression import Compressed, batch_tensors, check_token_ids, parameter_bits
from paperzoo.core.models import decoder_layers
from paperzoo.core.training import TrainConfig, train


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos_sim(a, b)) / pi along the last dimension, in [0, 1]."""
    cos = nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi


def check_block_size(n, num_layers: int) -> int:
    """n as an int, or a ValueError naming n and its range 1 .. L - 1 (removing every layer leaves no model)."""
    if num_layers < 2:
        raise ValueError(f"layer pruning needs a model with at least 2 decoder layers; this one has {num_layers}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= num_layers - 1:
        raise ValueError(f"n (layers to remove) must be an integer from 1 to {num_layers - 1} "
                         f"for a {num_layers}-layer model, got {n!r}")
    return int(n)


@torch.no_grad()
def residual_stream_at_last_token(model: nn.Module, input_ids: torch.Tensor,
                                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """States x^(0..L) of the last real token of each row: shape [L + 1, batch, d]."""
    _, layers = decoder_layers(model)
    check_token_ids(model, input_ids)
    states: list[torch.Tensor] = []

    def first(hidden):
        return hidden[0] if isinstance(hidden, tuple) else hidden

    def save_input(module, args, kwargs):
        states.append(first(args[0] if args else kwargs["hidden_states"]))

    def save_output(module, args, output):
        states.append(first(output))

    handles = [layers[0].register_forward_pre_hook(save_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(save_output) for layer in layers]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    stacked = torch.stack(states)  # [L + 1, batch, T, d]
    if attention_mask is None:
        last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1)
    else:  # right padding: the last real token; left padding: position T - 1
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)
    return stacked[:, torch.arange(input_ids.shape[0]), last.to(stacked.device)].float()


@torch.no_grad()
def angular_distances(model: nn.Module, batches: Iterable) -> torch.Tensor:
    """Mean angular distance between every pair of residual-stream depths.

    Returns D of shape [L + 1, L + 1] with D[l, l + n] = mean over calibration
    samples of d(x^(l), x^(l+n)): the score for removing layers l .. l+n-1.
    `batches` yields token-id tensors [batch, T] or mappings (a dict, a tokenizer's
    BatchEncoding) with 'input_ids' and optionally 'attention_mask'.
    """
    if isinstance(batches, Mapping):
        raise ValueError("batches must be an iterable of batches, e.g. [tokenizer(texts, return_tensors='pt')]; "
                         "got a single batch")
    model.eval()
    total, count = None, 0
    for batch in batches:
        ids, mask = batch_tensors(batch)
        x = residual_stream_at_last_token(model, ids, mask).double()  # [L+1, B, d]
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = torch.einsum("ibd,jbd->bij", x, x).clamp(-1.0, 1.0)  # every pair at once
        d = (torch.arccos(cos) / torch.pi).sum(0)
        total = d if total is None else total + d
        count += x.shape[1]
    if count == 0:
        raise ValueError("angular_distances needs at least one calibration batch")
    return total / count


def block_distances(D: torch.Tensor, n: int) -> torch.Tensor:
    """d(x^(l), x^(l+n)) for every start l = 0 .. L - n."""
    L = D.shape[0] - 1
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= L:
        raise ValueError(f"n must be an integer from 1 to {L} for a {L}-layer distance matrix, got {n!r}")
    return torch.stack([D[l, l + n] for l in range(L - n + 1)])


def most_redundant_block(D: torch.Tensor, n: int) -> int:
    """The paper's choice: the start l* of the n-layer block with the smallest angular distance."""
    return int(block_distances(D, n).argmin())


def deepest_block(num_layers: int, n: int) -> int:
    """The paper's simple heuristic: drop the n layers just before the last one."""
    return num_layers - check_block_size(n, num_layers) - 1


def drop_layers(model: nn.Module, start: int, n: int, inplace: bool = False) -> nn.Module:
    """Remove decoder layers start .. start+n-1 and keep config and layer indices consistent.

    The result saves with ``save_pretrained`` and reloads as a model with
    ``num_hidden_layers`` = L - n. Attention modules get their ``layer_idx``
    renumbered so that KV caching addresses the right slot.
    """
    model = model if inplace else copy.deepcopy(model)
    path, layers = decoder_layers(model)
    L = len(layers)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (start, n)):
        raise ValueError(f"start and n must be integers, got start={start!r}, n={n!r}")
    if n < 0 or start < 0 or start + n > L or n > L - 1:
        raise ValueError(f"cannot drop layers {start}..{start + n - 1} from a {L}-layer model "
                         f"(need 0 <= n <= {L - 1} and 0 <= start <= L - n)")
    kept = [layer for i, layer in enumerate(layers) if not start <= i < start + n]
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    setattr(parent, path.rsplit(".", 1)[1], nn.ModuleList(kept))
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = L - n
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [t for i, t in enumerate(config.layer_types) if not start <= i < start + n]
    return model


def prune(model: nn.Module, calibration: Iterable, n: int) -> Compressed:
    """Angular-distance layer pruning: drop the n-layer block with the smallest distance.

    `calibration` is an iterable of batches (tensors or tokenizer outputs); 1 <= n <= L - 1.
    """
    n = check_block_size(n, len(decoder_layers(model)[1]))
    D = angular_distances(model, calibration)
    start = most_redundant_block(D, n)
    L = D.shape[0] - 1
    pruned = drop_layers(model, start, n)
    return Compressed(pruned, {
        "method": "angular-distance layer pruning (2403.17887)",
        "removed_layers": list(range(start, start + n)),
        "layers_before": L,
        "layers_after": L - n,
        "block_distance": float(D[start, start + n]),
        "parameters_before": sum(p.numel() for p in model.parameters()),
        "parameters_after": sum(p.numel() for p in pruned.parameters()),
        "size_ratio": parameter_bits(pruned) / parameter_bits(model),
        "compute_ratio": (L - n) / L,  # per-token matmuls in the decoder blocks (the head is unchanged)
    })


ATTENTION_NAMES = ("attn", "attention")


def feed_forward_modules(model: nn.Module) -> list[str]:
    """Full names of the linear layers of each decoder block outside its attention: the feed-forward layers.

    Generic over layouts: a ``mlp``/``feed_forward`` sub-module (Llama, GPT-2, NeoX, Phi) or
    linear layers directly in the block (OPT's ``fc1``/``fc2``).
    """
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    path, layers = decoder_layers(model)
    names = [f"{path}.{i}.{name}" for i, layer in enumerate(layers) for name, module in layer.named_modules()
             if name and isinstance(module, (nn.Linear, Conv1D))
             and not any(a in part for part in name.split(".") for a in ATTENTION_NAMES)]
    if not names:
        raise ValueError(f"found no linear layers outside attention in the decoder blocks of {type(model).__name__}; "
                         "pass target_modules")
    return names


def heal(model: nn.Module, blocks: torch.Tensor, config: TrainConfig, rank: int = 8, seed: int = 0,
         target_modules: list[str] | str | None = None) -> nn.Module:
    """Heal a pruned model with LoRA (alpha = rank, dropout 0.05) on its feed-forward layers, merged back.

    Returns a plain model of the same class, the LoRA update folded into its weights.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    torch.manual_seed(seed)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=target_modules or feed_forward_modules(model)))
    train(lora, blocks, config, desc=f"healing with LoRA r={rank}", seed=seed)
    return lora.merge_and_unload().eval()
