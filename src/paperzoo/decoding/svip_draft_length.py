r"""Draft Model Knows When to Stop: A Self-Verification Length Policy for Speculative Decoding
(Zhang, Xu, Liang, Chen, He, Wang, Tu; arXiv:2411.18462, "SVIP").

Speculative decoding lets a small draft model $q$ propose tokens one by one and the
target model $p$ check them all in one forward pass; verification keeps exactly the
target's output. How many tokens to draft per round is usually a constant $\gamma$. SVIP
replaces the constant with a *stopping rule*: the draft keeps going while it is
confident and stops as soon as its own entropy says the token it just drafted is
likely to be rejected, so easy stretches get long drafts and hard tokens short ones.

**The bound.** A draft token drawn from $q$ is accepted by rejection-sampling
verification with probability (Leviathan et al.; paper, eq. 2)

$$ \beta = \sum_x \min\big(p(x), q(x)\big) = 1 - \mathrm{TV}(p, q). $$

Pinsker's inequality bounds the total variation by the KL divergence, and
$\mathrm{KL}(q\,\|\,p) = H_{q,p} - H_q$ (cross-entropy minus the draft's entropy), so
(paper, eq. 5)

$$ \beta \;\ge\; 1 - \sqrt{\tfrac12\,\big(H_{q,p} - H_q\big)}. $$

(We could read the official code and the paper's figure captions but not its full
text; the equation numbers come from the caption of its Fig. 4, which names eq. 2 the
acceptance probability and eq. 5 the bound through the cross-entropy. The bound is
written here with Pinsker's constant.)

The cross-entropy needs the target's distribution, which is not known while drafting.
The paper observes that $H_{q,p}/H_q$ is nearly constant across tokens and replaces
$H_{q,p}$ by a constant multiple of $H_q$, which leaves a bound in the draft's entropy
alone, $\beta \gtrsim 1 - \sqrt{c\,H_q}$. SVIP stops drafting after a token whose
estimated bound falls below $1 - \tau$:

$$ \text{stop after drafting } x_t \iff \sqrt{c\,H_q(\cdot \mid x_{<t})} > \tau . $$

Constants, from the official code (Geralt-Targaryen/SVIP, ``vanilla-sd/eval_specbench.py``,
``torch.sqrt(entropy * 0.15) > self.entropy_threshold``): $c = 0.15$, $\tau = 0.3$ by default
(``config.json``), $H_q$ in nats, at most 40 draft tokens per round. With Pinsker's
$\tfrac12$, $c = 0.15$ corresponds to $H_{q,p} \approx 1.3\,H_q$; we could not read the
paper's own symbol for this constant, so it is called ``c`` here. The token that trips
the rule is still drafted (and sent for verification): the check runs after it is
chosen, as in the official loop. Drafting also stops at EOS and when the round would
overrun ``max_new_tokens``.

**The loop.** `speculative_decode` is our own loop (transformers' ``generate`` with an
``assistant_model`` has its own length policy and cannot take SVIP's), batch size 1 as in
the official code. Both models keep a `DynamicCache`; after verification both caches are
*cropped* to the accepted prefix (nothing is recomputed): the target is fed only the
tokens it has not cached plus the drafts, and returns $k + 1$ next-token distributions
for $k$ drafts. Verification is greedy (keep the longest prefix of drafts equal to the
target's argmax, then append the target's own next token; the output is the target's
greedy output token for token) or, with ``do_sample``, standard speculative sampling
(accept $x_i$ with probability $\min(1, p_i(x_i)/q_i(x_i))$, on the first rejection draw
from $\mathrm{norm}(\max(0, p_i - q_i))$, and if all $k$ pass draw a bonus token from
$p_{k+1}$; the output is distributed exactly as the target's samples). The same loop
runs the fixed-length baseline (`FixedLength`), and `FixedLength(0)` is plain greedy
decoding in the same code, so loop overheads cancel in comparisons.

Deviations from the official code:

- For sampling at a temperature $T \neq 1$ both $p$ and $q$ are tempered and $H_q$ is the
  entropy of the tempered draft distribution, i.e. of the distribution the draft
  actually samples from (the official code samples only at $T = 1$). Greedy drafting uses
  the entropy at $T = 1$, as the official code does.
- The official code feeds the target the prompt without its last token first, so that
  every round has at least one uncached token; our caches are cropped to the accepted
  prefix minus one token, which achieves the same thing without a separate prefill.

A prompt whose length plus `max_new_tokens` exceeds either model's positions is refused
before any pass, naming the limit (rather than an IndexError from a learned position
table mid-way).
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from paperzoo.core.sampling import check_positions
from paperzoo.decoding import Generation, count_forward_passes, cut_at_eos, prompt_ids

SVIP_C = 0.15  # official code: torch.sqrt(entropy * 0.15)
SVIP_THRESHOLD = 0.3  # official config.json: "entropy_threshold": 0.3
SVIP_MAX_DRAFT = 40  # official code: max_new_tokens = min(40, max_new_tokens)


@dataclass(frozen=True)
class FixedLength:
    """The conventional policy: draft exactly ``gamma`` tokens per round (0: no drafting, plain decoding)."""

    gamma: int

    def __post_init__(self):
        if self.gamma < 0:
            raise ValueError(f"the draft length gamma must be >= 0, not {self.gamma}")

    @property
    def max_length(self) -> int:
        return self.gamma

    def stop(self, entropy: float) -> bool:
        return False


@dataclass(frozen=True)
class SVIP:
    """Stop drafting after a token with sqrt(c * H_q) > tau, i.e. estimated acceptance bound 1 - sqrt(c H_q) < 1 - tau."""

    tau: float = SVIP_THRESHOLD
    c: float = SVIP_C
    max_length: int = SVIP_MAX_DRAFT

    def __post_init__(self):
        if self.tau <= 0 or self.c <= 0 or self.max_length < 1:
            raise ValueError(f"SVIP needs tau > 0, c > 0 and max_length >= 1 (got {self.tau}, {self.c}, {self.max_length})")

    def acceptance_bound(self, entropy: float) -> float:
        """The estimated lower bound on the acceptance probability, 1 - sqrt(c * H_q)."""
        return 1.0 - math.sqrt(self.c * entropy)

    def stop(self, entropy: float) -> bool:
        return math.sqrt(self.c * entropy) > self.tau


LengthPolicy = FixedLength | SVIP


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats along the last dimension (0 log 0 = 0)."""
    return torch.special.entr(probs).sum(-1)


