r"""Evolving Deeper LLM Thinking (Lee, Fischer, Wu, Marwood, Baluja, Schuurmans, Chen; arXiv:2501.09891).

Many planning tasks cannot be solved formally, but a proposed solution can be
*checked*: a program says how good a travel plan is and which constraints it
breaks. Mind Evolution turns that checker into a search: a genetic algorithm whose
individuals are natural-language solutions, whose fitness comes from the checker,
and whose variation operators are the LLM itself. The LLM is shown parent solutions
together with the checker's textual feedback and writes a child, which it then
refines over a few turns of a "critical conversation" (each turn sees the feedback
on the previous child). Several islands evolve apart; the best solutions migrate
from island to island after every generation, and every few generations the worst
islands are wiped and reseeded with globally good solutions. The search stops as
soon as the checker accepts a solution, or when the budget is spent.

**Fitness and feedback.** The caller's evaluator returns, for a solution $s$,
$(f(s), \text{feedback}(s), \text{solved}(s))$.

**Selection** (paper, §3.2, "Boltzmann tournament selection"): a conversation draws
no parents with probability $\Pr_{\text{no parents}}$ (it then writes a solution
from scratch); otherwise it draws $m$ distinct parents from its island, each draw
with the softmax of the fitnesses

$$ p_i = \frac{\exp(f_i / T)}{\sum_j \exp(f_j / T)} , $$

so the best are likeliest but a mediocre solution keeps a non-negligible chance.

**A generation** on island $k$: $N_{\text{convs}}$ conversations, each with its
parents $P$ and $N_{\text{seq}}$ turns; turn $t$ prompts the LLM with
``render(task, P + [c_1 .. c_{t-1}])`` (every candidate with its score and
feedback) and evaluates the child $c_t$. Every child joins the island's population.
Then the top $N_{\text{emigrate}}$ of island $k$ are copied to island $k+1$
(the islands in a ring), and every $N_{\text{reset interval}}$ generations the
$N_{\text{reset}}$ islands with the lowest mean fitness are emptied and reseeded with
$N_{\text{top}}$ solutions taken from the global top $N_{\text{candidate}}$.

**Baselines** at the same evaluation budget, both with the same ``render``:
best-of-N ($N$ independent solutions from scratch, the best by the evaluator) and
sequential revision (threads of refinement, each turn seeing the thread's earlier
attempts and their feedback).

The paper's hyper-parameters (its Table of settings for TravelPlanner / Natural Plan,
with Gemini 1.5 Flash) are `PAPER` below: 10 generations, 4 islands, 5 conversations
per island, 4 turns per conversation, reset every 3 generations, 2 islands reset,
5 of the top 15 reseed, up to 5 parents, Pr(no parents) = 1/6, 5 emigrants; its
budget is up to 800 candidate solutions per problem. Callers at small scale pass
smaller values (the experiment says which).

Implementation notes and deviations:

- There is no official code (Google DeepMind did not release it); the settings above
  are from the paper's text as we read it and could not be checked against code.
- The number of parents when a conversation has parents is uniform in
  $1..N_{\text{parent}}$ (the paper states the maximum only). Parents are drawn without
  replacement. The temperature $T$ of the softmax is a parameter (1 by default).
- Reset: the paper has the LLM choose $N_{\text{top}}$ *diverse* solutions out of the
  global top $N_{\text{candidate}}$; we take the $N_{\text{top}}$ best distinct
  solutions (no LLM judgement of diversity, which a tiny LM cannot make).
- Within a generation the conversations run in lockstep, so that one batched LLM
  call serves every conversation's turn $t$ (`propose_batch`); parents are chosen from
  the islands as they stand at the start of the generation. Migration and reset
  happen between generations, as in the paper.
- The search stops at the end of the turn in which a solution is accepted, and never
  evaluates more than `max_evaluations` solutions: a turn that would overrun the budget
  runs only as many conversations as the budget has left. Evaluations and LLM samples
  are counted by wrapping the caller's functions, not by arithmetic.
- The method works on text: `Generation.tokens` is empty unless `model`/`tokenizer`
  are given (then the best solution is tokenized and the model's forward passes are
  counted with a hook).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np

from paperzoo.decoding import Generation, count_forward_passes

Evaluation = tuple[float, str, bool]  # (fitness, textual feedback, solved)


@dataclass
class Candidate:
    """One evaluated solution."""

    solution: str
    score: float
    feedback: str
    solved: bool
    island: int = -1
    generation: int = 0


@dataclass(frozen=True)
class MindEvolutionConfig:
    n_gens: int = 10
    n_island: int = 4
    n_convs: int = 5  # conversations per island per generation
    n_seq: int = 4  # turns per conversation
    reset_interval: int = 3  # generations between island resets
    n_reset: int = 2  # islands reset each time
    n_top: int = 5  # solutions that reseed a reset island ...
    n_candidate: int = 15  # ... taken from this many global best
    n_parent: int = 5  # at most this many parents per conversation
    pr_no_parents: float = 1 / 6
    n_emigrate: int = 5
    temperature: float = 1.0  # Boltzmann selection temperature T

    def __post_init__(self):
        for name in ("n_gens", "n_island", "n_convs", "n_seq", "reset_interval", "n_top", "n_candidate", "n_parent",
                     "n_reset", "n_emigrate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, not {value!r}")
        for name in ("n_gens", "n_island", "n_convs", "n_seq", "reset_interval", "n_top", "n_candidate", "n_parent"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 <= self.n_reset < self.n_island:
            raise ValueError(f"n_reset must be in 0..n_island-1, not {self.n_reset}")
        if self.n_emigrate < 0:
            raise ValueError(f"n_emigrate must be >= 0, not {self.n_emigrate}")
        if not 0 <= self.pr_no_parents <= 1:
            raise ValueError(f"pr_no_parents must be a probability in [0, 1], not {self.pr_no_parents}")
        if not self.temperature > 0 or not np.isfinite(self.temperature):
            raise ValueError(f"temperature (of Boltzmann selection) must be a positive finite number, not {self.temperature}")

    @property
    def evaluations_per_generation(self) -> int:
        return self.n_island * self.n_convs * self.n_seq


PAPER = MindEvolutionConfig()


# --------------------------------------------------------------------------- counted caller functions

class _Counted:
    """Wraps the caller's sampler and evaluator and counts what they really do."""

    def __init__(self, propose, evaluate, propose_batch):
        self._propose, self._evaluate, self._propose_batch = propose, evaluate, propose_batch
        self.samples = self.evaluations = self.llm_calls = 0
        self.first_solved: int | None = None  # the evaluation (1-based) that first accepted a solution

    def sample(self, prompts: Sequence[str]) -> list[str]:
        if not prompts:
            return []
        if self._propose_batch is not None:
            out = list(self._propose_batch(list(prompts)))
        elif len(set(prompts)) == 1:
            out = list(self._propose(prompts[0], len(prompts)))
        else:
            out = [s for p in prompts for s in self._propose(p, 1)]
        self.llm_calls += 1
        if len(out) != len(prompts):
            raise ValueError(f"the proposer returned {len(out)} solutions for {len(prompts)} requests")
        self.samples += len(out)
        return out

    def evaluate(self, solution: str) -> Evaluation:
        score, feedback, solved = self._evaluate(solution)
        self.evaluations += 1
        if solved and self.first_solved is None:
            self.first_solved = self.evaluations
        score = float(score)
        if np.isnan(score):
            raise ValueError("the evaluator returned a NaN fitness")
        return score, str(feedback), bool(solved)


