r"""EfficientQAT: Efficient Quantization-Aware Training for Large Language Models
(Chen, Shao, Xu, Wang, Gao, Zhang, Luo; arXiv:2407.11062).

Quantization-aware training gives the best low-bit LLMs but trains the whole model
end to end, which is out of reach for 70B parameters. EfficientQAT splits it in two.
*Block-AP* trains **all** parameters of one transformer block at a time -- its
weights and its quantisation parameters -- so that the fake-quantised block
reproduces the full-precision block's output; blocks are done in order, and each
one is frozen to integers before the next. *E2E-QP* then keeps those integers (and
the zero points) fixed and trains **only the step sizes** end to end on the
language-model loss, which is cheap (about 1.6% of the parameters) and lets the
blocks adjust to one another.

The quantiser is uniform, asymmetric and group-wise: every run of $g$ consecutive
input weights of a row has its own step size $s$ and zero point $z$. With $N$ bits,

$$ W_{int} = \mathrm{clamp}\big(\lfloor W / s \rceil + z,\; 0,\; 2^N - 1\big) \qquad \text{(paper, eq. 1)} $$
$$ \widehat W = (W_{int} - z)\, s \qquad \text{(paper, eq. 2)} $$

and the rounding $\lfloor\cdot\rceil$ passes gradients straight through (STE), so in
Block-AP $\partial \widehat W / \partial W = 1$ inside the clamp range, and $s$ gets
the LSQ-style gradient $\lfloor W/s \rceil - W/s$ (or $W_{int} - z$ where clamped).
$s$ and $z$ start from the min-max ("round-to-nearest", RTN) values
$s = (\max W - \min W)/(2^N - 1)$, $z = \lfloor -\min W / s \rceil$ per group.

Block-AP minimises, for block $b$ with quantised input $X^q_b$ and full-precision
input $X^{fp}_b$ (paper, Sec. 3.2),

$$ \min_{W, s, z}\; \big\lVert f_b(X^{fp}_b; W^{fp}) - f_b(X^q_b; \widehat W(W, s, z)) \big\rVert_2^2 , $$

where $X^{fp}_{b+1} = f_b(X^{fp}_b)$ runs through the untouched model and
$X^q_{b+1}$ through the blocks already quantised. This follows the official code
(OpenGVLab/EfficientQAT, ``quantize/block_ap.py``): the target is the fp model's
own block output, the input is what the quantised model will really feed the block.
E2E-QP then minimises the next-token cross-entropy over $s$ alone, with $W_{int}$ and
$z$ frozen (paper, Sec. 3.3): $\widehat W = (W_{int} - z)\,s$ with
$\partial \widehat W / \partial s = W_{int} - z$.

Implementation notes (checked against the official code):

- The quantisers are attached with ``torch.nn.utils.parametrize`` to the ``weight``
  of every ``nn.Linear`` (and GPT-2 ``Conv1D``) inside the decoder blocks of an
  unmodified HF model; embeddings and the LM head stay in full precision, as in the
  paper. The returned model holds the dequantised weights $\widehat W$ in its
  ordinary ``weight`` tensors (the parametrisations are removed), so it saves and
  loads as a plain HF model; the report carries what packing would cost.
- Block inputs are captured with forward pre-hooks on every decoder layer (the
  hidden state and the keyword arguments, e.g. rotary embeddings and masks, each
  layer was called with), so any HF decoder can be trained one block at a time.
- Official hyper-parameters: Block-AP uses AdamW without weight decay, learning
  rate $10^{-4}$ for $s, z$ and $2\cdot10^{-5}$ (2-bit) or $10^{-5}$ (3/4-bit) for
  the weights, cosine decay to lr/20, 2 epochs over 4096 samples of 2048 tokens in
  batches of 2, no gradient clipping; all block parameters are trained (norms too;
  the official code keeps linear biases fixed, Llama has none -- we train them).
  E2E-QP uses AdamW (no weight decay) on the step sizes only, lr $2\cdot10^{-5}$
  (2-bit) or $10^{-5}$ (3/4-bit), cosine schedule with 3% warm-up, gradient-norm
  clip 0.3, one epoch of 4096 x 4096 tokens in batches of 32 (128 steps). The
  defaults below are these values; experiments at other scales pass their own.
- Deviation: the official quantiser floors the step size at $10^{-4}$ and skips
  quantisation entirely at 16 bits (both fp16 safeguards). We compute in fp32 and
  floor $s$ at $10^{-8}$ only, so a 16-bit quantiser really quantises (finely) and
  low-magnitude groups are not distorted by the floor.
- Deviation: the official code runs Block-AP under fp16 autocast; we use bf16
  autocast where the CPU/GPU has it (the same precision class as ``core.training``),
  else fp32. The quantiser itself always runs in fp32.
- The integers are kept as ``int32`` buffers during E2E-QP (for simplicity, not
  packed); ``size_ratio`` counts $N$ bits per weight plus a 16-bit $s$ and an $N$-bit
  $z$ per group, the storage format of the official packed checkpoints.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from paperzoo.compression import Compressed, batch_tensors, check_token_ids, parameter_bits
from paperzoo.core.models import decoder_layers
from paperzoo.core.training import TrainConfig, bf16_autocast_available, train

S_MIN = 1e-8  # floor on the step size (the official 1e-4 is an fp16 safeguard, see the docstring)
SCALE_BITS = 16  # a packed checkpoint stores each group's s in fp16 ...
# ... and each group's z in N bits, like the weights.


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass; identity gradient (straight-through estimator)."""
    return x + (x.round() - x).detach()


