"""Chain of Thought Empowers Transformers to Solve Inherently Serial Problems (Li, Liu, Zhou, Ma; arXiv:2402.12875).

**The idea.** A transformer of constant depth computes in a constant number of parallel
rounds. Without a chain of thought, a constant-depth transformer with constant-bit
precision can only solve problems in AC0 (Theorem 3.1: constant-depth, polynomial-size
circuits of unbounded fan-in AND/OR gates). With T steps of chain of thought, a
constant-depth transformer with constant precision and O(log n) embedding size can
simulate any boolean circuit of size T (Theorem 3.3), so polynomially many steps reach
P/poly. Each written token is one more serial round: the model reads its own last state
and applies one step. The paper's experiments train transformers of depth 1-4 from
scratch, with and without intermediate steps, on modular addition (a parallel task),
permutation composition in S5, iterated squaring and the circuit value problem, and
report that CoT "dramatically improves the accuracy for tasks that are hard for parallel
computation ... especially for low-depth transformers" (abstract; Sec. 5).

**What is built.** The two formats of the word problem of a finite group
(`paperzoo.core.tasks.GroupWordProblem`): permutation composition in S5 (the composition
of a non-solvable group, Barrington's NC1-complete case) and its parallel control,
addition modulo p (the cyclic group Z_p):

- *chain of thought* (``"cot"``): ``g_1 s_1 g_2 s_2 ... g_L s_L`` where s_t = g_1 ... g_t;
  at test time the model writes every state itself (`chain_right`, greedy), so the
  answer at length l is right only if its own chain got there;
- *answer only* (``"answer"``): ``<start> g_1 ... g_l s_l``, one model per length l, as in
  the paper, so the product of l elements is computed inside the model's fixed depth
  (`answer_right`).

`cot_gap(config, group_name, L, lengths, training, seed)` trains one chain model on words
of length L and one answer-only model per length in `lengths`, and tests them all on the
prefixes of the same held-out words.

*A curriculum for the answer-only models* (`IdentityPaddedWords`, ``cot_gap(...,
curriculum=True)``). With the final answer as the only signal, even the parallel word
problem is hard for gradient descent: the sum of l elements of Z_7 is independent of every
proper subset of them, like parity, and a one-layer model trained on answer-only words of
Z_7 stayed at chance at length 8 (2,000 and 5,000 steps, batch 64 and 256; seed 0) while it
learned length 4. `IdentityPaddedWords` keeps the answer-only format at length l but draws,
for each word, a number k uniform in 1..l of positions that carry a uniform group element;
the others hold the identity, so the answer is the product of k elements and short products
teach the long ones. Only the final answer is supervised (no intermediate state is shown or
scored), so it stays an answer-only model; it is tested on full words (every position
uniform). The same curriculum is used for every group. With it the Z_7 model reached
0.95-0.99 at length 8 in 6,000 steps (seeds 1 and 2), but stayed at chance at length 16
(6,000 steps). `chain_training` lets the chain model train for fewer steps than the
answer-only ones (it learns the one-step rule far sooner).

**Deviations.** Iterated squaring and the circuit value problem are not built (the
word problems carry the serial-versus-parallel contrast, and they are the review's
suggested test); the models are tiny HF Llama decoders (rotary positions, RMSNorm,
SwiGLU) rather than the paper's GPT-2-style ones, in floating point rather than the
theorems' constant precision; the answer-only models may train with the curriculum above,
which the paper does not describe (its Sec. 5 text could not be read from this machine). A
single no-chain model trained on every prefix at once (the Illusion of State's format) was
tried first and dropped: the loss of the long, unlearnable prefixes drowned the short ones, and it
did not even learn one product.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from paperzoo.core.tasks import (Group, GroupWordProblem, TaskBatch, TaskModelConfig, TaskTraining, group,
                                 train_on_task)


@dataclass(frozen=True)
class IdentityPaddedWords:
    """Answer-only words ``<start> g_1 .. g_L s_L`` in which k ~ U{1..L} random positions hold a uniform element.

    The other positions hold the identity (element 0), so s_L is the product of the k drawn
    elements in order: a curriculum over the number of factors inside the fixed answer-only
    format of `GroupWordProblem` (same tokens, same scored position; only s_L is scored).
    """

    group_name: str
    L: int

    @cached_property
    def words(self) -> GroupWordProblem:
        return GroupWordProblem(self.group_name, self.L, "answer")

    @property
    def vocab_size(self) -> int:
        return self.words.vocab_size

    @property
    def length(self) -> int:
        return self.words.length

    def sample(self, n: int, seed: int) -> TaskBatch:
        g = torch.Generator().manual_seed(int(seed))
        G = self.words.group
        elements = torch.randint(0, G.order, (n, self.L), generator=g)
        k = torch.randint(1, self.L + 1, (n, 1), generator=g)
        rank = torch.rand(n, self.L, generator=g).argsort(dim=1).argsort(dim=1)  # a random order of the positions
        elements = elements.masked_fill(rank >= k, 0)  # all but k positions hold the identity
        product = self.words.prefix_products(elements)[:, -1:] + G.order
        tokens = torch.cat([torch.full((n, 1), self.words.start), elements, product], dim=1)
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, -1] = True
        return TaskBatch(tokens, scored)


def _tokens(group: Group, words: torch.Tensor) -> torch.Tensor:
    return torch.full((len(words), 1), 2 * group.order)  # the start token of GroupWordProblem


@torch.no_grad()
def chain_right(model, group: Group, words: torch.Tensor) -> torch.Tensor:
    """[n, L] bool: after g_l the model's own (greedy) chain holds the true state s_l, for each length l.

    `words` [n, L] are element indices; every state token is the model's own prediction,
    so an early mistake carries forward exactly as in a generated chain.
    """
    true_states = GroupWordProblem(group.name, words.shape[1]).prefix_products(words) + group.order
    model.eval()
    written = torch.empty(len(words), 0, dtype=torch.long)
    for t in range(words.shape[1]):
        written = torch.cat([written, words[:, t:t + 1]], dim=1)
        state = model(input_ids=written).logits[:, -1].argmax(-1)
        written = torch.cat([written, state[:, None]], dim=1)
    return written[:, 1::2] == true_states


@torch.no_grad()
def answer_right(model, group: Group, words: torch.Tensor) -> torch.Tensor:
    """[n] bool: an answer-only model's prediction after ``<start> g_1 .. g_l`` is the product g_1 .. g_l."""
    product = GroupWordProblem(group.name, words.shape[1]).prefix_products(words)[:, -1] + group.order
    model.eval()
    prediction = model(input_ids=torch.cat([_tokens(group, words), words], dim=1)).logits[:, -1].argmax(-1)
    return prediction == product