# --------------------------------------------------------------------------- the genetic operators

def boltzmann_probabilities(scores: Sequence[float], temperature: float = 1.0) -> np.ndarray:
    """p_i = exp(f_i / T) / sum_j exp(f_j / T): [n] -> [n] (stable; -inf gets probability 0)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, not {temperature}")
    f = np.asarray(scores, dtype=np.float64) / temperature
    if f.size == 0:
        raise ValueError("cannot select from an empty population")
    if not np.isfinite(f.max()):
        raise ValueError("the best fitness must be finite")
    w = np.exp(f - f.max())
    return w / w.sum()


def select_parents(population: Sequence[Candidate], config: MindEvolutionConfig,
                   rng: np.random.Generator) -> list[Candidate]:
    """Boltzmann tournament: none with Pr_no_parents, else m ~ U{1..N_parent} distinct parents by p_i."""
    if not population or rng.random() < config.pr_no_parents:
        return []
    m = int(rng.integers(1, min(config.n_parent, len(population)) + 1))
    p = boltzmann_probabilities([c.score for c in population], config.temperature)
    m = min(m, int((p > 0).sum()))
    idx = rng.choice(len(population), size=m, replace=False, p=p)
    return [population[i] for i in idx]


def _top(population: Sequence[Candidate], n: int) -> list[Candidate]:
    """The n best candidates with distinct solutions (stable: earlier ones win ties)."""
    seen, out = set(), []
    for c in sorted(population, key=lambda c: -c.score):
        if c.solution not in seen:
            seen.add(c.solution)
            out.append(c)
        if len(out) == n:
            break
    return out


def migrate(islands: list[list[Candidate]], n_emigrate: int) -> int:
    """Copy the top `n_emigrate` of island k to island k+1 (a ring), all from the pre-migration state."""
    if isinstance(n_emigrate, bool) or not isinstance(n_emigrate, int) or n_emigrate < 0:
        raise ValueError(f"n_emigrate must be an integer >= 0, not {n_emigrate!r}")
    if len(islands) < 2 or n_emigrate == 0:
        return 0
    emigrants = [_top(island, n_emigrate) for island in islands]
    moved = 0
    for k, group in enumerate(emigrants):
        target = islands[(k + 1) % len(islands)]
        present = {c.solution for c in target}
        for c in group:
            if c.solution not in present:
                target.append(Candidate(c.solution, c.score, c.feedback, c.solved, (k + 1) % len(islands),
                                        c.generation))
                moved += 1
    return moved


def reset_islands(islands: list[list[Candidate]], config: MindEvolutionConfig) -> list[int]:
    """Empty the n_reset islands of lowest mean fitness; reseed each with the N_top best of the global top."""
    if config.n_reset == 0:
        return []
    means = [np.mean([c.score for c in isl]) if isl else -np.inf for isl in islands]
    worst = sorted(range(len(islands)), key=lambda k: (means[k], k))[: config.n_reset]
    pool = _top([c for isl in islands for c in isl], config.n_candidate)
    seeds = pool[: config.n_top]
    for k in worst:
        islands[k] = [Candidate(c.solution, c.score, c.feedback, c.solved, k, c.generation) for c in seeds]
    return worst


# --------------------------------------------------------------------------- the searches

def _check_budget(max_evaluations: int | None, name: str = "max_evaluations") -> None:
    if max_evaluations is not None and (isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int)
                                        or max_evaluations < 1):
        raise ValueError(f"{name} must be an integer >= 1, not {max_evaluations!r}")


def _check_callables(**functions) -> None:
    """The caller's functions are callable (propose_batch may be None)."""
    for name, f in functions.items():
        if not callable(f) and not (name == "propose_batch" and f is None):
            raise ValueError(f"{name} must be callable, not {type(f).__name__}")


