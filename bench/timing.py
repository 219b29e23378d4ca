"""Timing for the benches: warm-up calls, candidates interleaved round-robin, median and spread.

:func:`time_interleaved` calls each candidate (a no-argument callable: a compiled program, a train
step, a forward pass) ``warmup`` times untimed, then runs the timed rounds over all candidates in
turn (round 1 of every candidate, then round 2, ...), so that drifts in machine load hit every
candidate of a ratio alike. A call's time includes waiting for its outputs (``wait``): JAX returns
from a call as soon as the work is dispatched.

Imports only the standard library (JAX only inside :func:`wait_for_jax`), so that the PyTorch-side
scripts in bench/torch_side/ time their calls the same way.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

Key = TypeVar("Key", bound=Hashable)
Wait = Callable[[Any], None]


def wait_for_jax(outputs: Any) -> None:
    """Block until every array in ``outputs`` is computed."""
    import jax  # here: the torch-side scripts import this module where JAX is not installed

    jax.block_until_ready(outputs)


def no_wait(outputs: Any) -> None:
    """For calls that return finished results (PyTorch on CPU, plain Python)."""
    del outputs


@dataclasses.dataclass(frozen=True)
class Timing:
    """The seconds of each timed call of one candidate."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: 0 when every call took as long."""
        spread = max(self.seconds) - min(self.seconds)
        return spread / self.median if spread else 0.0

    def describe(self) -> str:
        """E.g. "median of 5, spread 3%"."""
        return f"median of {len(self.seconds)}, spread {self.spread:.0%}"


def time_call(call: Callable[[], Any], wait: Wait = wait_for_jax) -> tuple[Any, float]:
    """``(outputs, seconds)`` of one call, its outputs waited for."""
    start = time.perf_counter()
    outputs = call()
    wait(outputs)
    return outputs, time.perf_counter() - start


def time_interleaved(
    candidates: Mapping[Key, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 1,
    wait: Wait = wait_for_jax,
) -> dict[Key, Timing]:
    """Each candidate's :class:`Timing` over ``rounds`` timed calls, after ``warmup`` untimed
    calls of each (compilation, first-call allocations); the rounds visit the candidates in turn."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    for _ in range(warmup):
        for call in candidates.values():
            wait(call())
    seconds: dict[Key, list[float]] = {key: [] for key in candidates}
    for _ in range(rounds):
        for key, call in candidates.items():
            seconds[key].append(time_call(call, wait)[1])
    return {key: Timing(tuple(values)) for key, values in seconds.items()}


def time_repeated(
    call: Callable[[], Any], rounds: int, *, warmup: int = 1, wait: Wait = wait_for_jax
) -> Timing:
    """:func:`time_interleaved` of a single candidate."""
    return time_interleaved({"call": call}, rounds, warmup=warmup, wait=wait)["call"]


def medians(timings: Mapping[Key, Timing]) -> dict[Key, float]:
    """Median seconds of each candidate."""
    return {key: measured.median for key, measured in timings.items()}
