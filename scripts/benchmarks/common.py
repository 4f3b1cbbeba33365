"""What every benchmark section shares: the result table and timing as ratios within one run."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable


@dataclasses.dataclass
class Table:
    title: str
    what: str  # what was measured, on what, how many runs
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", self.what, "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def interleaved_times(functions: dict[str, Callable[[], object]], runs: int, warmup: int = 1,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each function over `runs` rounds, run in alternation so drift hits all alike.

    `clock=time.process_time` counts this process's CPU seconds: on a machine shared with other
    jobs, wall time mostly measures their load."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for _ in range(runs):
        for name, fn in functions.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median-time ratio of two entries measured in the same interleaved run."""
    return statistics.median(times[numerator]) / statistics.median(times[denominator])


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"
