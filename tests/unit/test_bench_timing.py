"""How `prefix-serve bench` keeps a shared host's slow moments out of its figures: the floor's
rates are the best of several short windows, and `--rounds` keeps each system's fastest run."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from bench.floor import _rate
from bench.w1 import fastest
from bench.w1 import run as run_w1


@dataclass
class Run:
    seconds: float
    tag: int


def test_fastest_calls_every_round_and_keeps_the_quickest() -> None:
    times = iter([3.0, 1.5, 2.0])
    calls: list[int] = []

    def one() -> Run:
        calls.append(1)
        return Run(next(times), len(calls))

    best = fastest(one, 3)
    assert len(calls) == 3
    assert best == Run(1.5, 2)
    with pytest.raises(ValueError, match="at least 1"):
        fastest(one, 0)
    assert len(calls) == 3  # refused before any run


def test_w1_refuses_zero_rounds_before_loading_anything() -> None:
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        run_w1(rounds=0, model="no-such-model", data_dir="/nonexistent")


def test_rate_is_the_best_window_not_the_average() -> None:
    """The first half of the time the work is slow (20 ms a call), then fast (2 ms): one long
    window would average the two; the best window sees the fast rate."""
    start = time.perf_counter()

    def work() -> None:
        time.sleep(0.02 if time.perf_counter() - start < 0.5 else 0.002)

    rate = _rate(work, 1.0, 1.0, windows=5)
    assert 1 / 0.004 < rate <= 1 / 0.002  # calls a second in the fast windows