def clamp_ste(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Clamp in the forward pass; identity gradient."""
    return x + (x.clamp(low, high) - x).detach()


def _groups(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in / g, g]: runs of g consecutive input weights of each row."""
    out_features, in_features = W.shape
    if not _is_int(group_size) or group_size < 1 or in_features % group_size:
        raise ValueError(f"group_size must be a positive integer dividing the {in_features} input features, "
                         f"got {group_size!r}")
    return W.reshape(out_features, in_features // group_size, group_size)


def min_max_init(W: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN step sizes and zero points of W [out, in]: s, z of shape [out, in / g, 1]."""
    _check_bits(bits)
    Wg = _groups(W.detach().float(), group_size)
    w_min, w_max = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    s = ((w_max - w_min) / (2**bits - 1)).clamp_min(S_MIN)
    z = (-w_min / s).round()
    return s, z


def quantize(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """W_int = clamp(round(W / s) + z, 0, 2^N - 1) per group (paper, eq. 1): same shape as W."""
    q_max = 2**bits - 1
    W_int = (round_ste(_groups(W, group_size) / clamp_ste(s, S_MIN, math.inf))
             + clamp_ste(round_ste(z), 0, q_max)).clamp(0, q_max)  # a plain clamp: no gradient where clipped
    return W_int.reshape(W.shape)


def dequantize(W_int: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_hat = (W_int - z) s per group (paper, eq. 2): same shape as W_int."""
    return ((_groups(W_int, group_size) - z) * s).reshape(W_int.shape)


def fake_quantize(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """W_hat = (clamp(round(W/s) + z, 0, 2^N - 1) - z) s, differentiable in W, s and z through the STE."""
    _check_bits(bits)
    q_max = 2**bits - 1
    s = clamp_ste(s, S_MIN, math.inf)
    z = clamp_ste(round_ste(z), 0, q_max)
    return dequantize(quantize(W, s, z, bits, group_size), s, z, group_size)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 2..16, got {bits!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_group_size(model: nn.Module, group_size: int) -> None:
    """group_size must be a positive integer dividing the input width of every linear in the decoder blocks."""
    if not _is_int(group_size) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    _, layers = decoder_layers(model)
    widths = sorted({(m.weight.shape[1] if isinstance(m, nn.Linear) else m.weight.shape[0])
                     for layer in layers for m in quantizable_linears(layer).values()})
    bad = [w for w in widths if w % group_size]
    if bad:
        raise ValueError(f"group_size {group_size} must divide every linear layer's input features "
                         f"({', '.join(map(str, widths))}); it does not divide {bad[0]}")


def _calibration_ids(model: nn.Module, calibration) -> torch.Tensor:
    """[N, T] token ids from a tensor or a mapping with 'input_ids' (a tokenizer's output); no padding allowed."""
    try:
        ids, mask = batch_tensors(calibration)
    except ValueError as e:
        raise ValueError(f"calibration: {e}") from None
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("calibration must not be padded (its attention_mask has zeros): pass equal-length "
                         "blocks of token ids, e.g. cut from concatenated documents")
    _check_token_blocks("calibration", ids.long())
    check_token_ids(model, ids)
    _check_positions(model, "each calibration sequence", ids.shape[1])
    return ids.long()


def _check_positions(model: nn.Module, name: str, length: int) -> None:
    from paperzoo.core.sampling import max_positions  # the one reading of a model's position limit

    limit = max_positions(model)
    if limit is not None and length > limit:
        raise ValueError(f"{name} is {length} tokens long; the model takes at most {limit} positions")


def _check_token_blocks(name: str, blocks, min_len: int = 1) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.ndim != 2 or blocks.dtype != torch.long \
            or len(blocks) == 0 or blocks.shape[1] < min_len:
        shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"{name} must be a non-empty [N, T] tensor of token ids (int64) with T >= {min_len}, "
                         f"got {shape}")


class GroupQuantizer(nn.Module):
    """Block-AP parametrisation of a weight: W -> W_hat with trainable s and z (and W itself).

    ``transposed`` is for GPT-2's Conv1D, whose weight is stored [in, out]; groups
    always run along the input dimension.
    """

    def __init__(self, W: torch.Tensor, bits: int, group_size: int, transposed: bool = False):
        super().__init__()
        _check_bits(bits)
        self.bits, self.group_size, self.transposed = bits, group_size, transposed
        s, z = min_max_init(W.T if transposed else W, bits, group_size)
        self.s = nn.Parameter(s)  # [out, in / g, 1]
        self.z = nn.Parameter(z)  # [out, in / g, 1], integer-valued after rounding

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        W = W.T if self.transposed else W
        W_hat = fake_quantize(W.float(), self.s, self.z, self.bits, self.group_size).to(W.dtype)
        return W_hat.T if self.transposed else W_hat

    @torch.no_grad()
    def freeze(self, W: torch.Tensor) -> IntegerWeight:
        """The E2E-QP parametrisation: W_int and z fixed at their current values, s trainable."""
        W = (W.T if self.transposed else W).float()
        z = self.z.round().clamp(0, 2**self.bits - 1)
        s = self.s.clamp_min(S_MIN)
        W_int = quantize(W, s, z, self.bits, self.group_size)
        return IntegerWeight(W_int, s, z, self.bits, self.group_size, self.transposed)


class IntegerWeight(nn.Module):
    """E2E-QP parametrisation: W_hat = (W_int - z) s with W_int and z frozen; only s trains.

    The module's original weight is ignored (and frozen) once this is attached.
    """

    def __init__(self, W_int: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, group_size: int,
                 transposed: bool = False):
        super().__init__()
        self.bits, self.group_size, self.transposed = bits, group_size, transposed
        self.register_buffer("W_int", W_int.to(torch.int32))  # [out, in], values in 0 .. 2^N - 1
        self.register_buffer("z", z.clone())  # [out, in / g, 1]
        self.s = nn.Parameter(s.clone())  # [out, in / g, 1]

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        W_hat = dequantize(self.W_int.float(), self.s, self.z, self.group_size).to(W.dtype)
        return W_hat.T if self.transposed else W_hat


def quantizable_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of a decoder block, by name: nn.Linear and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _is_transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)  # Conv1D stores [in, out]


def attach_quantizers(block: nn.Module, bits: int, group_size: int) -> list[GroupQuantizer]:
    """Parametrise every linear weight of `block` with a min-max initialised GroupQuantizer."""
    quantizers = []
    for module in quantizable_linears(block).values():
        q = GroupQuantizer(module.weight.detach(), bits, group_size, _is_transposed(module))
        parametrize.register_parametrization(module, "weight", q)
        quantizers.append(q)
    return quantizers


@torch.no_grad()
def freeze_to_integers(block: nn.Module) -> list[IntegerWeight]:
    """Replace each GroupQuantizer in `block` by an IntegerWeight (the end of Block-AP for this block)."""
    frozen = []
    for module in quantizable_linears(block).values():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        quantizer = module.parametrizations.weight[0]
        if not isinstance(quantizer, GroupQuantizer):
            continue
        original = module.parametrizations.weight.original
        integer = quantizer.freeze(original)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        parametrize.register_parametrization(module, "weight", integer)
        module.parametrizations.weight.original.requires_grad_(False)
        frozen.append(integer)
    return frozen


def step_sizes(model: nn.Module) -> list[nn.Parameter]:
    """The E2E-QP trainables: every frozen-integer weight's s."""
    return [m.s for m in model.modules() if isinstance(m, IntegerWeight)]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calibration: torch.Tensor, batch_size: int):
    """Run the fp model on calibration batches; return layer 0's inputs and every layer's call arguments.

    Returns (X0, calls): X0 is a list of [batch, T, d] hidden states entering layer 0,
    calls[l][i] = (extra positional args, keyword args) that layer l got for batch i.
    """
    _check_token_blocks("calibration", calibration)
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    _, layers = decoder_layers(model)
    device = next(model.parameters()).device
    X0: list[torch.Tensor] = []
    calls: list[list] = [[] for _ in layers]

    def save(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                X0.append(hidden.detach())
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "layer_past")}
            kwargs["use_cache"] = False
            calls[index].append((args[1:], kwargs))
        return hook

    handles = [layer.register_forward_pre_hook(save(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for ids in calibration.split(batch_size):
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return X0, calls


def _call(layer: nn.Module, X: torch.Tensor, call) -> torch.Tensor:
    args, kwargs = call
    return _first(layer(X, *args, **kwargs))


@dataclass(frozen=True)
class BlockAPConfig:
    """Block-AP optimisation (defaults: the official 2-bit settings, see the module docstring)."""

    epochs: int = 2
    batch_size: int = 2
    weight_lr: float = 2e-5
    quant_lr: float = 1e-4
    min_lr_factor: float = 20.0  # cosine decay from lr to lr / min_lr_factor

    def __post_init__(self):
        if not _is_int(self.epochs) or self.epochs < 0:
            raise ValueError(f"BlockAPConfig.epochs must be an integer >= 0, got {self.epochs!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"BlockAPConfig.batch_size must be an integer >= 1, got {self.batch_size!r}")
        for name in ("weight_lr", "quant_lr"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"BlockAPConfig.{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not 1 <= self.min_lr_factor < math.inf:
            raise ValueError(f"BlockAPConfig.min_lr_factor must be a finite number >= 1, got {self.min_lr_factor!r}")


def _train_block(layer, quantizers, inputs, targets, calls, config: BlockAPConfig, use_bf16: bool) -> list[float]:
    """AdamW on MSE(f_b(X^q; W_hat), f_b(X^fp; W)) over every parameter of the block; the loss per step."""
    quant_params = {id(p) for q in quantizers for p in (q.s, q.z)}
    weights = [p for p in layer.parameters() if p.requires_grad and id(p) not in quant_params]
    optimizer = torch.optim.AdamW([
        {"params": weights, "lr": config.weight_lr},
        {"params": [p for q in quantizers for p in (q.s, q.z)], "lr": config.quant_lr},
    ], weight_decay=0.0)
    total = config.epochs * len(inputs)
    floor = 1.0 / config.min_lr_factor
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    device_type = inputs[0].device.type
    losses = []
    layer.train()
    for _ in range(config.epochs):
        for X_q, Y, call in zip(inputs, targets, calls):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
                out = _call(layer, X_q, call)
            loss = nn.functional.mse_loss(out.float(), Y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"Block-AP loss became {loss.item()}; lower the learning rates")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    layer.eval()
    return losses


@torch.no_grad()
def _block_mse(layer, inputs, targets, calls) -> float:
    total, count = 0.0, 0
    for X, Y, call in zip(inputs, targets, calls):
        total += nn.functional.mse_loss(_call(layer, X, call).float(), Y, reduction="sum").item()
        count += Y.numel()
    return total / count


def block_ap(model: nn.Module, calibration: torch.Tensor, bits: int, group_size: int,
             config: BlockAPConfig = BlockAPConfig(), use_bf16: bool | None = None) -> tuple[nn.Module, dict]:
    """Block-AP on a copy of `model`: returns it with frozen-integer weights, and per-block statistics.

    `calibration` is an [N, T] tensor of token ids (or a tokenizer's unpadded output). With ``config.epochs == 0`` this is
    RTN: the min-max quantisers are frozen untouched. The statistics give, per block,
    the reconstruction MSE on the calibration data at the RTN start and at the end.
    """
    _check_bits(bits)
    _check_group_size(model, group_size)
    calibration = _calibration_ids(model, calibration)
    if not isinstance(config, BlockAPConfig):
        raise ValueError(f"config must be a BlockAPConfig, got {type(config).__name__}")
    start = time.perf_counter()
    quantized = copy.deepcopy(model).eval()
    for p in quantized.parameters():
        p.requires_grad_(True)
    _, layers = decoder_layers(quantized)
    X_fp, calls = capture_block_inputs(quantized, calibration, config.batch_size)
    X_q = [x.clone() for x in X_fp]
    if use_bf16 is None:
        use_bf16 = bf16_autocast_available(X_fp[0].device)
    stats = {"rtn_mse": [], "block_ap_mse": [], "loss_curves": []}
    for b, layer in enumerate(layers):
        with torch.no_grad():  # the target: the full-precision block on the full-precision stream
            X_fp = [_call(layer, x, call).float() for x, call in zip(X_fp, calls[b])]
        quantizers = attach_quantizers(layer, bits, group_size)
        stats["rtn_mse"].append(_block_mse(layer, X_q, X_fp, calls[b]))
        if config.epochs > 0:
            stats["loss_curves"].append(_train_block(layer, quantizers, X_q, X_fp, calls[b], config, use_bf16))
        freeze_to_integers(layer)
        stats["block_ap_mse"].append(_block_mse(layer, X_q, X_fp, calls[b]))
        with torch.no_grad():  # the next block's input: this block, quantised, on the quantised stream
            X_q = [_call(layer, x, call).float() for x, call in zip(X_q, calls[b])]
    for p in quantized.parameters():
        p.requires_grad_(False)
    stats["seconds"] = time.perf_counter() - start
    return quantized, stats


@dataclass(frozen=True)
class E2EQPConfig:
    """E2E-QP optimisation (defaults: the official 2-bit lr, clip and warm-up; steps set by the caller)."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    grad_clip: float = 0.3

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 2)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                raise ValueError(f"E2EQPConfig.{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"E2EQPConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"E2EQPConfig.warmup_ratio must lie in [0, 1], got {self.warmup_ratio!r}")
        if not 0 < self.grad_clip < math.inf:
            raise ValueError(f"E2EQPConfig.grad_clip must be a finite number > 0, got {self.grad_clip!r}")


def e2e_qp(quantized: nn.Module, blocks: torch.Tensor, config: E2EQPConfig, seed: int = 0) -> dict:
    """Train only the step sizes s of a Block-AP (or RTN) model end to end on the LM loss, in place."""
    scales = step_sizes(quantized)
    if not scales:
        raise ValueError("e2e_qp needs a model from block_ap (no frozen-integer weights found)")
    if not isinstance(config, E2EQPConfig):
        raise ValueError(f"config must be an E2EQPConfig, got {type(config).__name__}")
    _check_token_blocks("blocks", blocks, min_len=config.seq_len)
    check_token_ids(quantized, blocks)
    _check_positions(quantized, "E2EQPConfig.seq_len", config.seq_len)
    for p in quantized.parameters():
        p.requires_grad_(False)
    for s in scales:
        s.requires_grad_(True)
    history = train(quantized, blocks, TrainConfig(
        steps=config.steps, batch_size=config.batch_size, seq_len=config.seq_len, lr=config.lr,
        warmup_steps=math.ceil(config.warmup_ratio * config.steps), weight_decay=0.0, grad_clip=config.grad_clip),
        params=scales, desc="E2E-QP: training the step sizes", seed=seed)
    for s in scales:
        s.requires_grad_(False)
    return history


def quantized_size_bits(model: nn.Module) -> int:
    """Bits to store a model with frozen-integer weights packed: N per weight, 16 + N per group."""
    total = 0
    counted = set()
    for module in model.modules():
        if isinstance(module, IntegerWeight):
            n_groups = module.s.numel()
            total += module.W_int.numel() * module.bits + n_groups * (SCALE_BITS + module.bits)
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for p in module.parametrizations.parameters():
                counted.add(id(p))  # the fp original and s are part of the packed weight above
    for p in model.parameters():
        if id(p) not in counted:
            total += p.numel() * p.element_size() * 8
    return total


def quantization_report(quantized: nn.Module, original: nn.Module, bits: int, group_size: int, method: str,
                        extra: dict | None = None) -> dict:
    """What a model with frozen-integer weights saves: bits per weight and size against the original."""
    return {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "quantized_linears": len(step_sizes(quantized)),
        "bits_per_quantized_weight": bits + (SCALE_BITS + bits) / group_size,
        "size_ratio": quantized_size_bits(quantized) / parameter_bits(original),
        **(extra or {}),
    }


def finish(quantized: nn.Module, original: nn.Module, bits: int, group_size: int, method: str,
           extra: dict | None = None) -> Compressed:
    """Fold the integer weights into plain dequantised `weight` tensors (in place) and report the savings.

    Do not ``deepcopy`` a model that still holds parametrisations to finish the copy:
    the copy shares torch's generated module classes, and folding it breaks the original.
    """
    report = quantization_report(quantized, original, bits, group_size, method, extra)
    for module in quantized.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    for p in quantized.parameters():
        p.requires_grad_(True)
    return Compressed(quantized.eval(), report)


def rtn(model: nn.Module, bits: int, group_size: int) -> Compressed:
    """Round-to-nearest baseline: min-max group quantisation of every block linear, nothing trained."""
    _check_bits(bits)
    _check_group_size(model, group_size)
    start = time.perf_counter()
    quantized = copy.deepcopy(model).eval()
    _, layers = decoder_layers(quantized)
    for layer in layers:
        attach_quantizers(layer, bits, group_size)
        freeze_to_integers(layer)
    return finish(quantized, model, bits, group_size, "RTN (min-max, asymmetric, group-wise)",
                  {"seconds": {"rtn": time.perf_counter() - start}})


def efficient_qat(model: nn.Module, calibration: torch.Tensor, train_blocks: torch.Tensor, bits: int,
                  group_size: int, block_config: BlockAPConfig, e2e_config: E2EQPConfig,
                  seed: int = 0) -> Compressed:
    """EfficientQAT: Block-AP on `calibration`, then E2E-QP on `train_blocks`; the dequantised model."""
    if not isinstance(e2e_config, E2EQPConfig):
        raise ValueError(f"e2e_config must be an E2EQPConfig, got {type(e2e_config).__name__}")
    _check_token_blocks("train_blocks", train_blocks, min_len=e2e_config.seq_len)
    check_token_ids(model, train_blocks)
    _check_positions(model, "e2e_config.seq_len", e2e_config.seq_len)
    quantized, stats = block_ap(model, calibration, bits, group_size, block_config)
    history = e2e_qp(quantized, train_blocks, e2e_config, seed=seed)
    return finish(quantized, model, bits, group_size, "EfficientQAT (Block-AP + E2E-QP, 2407.11062)", {
        "seconds": {"block_ap": stats["seconds"], "e2e_qp": history["seconds"]},
        "block_mse": {"rtn": stats["rtn_mse"], "block_ap": stats["block_ap_mse"]},
    })