def greedy_verification(drafts: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Accepted drafts n and the target's next token; target_logits: [k + 1, V] for k drafts."""
    choice = target_logits.argmax(-1).tolist()  # [k + 1]
    n = 0
    while n < len(drafts) and drafts[n] == choice[n]:
        n += 1
    return n, choice[n]


def rejection_verification(drafts: list[int], q: torch.Tensor, p: torch.Tensor,
                           generator: torch.Generator | None = None) -> tuple[int, int]:
    """Speculative sampling: accepted drafts n and the next token; q: [k, V] draft, p: [k + 1, V] target probs."""
    if q.shape[0] != len(drafts) or p.shape[0] != len(drafts) + 1:
        raise ValueError(f"need {len(drafts)} draft and {len(drafts) + 1} target distributions, "
                         f"got {q.shape[0]} and {p.shape[0]}")
    for i, x in enumerate(drafts):
        u = torch.rand((), generator=generator).item()
        if u * q[i, x] < p[i, x]:  # u < min(1, p/q), without dividing by q
            continue
        residual = (p[i] - q[i]).clamp_min(0)  # norm(max(0, p - q))
        if residual.sum() <= 0:  # only reachable through rounding when p == q
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))


def _crop(cache: DynamicCache, length: int) -> None:
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)  # a negative argument removes that many tokens in every transformers version


def _cached_forward(model):
    """``step(tokens, cache)``: feed the tokens the cache lacks and return their logits [fed, V] (float32)."""
    # transformers 5 renamed the cache argument (`past_key_values` -> `cache`); take whichever forward has
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(tokens: list[int], cache: DynamicCache) -> torch.Tensor:
        fed = torch.tensor([tokens[cache.get_seq_length():]])
        return model(input_ids=fed, use_cache=True, **{name: cache}).logits[0].float()

    return step


