"""Mind Evolution (2501.09891): selection by hand, the budget, migration, reset, search behaviour, the predicate."""

import math
import random
import re

import numpy as np
import pytest

from paperzoo.core.reasoner import problems, trace, work_line
from paperzoo.decoding.mind_evolution import (
    Candidate,
    MindEvolutionConfig,
    best_of_n,
    boltzmann_probabilities,
    migrate,
    mind_evolution,
    reset_islands,
    select_parents,
    sequential_revision,
)
from paperzoo.experiments.decoding.mind_evolution import (
    EQUATION_TIER,
    check_linear_solution,
    checks,
    choose_budget,
    preconditions,
    render_linear,
)

SMALL = MindEvolutionConfig(n_gens=3, n_island=2, n_convs=2, n_seq=2, reset_interval=2, n_reset=1, n_top=2,
                            n_candidate=4, n_parent=2, n_emigrate=2)


def cand(solution, score, island=0):
    return Candidate(solution, score, "", False, island)


# --------------------------------------------------------------------------- selection

def test_boltzmann_probabilities_by_hand():
    p = boltzmann_probabilities([0.0, math.log(2), math.log(3)])
    assert np.allclose(p, [1 / 6, 2 / 6, 3 / 6])
    # T = 2 halves the exponent: exp(0), exp(ln 4 / 2) = 1, 2
    assert np.allclose(boltzmann_probabilities([0.0, 2 * math.log(2)], temperature=2.0), [1 / 3, 2 / 3])
    assert np.allclose(boltzmann_probabilities([1000.0, 1000.0]), [0.5, 0.5])  # stable for large scores
    assert np.allclose(boltzmann_probabilities([0.0, -np.inf]), [1.0, 0.0])
    with pytest.raises(ValueError):
        boltzmann_probabilities([1.0], temperature=0.0)


def test_select_parents_follows_the_softmax():
    pop = [cand("a", 0.0), cand("b", math.log(3))]
    cfg = MindEvolutionConfig(n_parent=1, pr_no_parents=0.0)
    rng = np.random.default_rng(0)
    picks = [select_parents(pop, cfg, rng) for _ in range(4000)]
    assert all(len(p) == 1 for p in picks)
    share_b = np.mean([p[0].solution == "b" for p in picks])
    assert abs(share_b - 0.75) < 0.03  # exp(ln 3) / (1 + 3)


def test_select_parents_no_parents_probability_and_distinct_parents():
    pop = [cand(str(i), float(i)) for i in range(6)]
    rng = np.random.default_rng(1)
    cfg = MindEvolutionConfig(n_parent=3, pr_no_parents=1 / 6)
    picks = [select_parents(pop, cfg, rng) for _ in range(3000)]
    assert abs(np.mean([len(p) == 0 for p in picks]) - 1 / 6) < 0.025
    sizes = [len(p) for p in picks if p]
    assert set(sizes) == {1, 2, 3}  # m uniform in 1..N_parent
    assert all(len({c.solution for c in p}) == len(p) for p in picks)
    assert select_parents(pop, MindEvolutionConfig(pr_no_parents=1.0), rng) == []
    assert select_parents([], cfg, rng) == []


# --------------------------------------------------------------------------- migration and reset

def test_migration_moves_the_best_around_the_ring():
    islands = [[cand("a", 1.0), cand("b", 5.0)], [cand("c", 0.0), cand("d", -1.0)], [cand("e", 2.0)]]
    moved = migrate(islands, n_emigrate=1)
    assert moved == 3
    assert [c.solution for c in islands[1]] == ["c", "d", "b"]  # island 0's best went to island 1
    assert islands[1][-1].island == 1 and islands[1][-1].score == 5.0
    assert [c.solution for c in islands[2]] == ["e", "c"]  # island 1's best *before* migration
    assert [c.solution for c in islands[0]] == ["a", "b", "e"]
    assert migrate([[cand("x", 1.0)]], 3) == 0  # one island: nowhere to go


