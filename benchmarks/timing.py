"""The one timing rule the benchmarks share: the best wall time of a few runs (the least disturbed by other work)."""

import time


def best_of(fn, repeats: int = 3) -> float:
    """The shortest wall time, in seconds, of `repeats` calls of `fn`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
