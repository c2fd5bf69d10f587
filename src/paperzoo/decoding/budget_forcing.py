r"""s1: Simple test-time scaling (Muennighoff, Yang, Shi, Li, Fei-Fei, Hajishirzi, Zettlemoyer, Liang,
Candès, Hashimoto; arXiv:2501.19393) -- budget forcing.

A reasoning model thinks between delimiters and then answers. *Budget forcing*
controls how long it thinks with nothing but the decoder. To cap thinking at
$T_{\max}$ tokens, the end-of-thinking delimiter is appended the moment the budget
is used up (optionally followed by an answer prefix such as "Final Answer:"), and
the model answers from whatever it has thought so far. To make it think longer, the
delimiter is *suppressed* when the model would emit it and a continuation string
("Wait") is appended instead, up to $N$ times; the model then carries on reasoning,
often re-checking its work. The paper's s1-32B, fine-tuned on 1,000 traces, rises
from 50% to 57% on AIME24 this way, with gains flattening after a few extensions.

Written as a rule on the next thinking token $y_t$ after $t$ thinking tokens, with
$e$ extensions used so far and $d$ the delimiter:

$$ y_t = \begin{cases}
  d & t = T_{\max} \quad\text{(forced stop)} \\
  \text{``Wait''} & \hat y_t = d,\ e < N \quad\text{(forced extension; } e \leftarrow e + 1) \\
  \hat y_t & \text{otherwise}
\end{cases} $$

where $\hat y_t$ is the model's own choice (greedy, or sampled). The paper measures
a controller by *Control* (share of runs that stay within the budget; 100% for budget
forcing) and *Scaling*, the mean slope of accuracy against thinking tokens over all
pairs of budgets (paper, §3):

$$ \text{Scaling} = \binom{|\mathcal A|}{2}^{-1} \sum_{a, b \in \mathcal A,\ b > a} \frac{f(b) - f(a)}{b - a} $$

Implementation notes:

- Our own decoding loop over ``model(...)`` with a KV cache, batched over prompts
  with left padding. `generate` with a logits processor cannot do this: whether to
  replace the delimiter depends on the token actually chosen, which under sampling
  a processor never sees, and a multi-token continuation must be fed in whatever
  the model would have chosen. (The official code re-prompts vLLM after each stop
  at the delimiter, re-reading the prefix each time; here the continuation tokens
  are fed one per step through the cache, one forward pass each, counted.) A row
  that is done leaves the batch and its cache rows, so a batch costs the sum of its
  rows' lengths rather than batch size x the longest (2x on 64 of the reasoner's
  problems with N = 2, the same tokens); `forward_passes` still counts batch steps.
- The delimiter is a parameter (a string that must be a single token of the
  tokenizer; `</think>` for paperzoo's reasoner) and so are the continuation
  string (default "Wait"; "" suppresses the delimiter alone, the paper's "no string"
  ablation, taking the model's best token other than the delimiter) and the answer
  prefix (default none: paperzoo's reasoner writes "Answer:" itself).
- Thinking tokens are all tokens generated before the delimiter, forced
  continuation tokens included, so a cap bounds the whole thinking segment. If the
  cap falls inside a continuation, the cap wins.
- A model that emits EOS while thinking is done (nothing to force). `max_new_tokens`
  bounds everything, so a model that never stops thinking still terminates; by default
  it is what the model's positions leave after the prompt.
- `resume` continues thinking another run has written (read in one pass, not decoded
  again): with greedy decoding a run capped at $c$ is the uncapped run's first $c$
  thinking tokens and the delimiter, and a run with $N$ extensions is the run with
  $N - 1$ up to its last delimiter, then one more extension. The experiment builds
  its budgets and extensions that way: the same tokens (tested, up to floating-point
  near-ties between a one-pass read and token-by-token decoding), with each thinking
  token decoded once rather than once per budget and extension.
- With no cap and no extensions the loop is plain decoding (a test checks it
  against `generate`'s greedy output token for token).
- Prompts are padded on the left whatever the tokenizer's `padding_side`, with position
  ids counted from each row's first real token; arguments, and the prompt plus
  `max_new_tokens` against the model's positions, are checked before any forward pass.
- `scaling_weights` writes Scaling as a weighted sum of the accuracies (for fixed
  thinking-token coordinates), so that it splits into one term per problem and a
  bootstrap over problems can give it an interval.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from paperzoo.core.reasoning import END_THINK
from paperzoo.core.sampling import GrowingCache, check_positions, encode_left_padded, max_positions
from paperzoo.decoding import Generation, count_forward_passes


@dataclass
class _Row:
    phase: str = "think"  # think -> answer -> done
    tokens: list[int] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)  # forced tokens still to feed
    thinking: int = 0
    extensions: int = 0
    answer_tokens: int = 0
    forced_stop: bool = False
    delimiter_at: int | None = None  # index in `tokens` of the end-of-thinking delimiter


def single_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the {what} {text!r} must be a single token of this tokenizer, not {len(ids)}")
    return ids[0]


def _choose(logits: torch.Tensor, temperature: float, top_p: float, banned: int | None = None) -> torch.Tensor:
    """Greedy or sampled next tokens [B] from raw logits [B, V], optionally never `banned`."""
    logits = logits.float().clone()
    if banned is not None:
        logits[:, banned] = float("-inf")
    if temperature == 0:
        return logits.argmax(-1)
    warp = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
    return torch.multinomial(torch.softmax(warp(None, logits), -1), 1).squeeze(-1)


@torch.no_grad()
def budget_force_batch(model, tokenizer, prompts: Sequence[str], max_thinking_tokens: int | None = None,
                       num_extensions: int = 0, continuation: str = "Wait", end_of_thinking: str = END_THINK,
                       answer_prefix: str = "", max_answer_tokens: int = 32, max_new_tokens: int | None = None,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                       resume: Sequence[Sequence[int]] | None = None) -> list[Generation]:
    """Budget forcing for every prompt at once; `forward_passes` and `wall_seconds` are the batch's.

    `max_new_tokens` bounds every generation (thinking and answer); by default, as many
    as the model's positions leave after the longest prompt (1024 if it has no limit).
    `resume` holds, per prompt, thinking tokens already written (no delimiter among them):
    they are read in one forward pass after the prompt, count against `max_thinking_tokens`,
    and open the returned tokens, so a run can continue another's thinking without
    decoding it again.
    """
    if max_thinking_tokens is not None and max_thinking_tokens < 0:
        raise ValueError(f"max_thinking_tokens must be >= 0 or None, not {max_thinking_tokens}")
    if num_extensions < 0:
        raise ValueError(f"num_extensions must be >= 0, not {num_extensions}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if (max_new_tokens is not None and max_new_tokens < 1) or max_answer_tokens < 1:
        raise ValueError(f"max_new_tokens and max_answer_tokens must be at least 1, got {max_new_tokens} and "
                         f"{max_answer_tokens}")
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    d = single_token(tokenizer, end_of_thinking, "end-of-thinking delimiter")
    wait = tokenizer(continuation, add_special_tokens=False)["input_ids"] if continuation else []
    prefix = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
    eos = tokenizer.eos_token_id
    enc = encode_left_padded(tokenizer, prompts)
    if resume is not None:
        if len(resume) != len(prompts) or any(d in r or eos in r for r in resume):
            raise ValueError("resume must hold one list of thinking tokens per prompt, without the delimiter or EOS")
        enc = _append(enc, resume, eos if eos is not None else 0)
    if max_new_tokens is None:
        limit = max_positions(model)
        max_new_tokens = max(1, limit - enc["input_ids"].shape[1]) if limit is not None else 1024
    check_positions(model, enc["input_ids"].shape[1], max_new_tokens)
    device = next(model.parameters()).device
    mask = enc["attention_mask"].to(device)  # [B, T], grows by one column per step
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows = [_Row(tokens=list(r), thinking=len(r)) for r in resume] if resume is not None else [_Row() for _ in prompts]
    active = list(range(len(prompts)))  # rows still decoding; a finished row leaves the batch and its cache
    cache = GrowingCache()
    torch.manual_seed(seed)
    with count_forward_passes(model) as passes:
        start = time.perf_counter()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=enc["input_ids"].to(device), attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_name: cache})
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1]  # [B, V]
            choice = _choose(logits, temperature, top_p).tolist()
            without_d = _choose(logits, temperature, top_p, banned=d).tolist() if not wait else choice
            nxt = [_advance(rows[i], c, c_no_d, d, eos, wait, prefix, max_thinking_tokens, num_extensions,
                            max_answer_tokens) for i, c, c_no_d in zip(active, choice, without_d)]
            keep = [j for j, i in enumerate(active) if rows[i].phase != "done"]
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, active, nxt = mask[index], [active[j] for j in keep], [nxt[j] for j in keep]
            step = torch.tensor(nxt, device=device).unsqueeze(-1)  # [B, 1]
            new_positions = mask.sum(-1, keepdim=True)  # [B, 1]: one past each row's last position
            mask = torch.cat([mask, torch.ones_like(step)], dim=-1)
            out = model(input_ids=step, attention_mask=mask, position_ids=new_positions, use_cache=True,
                        **{cache_name: cache})
        wall = time.perf_counter() - start
    return [Generation(r.tokens, tokenizer.decode(r.tokens), passes.count, wall, {
        "thinking_tokens": r.thinking,
        "extensions": r.extensions,
        "forced_stop": r.forced_stop,
        "answer_tokens": r.answer_tokens,
        "delimiter_at": r.delimiter_at,
        "finished": r.phase == "done",
        "batch_prompts": len(prompts),
    }) for r in rows]


def _append(enc: dict, tails: Sequence[Sequence[int]], pad: int) -> dict:
    """`encode_left_padded`'s batch with each row's `tails[i]` appended, padded on the left again."""
    rows = [ids[m.bool()].tolist() + list(t) for ids, m, t in zip(enc["input_ids"], enc["attention_mask"], tails)]
    L = max(map(len, rows))
    return {"input_ids": torch.tensor([[pad] * (L - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])}


def _advance(r: _Row, c: int, c_no_d: int, d: int, eos: int, wait: list[int], prefix: list[int],
             cap: int | None, N: int, max_answer: int) -> int:
    """One step of the budget-forcing rule for one row: the token it feeds next (EOS once done)."""
    if r.phase == "done":
        return eos
    if r.phase == "think":
        if cap is not None and r.thinking >= cap:  # forced stop: the budget is used up
            token, r.forced_stop = d, True
        elif r.queue:  # inside a forced continuation
            token = r.queue.pop(0)
        elif c == d and r.extensions < N:  # forced extension: suppress the delimiter
            r.extensions += 1
            r.queue = list(wait)
            token = r.queue.pop(0) if r.queue else c_no_d
        else:
            token = c
        r.tokens.append(token)
        if token == d:
            r.phase, r.queue, r.delimiter_at = "answer", list(prefix), len(r.tokens) - 1
        elif token == eos:
            r.phase = "done"
        else:
            r.thinking += 1
        return token
    token = r.queue.pop(0) if r.queue else c
    r.tokens.append(token)
    r.answer_tokens += 1
    if token == eos or r.answer_tokens >= max_answer:
        r.phase = "done"
    return token


def budget_force(model, tokenizer, prompt: str, **kwargs) -> Generation:
    """Budget forcing for one prompt; keyword arguments as `budget_force_batch`."""
    return budget_force_batch(model, tokenizer, [prompt], **kwargs)[0]


def scaling(points: Sequence[tuple[float, float]]) -> float | None:
    """The paper's Scaling metric: the mean slope over all pairs of (thinking tokens, accuracy) points.

    Pairs with equal thinking tokens have no slope and are left out; None if no pair has one.
    """
    slopes = [(fb - fa) / (b - a) for (a, fa), (b, fb) in combinations(sorted(points), 2) if b != a]
    return sum(slopes) / len(slopes) if slopes else None


def scaling_weights(thinking: Sequence[float]) -> list[float] | None:
    """w with Scaling = sum_k w_k f(a_k) for budgets at thinking tokens a_k (their accuracies f free).

    Scaling is linear in the accuracies once the thinking tokens are fixed, so a per-problem
    0/1 correctness vector c_i gives a per-problem term sum_k w_k c_ik whose mean over
    problems is Scaling. None when no two budgets differ in thinking tokens.
    """
    pairs = [(i, j) for i, j in combinations(range(len(thinking)), 2) if thinking[i] != thinking[j]]
    if not pairs:
        return None
    w = [0.0] * len(thinking)
    for i, j in pairs:
        slope = 1.0 / (thinking[j] - thinking[i]) / len(pairs)  # (f_j - f_i) / (a_j - a_i), either order
        w[j] += slope
        w[i] -= slope
    return w