def test_reset_reseeds_the_worst_island_with_the_global_best():
    islands = [[cand("a", 1.0), cand("b", 4.0)], [cand("c", -3.0), cand("d", -1.0)], [cand("e", 3.0)]]
    cfg = MindEvolutionConfig(n_island=3, n_reset=1, n_top=2, n_candidate=3)
    assert reset_islands(islands, cfg) == [1]
    assert [c.solution for c in islands[1]] == ["b", "e"]
    assert all(c.island == 1 for c in islands[1])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        MindEvolutionConfig(n_island=2, n_reset=2)
    with pytest.raises(ValueError):
        MindEvolutionConfig(pr_no_parents=1.5)
    with pytest.raises(ValueError):
        MindEvolutionConfig(n_seq=0)


# --------------------------------------------------------------------------- the searches on a toy task

TARGET = 37


def evaluate_number(solution):
    x = int(solution)
    d = x - TARGET
    return -abs(d), ("right" if d == 0 else f"too {'high' if d > 0 else 'low'} by {abs(d)}"), d == 0


def render_number(task, candidates):
    """The prompt lists every candidate with its feedback; a feedback-reading proposer can use it."""
    return task + "".join(f"\n{c.solution}: {c.feedback}" for c in candidates)


def make_hill_climber(seed=0):
    """Reads the best candidate in the prompt and steps towards the target by a random amount."""
    rng = np.random.default_rng(seed)

    def propose(prompt, n):
        lines = re.findall(r"\n(-?\d+): too (high|low) by (\d+)", prompt)
        out = []
        for _ in range(n):
            if not lines:
                out.append(str(int(rng.integers(0, 1000))))
                continue
            x, direction, d = min(lines, key=lambda t: int(t[2]))
            step = int(rng.integers(1, 2 * int(d) + 1)) if int(d) > 1 else 1
            out.append(str(int(x) - step if direction == "high" else int(x) + step))
        return out

    return propose


def test_perfect_proposer_solves_at_generation_one():
    calls = []

    def evaluate(s):
        calls.append(s)
        return evaluate_number(s)

    g = mind_evolution("guess", lambda p, n: [str(TARGET)] * n, evaluate, render_number, SMALL, seed=0)
    assert g.stats["solved"] and g.text == str(TARGET)
    assert g.stats["generations"] == 1 and len(g.stats["fitness_history"]) == 1
    # the first turn of every conversation runs in lockstep; the search stops after it
    assert g.stats["evaluations"] == len(calls) == SMALL.n_island * SMALL.n_convs
    assert g.stats["first_solved_at"] == 1


@pytest.mark.parametrize("budget", [1, 5, 7, 13])
def test_evaluation_budget_is_respected_exactly(budget):
    calls = []

    def never(s):
        calls.append(s)
        return -1.0, "wrong", False

    propose = make_hill_climber()
    g = mind_evolution("t", lambda p, n: ["5"] * n, never, render_number, SMALL, max_evaluations=budget)
    assert g.stats["evaluations"] == len(calls) == g.stats["llm_generations"] == budget
    calls.clear()
    g = sequential_revision("t", propose, never, render_number, budget, threads=3)
    assert g.stats["evaluations"] == len(calls) == budget
    calls.clear()
    g = best_of_n("t", propose, never, render_number, budget)
    assert g.stats["evaluations"] == len(calls) == budget


def test_default_budget_is_the_full_schedule_and_migration_happens():
    g = mind_evolution("t", lambda p, n: ["5"] * n, lambda s: (-1.0, "no", False), render_number, SMALL)
    assert g.stats["evaluations"] == SMALL.n_gens * SMALL.evaluations_per_generation == 24
    assert g.stats["generations"] == 3 and len(g.stats["fitness_history"]) == 3
    assert g.stats["resets"] == [[0]]  # after generation 2, ties broken by island index
    assert g.stats["mean_parents"] > 0


def test_feedback_driven_search_beats_blind_sampling_at_equal_budget():
    """With a proposer that reads feedback, evolution finds the target; best-of-N guessing rarely does."""
    evolved = sum(mind_evolution("t", make_hill_climber(s), evaluate_number, render_number, SMALL,
                                 max_evaluations=24, seed=s).stats["solved"] for s in range(10))
    blind = sum(best_of_n("t", make_hill_climber(s), evaluate_number, render_number, 24).stats["solved"]
                for s in range(10))
    assert evolved >= 8 and blind <= 3


