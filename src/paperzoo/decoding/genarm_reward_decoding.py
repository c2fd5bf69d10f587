r"""GenARM: Reward Guided Generation with Autoregressive Reward Model for Test-time Alignment
(Xu, Sehwag, Koppel, Zhu, An, Huang, Ganesh; arXiv:2410.08193, ICLR 2025).

KL-regularised RLHF has a closed-form optimum,
$\pi^*(y|x) \propto \pi_{\text{base}}(y|x) \exp(r(x,y)/\beta)$, but sampling from it token by
token needs the reward of *partial* responses, which a whole-sequence reward model does
not give (earlier test-time methods score sampled continuations or a truncated prefix,
at great cost). GenARM makes the reward model itself autoregressive: an LM $\pi_r$ whose
reward of a response is a sum of token rewards, so the optimum factorises into a
next-token rule and decoding costs one extra forward pass of $\pi_r$ per token.

**Autoregressive reward model** the token reward is a scaled log-probability
under a trainable causal LM (the paper's ARM parametrisation),

$$ r(x, y) = \sum_t \beta_r \log \pi_r(y_t \mid x, y_{<t}). $$

**Training**: Bradley-Terry on preference pairs $(x, y^w, y^l)$,

$$ \mathcal L(\pi_r) = -\mathbb E \log \sigma\Big(\beta_r \Big[\sum_t \log \pi_r(y^w_t|x,y^w_{<t})
   - \sum_t \log \pi_r(y^l_t|x,y^l_{<t})\Big]\Big) $$

-- DPO's loss without the reference model, on *summed* (not length-normalised) log-probabilities.

**Guided decoding**: with $\alpha = \beta_r / \beta$,

$$ \tilde\pi(y_t \mid x, y_{<t}) \propto \pi_{\text{base}}(y_t \mid x, y_{<t})\,
   \pi_r(y_t \mid x, y_{<t})^{\alpha}, $$

normalised over the vocabulary, sampled token by token. $\alpha \to 0$ gives the base model back.

Implementation notes (checked against the official repository Yuancheng-Xu/GenARM:
its README, which decodes with ``M_base + alpha * M_arm`` through ``model_arithmetic`` at
temperature ``T/(1+alpha)``, i.e. with the un-normalised sum $\log\pi_{base} + \alpha\log\pi_r$;
and its ARM trainer's ``arm_loss``, ``-logsigmoid(beta * (chosen_logps - rejected_logps))``
with summed log-probabilities, a target margin $\gamma = 0$ and no length normalisation
by default):

- `genarm_generate` runs the ARM in step with the base, each with its own KV cache (one
  ARM forward call per generated token, the first over the whole prompt), in paperzoo's
  sampler (`core.sampling.sample(..., guide=arm)`): each step samples from
  $\log\mathrm{softmax}(\log\pi_{base} + \alpha\log\pi_r)$ at temperature 1 (no top-k/top-p),
  that is exactly $\tilde\pi$, and a row that has written EOS leaves the batch and both
  caches. (Until issue 9 it ran inside transformers' `generate`, where a batch costs its
  longest sample: on reasoner v3, with 16-30% of samples at the 640-token cap, GenARM took
  2,859 s a seed.) `GenARMLogitsProcessor` does the same inside `generate`, for users who
  decode that way: it receives the base's raw next-token logits and returns log pi~.
- The ARM must share the base's tokenizer (the paper's ARMs are from the same family).
- Equation numbers are not quoted: we could not check them against the paper's text here.
- ``genarm_loss`` is the mean over the batch; the official optional margin $\gamma$ is left out.
- Whole-sequence reward for a best-of-N baseline: `sequence_reward` gives the same ARM's
  $\beta_r \sum_t \log \pi_r$, one forward call per batch of responses.
- Training follows the official recipe (``training_trl/train_arm_llama_HH.sh`` and
  ``train_arm_llama.py``): the ARM is the base model with a LoRA adapter (peft; rank 8,
  alpha 16, dropout 0.05, on the attention projections q, k, v), trained for one epoch
  with AdamW at 5e-4, a cosine schedule after a short linear warm-up, weight decay 0.05,
  batches of 32 pairs (their gradient accumulated over length-sorted passes of 8, to pad
  less) and gradient clipping at 1 (the Trainer's default); beta_r = 0.05
  for HH-RLHF. `lora_arm` builds such an ARM and `train_arm` trains whatever parameters
  require gradients (the adapter, or a whole model). `genarm_generate` takes a plain
  causal LM or a peft model as ARM.
- Prompts are padded on the left whatever the tokenizer's `padding_side`, with position
  ids counted from each row's first real token in both models (this matters for models
  with learned absolute positions, such as GPT-2). Arguments, and prompt plus
  `max_new_tokens` against both models' positions, are checked before any forward pass.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LogitsProcessor, get_cosine_schedule_with_warmup

from paperzoo.core.sampling import GrowingCache, check_positions, encode_left_padded, sample
from paperzoo.decoding import Generation, count_forward_passes, prompt_ids

# The official ARM recipe (Yuancheng-Xu/GenARM, training_trl/): LoRA and optimiser settings, beta for HH-RLHF.
PAPER_LORA_RANK, PAPER_LORA_ALPHA, PAPER_LORA_DROPOUT = 8, 16.0, 0.05
PAPER_LR, PAPER_WEIGHT_DECAY, PAPER_BATCH, PAPER_EPOCHS = 5e-4, 0.05, 32, 1
PAPER_BETA_R = 0.05
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # the official target modules that a Llama has

# --------------------------------------------------------------------------- the reward model's loss

def genarm_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, beta_r: float) -> torch.Tensor:
    """-mean log sigma(beta_r [sum_t log pi_r(y^w_t) - sum_t log pi_r(y^l_t)]) (the paper's ARM loss).

    `logp_w`, `logp_l`: [B] summed response log-probabilities of the preferred / rejected responses.
    """
    if logp_w.shape != logp_l.shape:
        raise ValueError(f"chosen and rejected log-probabilities differ in shape: {tuple(logp_w.shape)} "
                         f"vs {tuple(logp_l.shape)}")
    if beta_r <= 0:
        raise ValueError(f"beta_r must be positive, not {beta_r}")
    return -F.logsigmoid(beta_r * (logp_w - logp_l)).mean()


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) over the tokens where `response_mask` is 1: [B, L] -> [B].

    Left-padded batches work: positions are counted from the first unmasked token.
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != response_mask.shape:
        raise ValueError("input_ids, attention_mask and response_mask must have the same shape")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)  # [B, L-1, V] predicts token t+1
    chosen = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    return (chosen * response_mask[:, 1:].float()).sum(-1)


def encode_responses(tokenizer, prompts: Sequence[str], responses: Sequence[str]):
    """Left-padded (input_ids, attention_mask, response_mask) for prompt+response texts."""
    if len(prompts) != len(responses):
        raise ValueError("one response per prompt is needed")
    rows = []
    for p, y in zip(prompts, responses):
        x_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        y_ids = tokenizer(y, add_special_tokens=False)["input_ids"]
        if not y_ids:
            raise ValueError("a response is empty")
        rows.append((x_ids + y_ids, [0] * len(x_ids) + [1] * len(y_ids)))
    L = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (L - len(i)) + i for i, _ in rows])
    attn = torch.tensor([[0] * (L - len(i)) + [1] * len(i) for i, _ in rows])
    resp = torch.tensor([[0] * (L - len(r)) + r for _, r in rows])
    return ids, attn, resp


@torch.no_grad()
def sequence_reward(arm, tokenizer, prompts: Sequence[str], responses: Sequence[str], beta_r: float = 1.0,
                    batch_size: int = 64) -> torch.Tensor:
    """Whole-sequence reward r(x, y) = beta_r sum_t log pi_r(y_t | x, y_<t) (the ARM parametrisation): [N].

    Batches are formed after sorting by length, so each pads only to its own longest text.
    """
    if len(prompts) != len(responses) or len(prompts) == 0:
        raise ValueError("sequence_reward needs one response per prompt, and at least one")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out = torch.empty(len(prompts))
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        ids, attn, resp = encode_responses(tokenizer, [prompts[i] for i in rows], [responses[i] for i in rows])
        check_positions(arm, ids.shape[1], 0, what="reward model")
        out[rows] = beta_r * response_logprobs(arm, ids, attn, resp)
    return out


def lora_arm(base: nn.Module, rank: int = PAPER_LORA_RANK, alpha: float = PAPER_LORA_ALPHA,
             dropout: float = PAPER_LORA_DROPOUT, target_modules=None, seed: int = 0):
    """A copy of `base` with a fresh LoRA adapter (peft): the official ARM before training.

    `target_modules` defaults to the attention projections q, k, v (the official targets a
    Llama has); a model without them gets peft's ``"all-linear"``. `base` is not changed.
    """
    from peft import LoraConfig, get_peft_model

    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"need rank >= 1, alpha > 0 and 0 <= dropout < 1, got {rank}, {alpha} and {dropout}")
    if target_modules is None:
        names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        target_modules = list(ATTENTION_PROJECTIONS) if set(ATTENTION_PROJECTIONS) <= names else "all-linear"
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                          target_modules=target_modules, bias="none"))


def train_arm(arm, tokenizer, pairs: Sequence[tuple[str, str, str]], beta_r: float = PAPER_BETA_R,
              epochs: int = PAPER_EPOCHS, batch_size: int = PAPER_BATCH, lr: float = PAPER_LR,
              warmup_steps: int = 0, weight_decay: float = PAPER_WEIGHT_DECAY, seed: int = 0,
              micro_batch: int = 8) -> list[float]:
    """Train `arm` in place on (prompt, preferred, rejected) triples with `genarm_loss`; returns the losses.

    `epochs` passes over the pairs in a seeded random order, batches of `batch_size`
    pairs, AdamW with linear warm-up then cosine decay, gradients clipped at 1. Only
    parameters that require gradients are trained (a LoRA adapter from `lora_arm`, or a
    whole model). Each batch's gradient is accumulated over forward passes of at most
    `micro_batch` pairs, the batch's pairs sorted by length, so a pass pads only to its
    own longest sequence: the same gradient as one pass over the batch (up to float
    rounding, and dropout's draws), for a fraction of the padding when lengths vary.
    """
    if not pairs:
        raise ValueError("train_arm needs at least one preference pair")
    if epochs < 1 or batch_size < 1 or micro_batch < 1 or lr <= 0 or warmup_steps < 0 or weight_decay < 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, micro_batch >= 1, lr > 0, warmup_steps >= 0 and "
                         f"weight_decay >= 0, got {epochs}, {batch_size}, {micro_batch}, {lr}, {warmup_steps} and "
                         f"{weight_decay}")
    if beta_r <= 0:
        raise ValueError(f"beta_r must be positive, not {beta_r}")
    params = [p for p in arm.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the reward model has no trainable parameters")
    g = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(pairs) / batch_size)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(opt, warmup_steps, epochs * per_epoch)
    length = [len(x) + max(len(w), len(l)) for x, w, l in pairs]  # characters: a proxy, for sorting only
    arm.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(pairs), generator=g).tolist()
        for start in range(0, len(pairs), batch_size):
            idx = sorted(order[start:start + batch_size], key=lambda i: length[i])
            opt.zero_grad()
            loss = 0.0
            for part in (idx[k:k + micro_batch] for k in range(0, len(idx), micro_batch)):
                x = [pairs[i][0] for i in part]
                ids, attn, resp = encode_responses(tokenizer, x + x,
                                                   [pairs[i][1] for i in part] + [pairs[i][2] for i in part])
                logp = response_logprobs(arm, ids, attn, resp)  # [2b]: preferred then rejected
                part_loss = genarm_loss(logp[:len(part)], logp[len(part):], beta_r) * (len(part) / len(idx))
                part_loss.backward()  # the batch's mean loss, accumulated part by part
                loss += float(part_loss.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            losses.append(loss)
    arm.eval()
    return losses


# --------------------------------------------------------------------------- guided decoding

def guided_logprobs(base_logits: torch.Tensor, arm_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """log pi~ = log softmax(log pi_base + alpha log pi_r) over the vocabulary (GenARM's decoding rule): [..., V]."""
    if base_logits.shape[-1] != arm_logits.shape[-1]:
        raise ValueError(f"base and reward model vocabularies differ: {base_logits.shape[-1]} vs "
                         f"{arm_logits.shape[-1]}")
    if alpha < 0:
        raise ValueError(f"alpha = beta_r / beta must be non-negative, not {alpha}")
    combined = torch.log_softmax(base_logits.float(), -1) + alpha * torch.log_softmax(arm_logits.float(), -1)
    return torch.log_softmax(combined, -1)


class GenARMLogitsProcessor(LogitsProcessor):
    """Runs the ARM next to `generate` (own KV cache) and turns the base's logits into log pi~.

    `attention_mask`: [B, P] mask of the (left-padded) prompts that `generate` was given.
    """

    def __init__(self, arm, alpha: float, attention_mask: torch.Tensor):
        if alpha < 0:
            raise ValueError(f"alpha = beta_r / beta must be non-negative, not {alpha}")
        self.arm, self.alpha = arm, alpha
        self.mask = attention_mask.long()
        self.cache: GrowingCache | None = None
        self.seen = 0  # tokens of the sequence the ARM's cache holds

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, L = input_ids.shape
        if B != self.mask.shape[0]:
            raise ValueError("GenARM needs one prompt mask row per sequence (expand prompts, not num_return_sequences)")
        mask = torch.cat([self.mask, self.mask.new_ones(B, L - self.mask.shape[1])], 1)  # [B, L]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.cache is None:
            self.cache = GrowingCache()
            new = slice(0, L)
        else:
            if L != self.seen + 1:
                raise ValueError(f"GenARM's cache holds {self.seen} tokens but the sequence has {L}")
            new = slice(L - 1, L)
        # transformers 5 renamed `past_key_values` to `cache`; the cache is updated in place
        name = "cache" if "cache" in inspect.signature(self.arm.forward).parameters else "past_key_values"
        out = self.arm(input_ids=input_ids[:, new], attention_mask=mask, position_ids=positions[:, new],
                       use_cache=True, **{name: self.cache})
        self.seen = L
        return guided_logprobs(scores, out.logits[:, -1], self.alpha).to(scores.dtype)


@torch.no_grad()
def genarm_generate(base, arm, tokenizer, prompts: Sequence[str], alpha: float = 1.0, max_new_tokens: int = 64,
                    seed: int = 0, batch_size: int = 64) -> list[Generation]:
    """One GenARM sample per prompt (repeat a prompt for several); forward calls of both models in stats.

    `arm` is a causal LM or a peft model around one (as `lora_arm` returns). Both decode in
    step through `core.sampling.sample(..., guide=arm)`, where a finished row leaves the
    batch and both caches; `forward_passes` and `wall_seconds` of each Generation are those
    of the whole call.
    """
    if alpha < 0:
        raise ValueError(f"alpha = beta_r / beta must be non-negative, not {alpha}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be at least 1, got {max_new_tokens} and {batch_size}")
    if hasattr(arm, "get_base_model"):  # peft: its LoRA layers live inside the base model, called directly
        arm = arm.get_base_model()
    base_vocab = base.get_output_embeddings().weight.shape[0]
    arm_vocab = arm.get_output_embeddings().weight.shape[0]
    if base_vocab != arm_vocab:
        raise ValueError(f"base and reward model vocabularies differ: {base_vocab} vs {arm_vocab}")
    longest = encode_left_padded(tokenizer, prompts)["input_ids"].shape[1]
    check_positions(base, longest, max_new_tokens, what="base model")
    check_positions(arm, longest, max_new_tokens, what="reward model")
    with count_forward_passes(base) as base_calls, count_forward_passes(arm) as arm_calls:
        start = time.perf_counter()
        drawn = sample(base, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                       batch_size=batch_size, guide=arm, combine=lambda b, a: guided_logprobs(b, a, alpha))
        wall = time.perf_counter() - start
    return [Generation(x.tokens, x.text, base_calls.count, wall,
                       {"alpha": alpha, "base_forward_passes": base_calls.count, "arm_forward_passes": arm_calls.count,
                        "prompts": len(prompts)}) for x in drawn]


def genarm_decode(base, arm, tokenizer, prompt: str, alpha: float = 1.0, max_new_tokens: int = 64,
                  seed: int = 0) -> Generation:
    """The family interface: one GenARM sample of one prompt."""
    prompt_ids(tokenizer, prompt)  # rejects an empty prompt
    return genarm_generate(base, arm, tokenizer, [prompt], alpha, max_new_tokens, seed)[0]