@torch.no_grad()
def speculative_decode(target, draft, tokenizer, prompt: str, policy: LengthPolicy = SVIP(),
                       max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                       seed: int | None = None) -> Generation:
    """Speculative decoding of one prompt with a draft-length policy (`SVIP` or `FixedLength`).

    Greedy verification by default (output identical to the target's greedy decoding);
    ``do_sample`` uses speculative sampling at ``temperature``. ``stats`` holds the
    draft passes, rounds, drafted and accepted tokens, acceptance rate and mean draft
    length; ``forward_passes`` counts the target's calls.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"sampling needs a temperature > 0, not {temperature}")
    if not isinstance(policy, (FixedLength, SVIP)):
        raise ValueError(f"policy must be SVIP(...) or FixedLength(gamma), not {policy!r}")
    if target.get_output_embeddings().weight.shape[0] != draft.get_output_embeddings().weight.shape[0]:
        raise ValueError("the draft and target models must share a vocabulary (different output sizes)")
    prompt_tokens = prompt_ids(tokenizer, prompt)[0].tolist()
    # drafts never run past max_new_tokens - 1 generated tokens, so both models need prompt + max_new_tokens positions
    check_positions(target, len(prompt_tokens), max_new_tokens, what="target model")
    check_positions(draft, len(prompt_tokens), max_new_tokens, what="draft model")
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    T = temperature if do_sample else 1.0
    target_step, draft_step = _cached_forward(target), _cached_forward(draft)
    target_cache, draft_cache = DynamicCache(), DynamicCache()
    generated: list[int] = []
    rounds = drafted = accepted = 0
    round_entropies: list[list[float]] = []  # H_q of every draft token, per round
    round_accepted: list[int] = []
    with count_forward_passes(target) as target_passes, count_forward_passes(draft) as draft_passes:
        start = time.perf_counter()
        while len(generated) < max_new_tokens and not (generated and generated[-1] == eos):
            context = prompt_tokens + generated
            # 1. draft until the policy stops, EOS, or the round would pass max_new_tokens (the target adds one)
            budget = min(policy.max_length, max_new_tokens - len(generated) - 1)
            drafts: list[int] = []
            q_rows: list[torch.Tensor] = []
            entropies: list[float] = []
            while len(drafts) < budget:
                q = torch.softmax(draft_step(context + drafts, draft_cache)[-1] / T, -1)  # [V]
                x = int(torch.multinomial(q, 1, generator=generator)) if do_sample else int(q.argmax())
                drafts.append(x)
                q_rows.append(q)
                H = float(entropy(q))
                entropies.append(H)
                if x == eos or policy.stop(H):
                    break
            # 2. verify all drafts with one target pass: k + 1 next-token distributions
            logits = target_step(context + drafts, target_cache)[-(len(drafts) + 1):]  # [k + 1, V]
            if do_sample:
                p = torch.softmax(logits / T, -1)
                q_all = torch.stack(q_rows) if q_rows else p[:0]
                n, nxt = rejection_verification(drafts, q_all, p, generator)
            else:
                n, nxt = greedy_verification(drafts, logits)
            generated += drafts[:n] + [nxt]
            generated = cut_at_eos(generated, eos)
            # 3. keep only the accepted prefix in both caches; the newest token is fed next round
            keep = len(prompt_tokens) + len(generated) - 1
            _crop(target_cache, keep)
            _crop(draft_cache, keep)
            rounds += 1
            drafted += len(drafts)
            accepted += n
            round_entropies.append(entropies)
            round_accepted.append(n)
        wall = time.perf_counter() - start
    stats = {
        "policy": repr(policy),
        "target_passes": target_passes.count,
        "draft_passes": draft_passes.count,
        "rounds": rounds,
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_draft_length": drafted / rounds if rounds else 0.0,
        "mean_accepted_length": accepted / rounds if rounds else 0.0,
        "round_entropies": round_entropies,  # draft i of a round was accepted iff i < its round_accepted
        "round_accepted": round_accepted,
    }
    return Generation(generated, tokenizer.decode(generated), target_passes.count, wall, stats)


@torch.no_grad()
def transformers_assisted_decode(target, draft, tokenizer, prompt: str, max_new_tokens: int = 64) -> Generation:
    """Greedy assisted generation by transformers (``generate(..., assistant_model=draft)``), a library baseline.

    It uses the draft's generation config (in transformers 5: up to 20 draft tokens, and
    drafting stops when the draft's top probability falls under an adaptively tuned
    ``assistant_confidence_threshold``, 0.4 at first). transformers tunes that threshold
    in place on the draft's config; it is restored after the call, so calls are independent.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
    ids = prompt_ids(tokenizer, prompt)
    check_positions(target, ids.shape[1], max_new_tokens, what="target model")
    check_positions(draft, ids.shape[1], max_new_tokens, what="draft model")
    eos = tokenizer.eos_token_id
    saved = copy.deepcopy(draft.generation_config)
    try:
        with count_forward_passes(target) as target_passes, count_forward_passes(draft) as draft_passes:
            start = time.perf_counter()
            out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
            wall = time.perf_counter() - start
    finally:
        draft.generation_config = saved
    tokens = cut_at_eos(out[0, ids.shape[1]:].tolist(), eos)
    stats = {"target_passes": target_passes.count, "draft_passes": draft_passes.count}
    return Generation(tokens, tokenizer.decode(tokens), target_passes.count, wall, stats)