def _result(best: Candidate | None, counted: _Counted, start: float, passes, model, tokenizer, stats: dict) -> Generation:
    if best is None:
        raise ValueError("no solution was evaluated")
    tokens = tokenizer(best.solution, add_special_tokens=False)["input_ids"] if tokenizer is not None else []
    return Generation(tokens, best.solution, passes.count if model is not None else 0, time.perf_counter() - start, {
        "solved": best.solved, "best_score": best.score, "feedback": best.feedback,
        "evaluations": counted.evaluations, "llm_generations": counted.samples, "llm_calls": counted.llm_calls,
        "first_solved_at": counted.first_solved,
        **stats,
    })


def mind_evolution(task, propose: Callable[[str, int], list[str]], evaluate: Callable[[str], Evaluation],
                   render: Callable[[object, list[Candidate]], str], config: MindEvolutionConfig = PAPER,
                   max_evaluations: int | None = None, seed: int = 0,
                   propose_batch: Callable[[list[str]], list[str]] | None = None,
                   model=None, tokenizer=None) -> Generation:
    """Mind Evolution on one task; returns the best solution found, with the search's statistics.

    `propose(prompt, n)` samples n solutions for one prompt (`propose_batch(prompts)`,
    when given, one solution per prompt in a single call); `evaluate(solution)` returns
    (fitness, feedback, solved); `render(task, candidates)` writes the prompt from the
    parents and earlier turns (an empty list: solve from scratch).
    """
    _check_budget(max_evaluations)
    if not isinstance(config, MindEvolutionConfig):
        raise ValueError(f"config must be a MindEvolutionConfig, not {type(config).__name__}")
    _check_callables(propose=propose, evaluate=evaluate, render=render, propose_batch=propose_batch)
    budget = config.n_gens * config.evaluations_per_generation if max_evaluations is None else max_evaluations
    counted = _Counted(propose, evaluate, propose_batch)
    rng = np.random.default_rng(seed)
    islands: list[list[Candidate]] = [[] for _ in range(config.n_island)]
    best, history, resets, migrations, parents_used = None, [], [], 0, []
    generation = 0
    start = time.perf_counter()
    with count_forward_passes(model) if model is not None else nullcontext() as passes:
        for generation in range(1, config.n_gens + 1):
            # parents are drawn from the islands as they stand at the start of the generation
            convs = [(k, select_parents(islands[k], config, rng))
                     for k in range(config.n_island) for _ in range(config.n_convs)]
            contexts = [list(parents) for _, parents in convs]
            parents_used += [len(p) for _, p in convs]
            solved = False
            for _turn in range(config.n_seq):
                room = budget - counted.evaluations
                if room <= 0:
                    break
                active = list(range(min(room, len(convs))))
                children = counted.sample([render(task, list(contexts[i])) for i in active])
                for i, solution in zip(active, children):
                    score, feedback, ok = counted.evaluate(solution)
                    k = convs[i][0]
                    child = Candidate(solution, score, feedback, ok, k, generation)
                    islands[k].append(child)
                    contexts[i].append(child)
                    if best is None or score > best.score or (ok and not best.solved):
                        best = child
                    solved = solved or ok
                if solved:
                    break
            history.append(best.score if best is not None else None)
            if solved or counted.evaluations >= budget:
                break
            migrations += migrate(islands, config.n_emigrate)
            if generation % config.reset_interval == 0:
                resets.append(reset_islands(islands, config))
        stats = {"method": "mind-evolution", "generations": generation, "fitness_history": history,
                 "budget": budget, "migrated": migrations, "resets": resets,
                 "mean_parents": float(np.mean(parents_used)) if parents_used else 0.0,
                 "island_sizes": [len(i) for i in islands], "config": asdict(config)}
        return _result(best, counted, start, passes, model, tokenizer, stats)


