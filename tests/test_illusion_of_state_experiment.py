"""The depth bookkeeping of the illusion-of-state experiment: bounds on the minimum depth, growth and its comparison."""

import numpy as np

from paperzoo.experiments.phenomena import illusion_of_state as exp


def cell(model, group, L, depth, passes):
    return {"model": model, "group": group, "L": L, "depth": depth, "passes": passes}


def metrics(cells, deepest=3, lengths=(4, 12)):
    return {"grid": cells, "deepest": deepest, "lengths": list(lengths), "deep_models": ["transformer"]}


def test_passes_reads_the_interval_against_the_bar():
    assert exp.passes(np.ones(500)) is True
    assert exp.passes(np.r_[np.ones(400), np.zeros(100)]) is False  # 0.8: the interval lies below 0.9
    assert exp.passes(np.r_[np.ones(90), np.zeros(10)]) is None  # 0.9 on 100 words straddles the bar


def test_depth_bounds():
    t = lambda d, p: cell("transformer", "A5", 4, d, p)  # noqa: E731
    assert exp.depth_bounds([t(1, False), t(2, True)], 3) == (2, 2)
    assert exp.depth_bounds([t(1, False), t(2, None), t(3, True)], 3) == (2, 3)
    assert exp.depth_bounds([t(1, False), t(2, False), t(3, False)], 3) == (4, float("inf"))
    assert exp.depth_bounds([t(1, None), t(2, False), t(3, False)], 3) == (1, float("inf"))


def _depths(group, depth_at):
    """Cells as min_depth leaves them: fails below the minimum depth, passes at it (None: no depth passes)."""
    out = []
    for L, d in depth_at.items():
        for depth in range(1, (d or 3) + 1):
            out.append(cell("transformer", group, L, depth, d is not None and depth == d))
    return out


def test_growth_on_the_hard_group_and_against_the_easy_one():
    m = metrics(_depths("A5", {4: 1, 12: None}) + _depths("Z60", {4: 1, 12: 1}))
    assert exp.grows(m, "transformer", "A5") is True
    assert exp.grows(m, "transformer", "Z60") is False
    assert exp.grows_faster(m, "transformer", "A5", "Z60") is True
    same = metrics(_depths("A5", {4: 1, 12: 2}) + _depths("Z60", {4: 1, 12: 2}))
    assert exp.grows(same, "transformer", "A5") is True and exp.grows_faster(same, "transformer", "A5", "Z60") is False
    easy_faster = metrics(_depths("A5", {4: 2, 12: 2}) + _depths("Z60", {4: 1, 12: 3}))
    assert exp.grows(easy_faster, "transformer", "A5") is False
    assert exp.grows_faster(easy_faster, "transformer", "A5", "Z60") is False
    beyond = metrics(_depths("A5", {4: None, 12: None}) + _depths("Z60", {4: 1, 12: 1}))
    assert exp.grows(beyond, "transformer", "A5") is None  # beyond the grid at both lengths: unknown
    assert exp.grows_faster(beyond, "transformer", "A5", "Z60") is None


def test_checks_and_preconditions_read_the_grid():
    cells = _depths("A5", {4: 2, 12: None}) + _depths("Z60", {4: 1, 12: 1})
    for model in ("rnn", "ids4"):
        cells += [cell(model, g, L, 1, True) for g in ("A5", "Z60") for L in (4, 12)]
    m = metrics(cells)
    assert all(v is True for v in exp.preconditions(m).values())
    assert all(v is True for v in exp.checks(m).values())
    cells[-1]["passes"] = False  # one-layer IDS4 fails Z60 at L = 12: not a precondition, not a check on A5
    assert all(v is True for v in exp.checks(metrics(cells)).values())
    assert all(v is True for v in exp.preconditions(metrics(cells)).values())
    marginal = [dict(c, passes=None) if (c["model"], c["group"], c["L"]) == ("transformer", "Z60", 12) else c
                for c in cells]
    assert exp.preconditions(metrics(marginal))["a transformer of the grid's depths learns Z60 at every length "
                                                "(accuracy interval above 90%)"] is None
    no_rnn = [c for c in cells if (c["model"], c["group"], c["L"]) != ("rnn", "A5", 4)]
    rnn_trains = "the one-layer RNN learns A5 at the shortest length (the trainer can train it)"
    assert exp.preconditions(metrics(no_rnn))[rnn_trains] is None
    failing = [dict(c, passes=False) if (c["model"], c["group"], c["L"]) == ("rnn", "A5", 12) else c for c in cells]
    assert exp.checks(metrics(failing))["the one-layer RNN reaches 90% on A5 at every length"] is False