def test_proposer_must_return_one_solution_per_request():
    with pytest.raises(ValueError):
        best_of_n("t", lambda p, n: ["1"], evaluate_number, render_number, 3)
    with pytest.raises(ValueError):
        mind_evolution("t", lambda p, n: ["1"] * n, evaluate_number, render_number, SMALL, max_evaluations=0)


# --------------------------------------------------------------------------- the experiment's checker and predicate

def test_linear_checker_by_hand():
    q = next(p for p in problems(50, "test", tiers=[1]) if "+" in p.question)  # 7(x+12)=742
    a = int(q.question.split("(")[0])
    for k, (work, _) in enumerate(q.paths):  # either path, divide first (2 lines) or expand first (3), scores 3
        c = check_linear_solution(q, trace(q, path=k))
        assert c.solved and c.score == 3.0 and c.verified == tuple(work_line(s) for s in work)
    divide_first = next(work for work, _ in q.paths if work[0].op == "/")
    first = work_line(divide_first[0])
    wrong = f"{first}\nx=1-1: 1-1=0 so 0\n</think>Answer: {q.answer + 1}"
    c = check_linear_solution(q, wrong)
    assert not c.solved and c.verified == (first,)
    assert math.isclose(c.score, 3 * 1 / 2 - math.log1p(a))  # half its path; residual a*((x+1)+d)-c = a
    assert f"too high by {a}" in c.feedback and "should read x=" in c.feedback
    c = check_linear_solution(q, "garbage")
    assert c.score == -10.0 and c.verified == () and "no answer" in c.feedback
    cands = [Candidate(wrong, 1 - math.log1p(a), "", False), Candidate("garbage", -10.0, "", False)]
    assert render_linear(q, cands) == q.prompt + first + "\n"
    assert render_linear(q, []) == q.prompt
    for tier in (EQUATION_TIER - 1, EQUATION_TIER):  # the two-step equations and the chained ones
        for p in problems(20, "test", tiers=[tier]):
            for i in range(3):  # a verbose or reflective trace: the step lines are found, the redone step counts
                for style, (k, (work, _)) in ((s, kw) for s in ("terse", "verbose") for kw in enumerate(p.paths)):
                    c = check_linear_solution(p, trace(p, style, random.Random(i), reflect=True, path=k,
                                                              confirm=i > 0))
                    assert c.solved and c.verified == tuple(work_line(s) for s in work)


def test_linear_checker_verifies_the_chain_in_order():
    q = problems(1, "test", tiers=[EQUATION_TIER])[0]  # 9(x-349)=7319-708+402: two chain steps, then its path
    assert len(q.steps) in (4, 5)
    head, rest = q.steps[0].rsplit(" so ", 1)
    wrong = "\n".join([f"{head} so {int(rest) + 1}", *q.steps[1:]]) + f"\n</think>Answer: {q.answer}"
    c = check_linear_solution(q, wrong)  # a wrong first chain step: nothing after it is verified
    assert c.verified == () and c.solved and f"is not {int(rest) + 1}" in c.feedback
    c = check_linear_solution(q, "\n".join(q.steps[:2]) + "\n</think>Answer: 0")
    assert c.verified == tuple(q.steps[:2]) and "should read" in c.feedback and not c.solved
    with pytest.raises(ValueError, match="linear equation"):
        check_linear_solution(problems(1, "test", tiers=[0])[0], "")


def _solved(rate, n=60):
    k = round(rate * n)
    return [1.0] * k + [0.0] * (n - k)


def test_checks_by_hand():
    m = {"solved_per_problem": {"best-of-n": _solved(0.40), "sequential-revision": _solved(0.50),
                                "mind-evolution": _solved(0.80)}}
    assert all(v is True for v in checks(m).values())
    m = {"solved_per_problem": {"best-of-n": _solved(0.40, 200), "sequential-revision": _solved(0.45, 200),
                                "mind-evolution": _solved(0.45, 200)}}
    assert list(checks(m).values()) == [False, None]  # 5 points above best-of-N: clearly short of the 10
    m["solved_per_problem"]["mind-evolution"] = _solved(0.30, 200)
    assert list(checks(m).values()) == [False, False]
    # a real difference of 10 points that the interval cannot resolve on few problems: undecided
    few = {"solved_per_problem": {"best-of-n": _solved(0.4, 10), "sequential-revision": _solved(0.4, 10),
                                  "mind-evolution": _solved(0.5, 10)}}
    assert list(checks(few).values()) == [None, None]