def best_of_n(task, propose, evaluate, render, n: int, propose_batch=None, model=None, tokenizer=None) -> Generation:
    """N independent solutions from scratch, each evaluated; the best by fitness is returned."""
    _check_budget(n, "n")
    _check_callables(propose=propose, evaluate=evaluate, render=render, propose_batch=propose_batch)
    counted = _Counted(propose, evaluate, propose_batch)
    start = time.perf_counter()
    best, history = None, []
    with count_forward_passes(model) if model is not None else nullcontext() as passes:
        for solution in counted.sample([render(task, [])] * n):
            score, feedback, ok = counted.evaluate(solution)
            if best is None or score > best.score or (ok and not best.solved):
                best = Candidate(solution, score, feedback, ok)
            history.append(best.score)
        return _result(best, counted, start, passes, model, tokenizer,
                       {"method": "best-of-n", "fitness_history": history, "budget": n})


def sequential_revision(task, propose, evaluate, render, budget: int, threads: int = 1, propose_batch=None,
                        model=None, tokenizer=None) -> Generation:
    """`threads` chains of revisions in lockstep; turn t of a chain sees all its earlier attempts with feedback.

    Stops at the end of the turn in which a solution is accepted, or after `budget` evaluations.
    """
    _check_budget(budget, "budget")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, not {threads!r}")
    _check_callables(propose=propose, evaluate=evaluate, render=render, propose_batch=propose_batch)
    counted = _Counted(propose, evaluate, propose_batch)
    start = time.perf_counter()
    chains: list[list[Candidate]] = [[] for _ in range(threads)]
    best, history, turns = None, [], 0
    with count_forward_passes(model) if model is not None else nullcontext() as passes:
        while counted.evaluations < budget:
            active = list(range(min(threads, budget - counted.evaluations)))
            children = counted.sample([render(task, list(chains[i])) for i in active])
            turns += 1
            solved = False
            for i, solution in zip(active, children):
                score, feedback, ok = counted.evaluate(solution)
                child = Candidate(solution, score, feedback, ok, i, turns)
                chains[i].append(child)
                if best is None or score > best.score or (ok and not best.solved):
                    best = child
                solved = solved or ok
            history.append(best.score)
            if solved:
                break
        return _result(best, counted, start, passes, model, tokenizer,
                       {"method": "sequential-revision", "fitness_history": history, "turns": turns,
                        "threads": threads, "budget": budget})


__all__ = ["PAPER", "Candidate", "MindEvolutionConfig", "best_of_n", "boltzmann_probabilities", "migrate",
           "mind_evolution", "reset_islands", "select_parents", "sequential_revision"]
