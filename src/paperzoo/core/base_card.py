"""The base LM's card: the figures a compression paper needs before it judges (issue 10, B).

A quantisation or pruning verdict on a model that barely reacts to damage measures
noise. So the card of every cached base LM records, beside its validation figures:

- **round-to-nearest sensitivity**: validation perplexity after min-max, asymmetric,
  group-wise rounding (group 64, every decoder-block linear) at 2, 3 and 4 bits
  (`paperzoo.compression.efficient_qat.rtn`, the RTN baseline of EfficientQAT);
- **outliers per layer**: the largest activation of each block's output (the residual
  stream, with its ratio to the median magnitude, where massive activations show), the
  largest input to each feed-forward down-projection (where super activations appear),
  and the largest weight of each block with its ratio to the block's weight RMS;
- the training throughput: tokens/s and model-FLOPs utilisation against a bf16 matmul
  peak measured in the same process (PaLM's 6N + 12 L d T FLOPs per token).

`judge` holds the one target issue 10 sets for the `small` base LM: validation
perplexity at most 110 (the v1 model reached 170).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from paperzoo.core.evaluation import evaluate

RTN_BITS = (2, 3, 4)
RTN_GROUP = 64
TARGETS = {"small": {"validation perplexity": "<= 110"}}


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """bf16 matmul FLOP/s of this machine now: the best of `repeats` n x n x n products."""
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """PaLM appendix B: 6 N (weights outside the input embedding) + 12 L d T (attention scores and values)."""
    config = model.config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len


@torch.no_grad()
def outliers(model: nn.Module, blocks: torch.Tensor) -> list[dict]:
    """Per decoder block: the largest |activation| of its output and of its down-projection's input, and its largest |weight|."""
    from paperzoo.core.models import decoder_layers

    _, layers = decoder_layers(model)
    outputs: dict[int, torch.Tensor] = {}
    down_inputs: dict[int, float] = {}
    hooks = []
    for i, layer in enumerate(layers):
        # The block's own output: HF's last `hidden_states` entry is taken after the final norm.
        def keep_output(module, args, output, i=i):
            outputs[i] = output[0] if isinstance(output, tuple) else output
        hooks.append(layer.register_forward_hook(keep_output))
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if isinstance(down, nn.Linear):
            def record(module, args, i=i):
                down_inputs[i] = max(down_inputs.get(i, 0.0), args[0].abs().max().item())
            hooks.append(down.register_forward_pre_hook(record))
    try:
        model(input_ids=blocks)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for i, layer in enumerate(layers):
        magnitude = outputs[i].abs().float()
        weights = torch.cat([p.detach().float().flatten() for p in layer.parameters() if p.ndim == 2])
        rows.append({"layer": i, "activation_max": magnitude.max().item(),
                     "activation_max_over_median": (magnitude.max() / magnitude.median().clamp_min(1e-12)).item(),
                     "down_proj_input_max": down_inputs.get(i),
                     "weight_max": weights.abs().max().item(),
                     "weight_max_over_rms": (weights.abs().max() / weights.pow(2).mean().sqrt()).item()})
    return rows


def rtn_perplexities(model: nn.Module, val_blocks: torch.Tensor, bits=RTN_BITS, group_size: int = RTN_GROUP) -> dict:
    """Validation perplexity after round-to-nearest at each bit width (None where the group does not divide a width)."""
    from paperzoo.compression.efficient_qat import rtn

    out = {}
    for b in bits:
        try:
            quantized = rtn(model, b, group_size).model
        except ValueError:
            out[f"{b}-bit"] = None
            continue
        out[f"{b}-bit"] = evaluate(quantized, val_blocks)["perplexity"]
    return out


def judge(scale: str, val_perplexity: float) -> dict:
    targets = TARGETS.get(scale, {})
    if not targets:
        return {}
    limit = float(targets["validation perplexity"].removeprefix("<= "))
    return {"validation perplexity": {"value": round(val_perplexity, 1), "target": targets["validation perplexity"],
                                      "pass": val_perplexity <= limit}}


def card(model: nn.Module, val_blocks: torch.Tensor, history: dict, scale: str, peak: float | None,
         outlier_rows: int = 8) -> dict:
    """The card kept with a cached base LM: curve, throughput, RTN sensitivity, outliers, targets.

    `peak` is the bf16 matmul FLOP/s measured in the training process (None: no MFU, e.g. on a GPU).
    """
    model = model.cpu().eval()
    val = history["val"]
    seq_len = val_blocks.shape[1]
    achieved = history["tokens_per_second"] * flops_per_token(model, seq_len)
    return {
        "validation_curve": [{"step": v["step"], "perplexity": round(v["perplexity"], 2)} for v in val],
        "tokens_per_second": round(history["tokens_per_second"]),
        "matmul_peak_gflops": None if peak is None else round(peak / 1e9, 1),
        "mfu": None if peak is None else round(achieved / peak, 3),
        "threads": torch.get_num_threads(),
        "rtn_perplexity": {k: (None if v is None else round(v, 2))
                           for k, v in rtn_perplexities(model, val_blocks).items()},
        "rtn_group_size": RTN_GROUP,
        "outliers": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
                     for row in outliers(model, val_blocks[:outlier_rows])],
        "targets": judge(scale, val[-1]["perplexity"]),
    }