def test_budget_is_chosen_from_the_baseline_curve():
    curve = [0.1, 0.2, 0.3, 0.45, 0.55, 0.6, 0.7, 0.8]  # best-of-N success within k = 1..8
    assert choose_budget(curve, [2, 4, 6, 8], ceiling=0.6) == 6  # the largest budget at or below the ceiling
    assert choose_budget(curve, [2, 4, 6, 8], ceiling=0.9) == 8
    assert choose_budget(curve, [7, 8], ceiling=0.6) == 7  # above the ceiling everywhere: the smallest
    with pytest.raises(ValueError):
        choose_budget(curve, [9], ceiling=0.6)


def test_preconditions_by_hand():
    m = {"budget": 8, "solved_per_problem": {"best-of-n": _solved(0.6)},
         "calibration": {"solved_at_largest_budget": _solved(0.8, 30)}}
    assert all(v is True for v in preconditions(m).values())
    m["solved_per_problem"]["best-of-n"] = _solved(0.96)  # the earlier ceiling artefact
    assert list(preconditions(m).values()) == [False, True]
    m["calibration"]["solved_at_largest_budget"] = _solved(0.0, 30)
    assert list(preconditions(m).values())[1] is False


def test_searches_name_bad_arguments():
    with pytest.raises(ValueError, match="n must"):
        best_of_n("t", lambda p, n: ["1"] * n, evaluate_number, render_number, 2.5)
    with pytest.raises(ValueError, match="threads"):
        sequential_revision("t", lambda p, n: ["1"] * n, evaluate_number, render_number, 4, threads=0)
    with pytest.raises(ValueError, match="config"):
        mind_evolution("t", lambda p, n: ["1"] * n, evaluate_number, render_number, {"n_gens": 2})
    with pytest.raises(ValueError, match="evaluate"):
        best_of_n("t", lambda p, n: ["1"] * n, None, render_number, 2)
    with pytest.raises(ValueError, match="n_emigrate"):
        migrate([[cand("a", 1.0)], [cand("b", 2.0)]], -1)
    with pytest.raises(ValueError, match="n_gens"):
        MindEvolutionConfig(n_gens=2.5)


def test_lockstep_serves_every_waiting_search_in_one_call_per_round():
    from paperzoo.core.reasoner import reasoner
    from paperzoo.experiments.decoding.mind_evolution import Lockstep

    smoke = reasoner("smoke")
    qs = problems(3, "test", tiers=[EQUATION_TIER])
    calls = []

    def search(j):
        def run(pb):
            got = []
            for turn in range(j + 1):  # search j asks j + 1 times, for j + 1 solutions each
                rendered = [qs[j].prompt + f"{turn}"] * (j + 1)
                out = pb(rendered)
                assert len(out) == j + 1 and all(x.startswith(f"{turn}") for x in out)  # after the prompt
                got.append(out)
            calls.append(j)
            return got
        return run

    lock = Lockstep(smoke.model, smoke.tokenizer, 1.0, 8, seed=0)
    first = lock.run([search(j) for j in range(3)], [q.prompt for q in qs])
    assert lock.rounds == 3  # the longest search's three calls; the others ride along
    assert [len(r) for r in first] == [1, 2, 3] and sorted(calls) == [0, 1, 2]
    again = Lockstep(smoke.model, smoke.tokenizer, 1.0, 8, seed=0).run([search(j) for j in range(3)],
                                                                       [q.prompt for q in qs])
    assert again == first  # reproducible whatever the threads' timing
    other = Lockstep(smoke.model, smoke.tokenizer, 1.0, 8, seed=1).run([search(j) for j in range(3)],
                                                                       [q.prompt for q in qs])
    assert other != first

    def broken(pb):
        pb([qs[0].prompt])
        raise RuntimeError("search 1 failed")

    lock = Lockstep(smoke.model, smoke.tokenizer, 1.0, 8, seed=0)
    with pytest.raises(RuntimeError, match="search 1 failed"):
        lock.run([search(0), broken, search(2)], [q.prompt for q in qs])
    assert lock.rounds == 3  # the other searches were still served to the end