@dataclass
class CotGap:
    group: str
    chain: torch.Tensor  # [n, L] bool: the chain model's own chain right at each length
    answer: dict[int, torch.Tensor]  # length -> [n] bool: that length's answer-only model, on the same words' prefixes
    train_seconds: dict

    def chain_accuracy(self) -> list[float]:
        return self.chain.float().mean(0).tolist()

    def answer_accuracy(self) -> dict[int, float]:
        return {length: right.float().mean().item() for length, right in self.answer.items()}


def cot_gap(config: TaskModelConfig, group_name: str, L: int, lengths, training: TaskTraining, seed: int = 0,
            n_test: int = 512, curriculum: bool = False, chain_training: TaskTraining | None = None) -> CotGap:
    """A chain model on words of length L and an answer-only model per length in `lengths`, all of `config`.

    Every model trains with `training` on words drawn with `seed` (the chain model with `chain_training`
    when it is given); all are tested on the
    prefixes of the same `n_test` held-out words, drawn with a seed no training pool uses.
    With `curriculum`, the answer-only models train on `IdentityPaddedWords` (still tested on full words);
    `chain_training`, when given, replaces `training` for the chain model.
    """
    if any(not 1 <= length <= L for length in lengths):
        raise ValueError(f"every length must be in 1..{L}, got {list(lengths)}")
    chain_model, history = train_on_task(GroupWordProblem(group_name, L, "cot"), config, chain_training or training,
                                         seed=seed)
    seconds = {"chain": history["seconds"]}
    g = group(group_name)
    words = torch.randint(0, g.order, (n_test, L), generator=torch.Generator().manual_seed(2 * 10**9 + seed))
    answer = {}
    for length in lengths:
        task = IdentityPaddedWords(group_name, length) if curriculum else GroupWordProblem(group_name, length, "answer")
        model, history = train_on_task(task, config, training, seed=seed)
        answer[length] = answer_right(model, g, words[:, :length])
        seconds[f"answer@{length}"] = history["seconds"]
    return CotGap(group_name, chain_right(chain_model, g, words), answer, seconds)
