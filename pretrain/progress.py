"""Progress on the terminal: steps per second and ETA from train-step time only."""

from __future__ import annotations

import math
import time

from absl import logging


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class ProgressMeter:
    """Steps per second and ETA from train-step time only (compilation, evaluation and
    checkpoint saves are excluded)."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._interval_start = time.perf_counter()
        self._interval_steps = 0
        self._excluded = 0.0
        self._timed_steps = 0
        self._timed_seconds = 0.0
        self._first_interval = True

    def step(self) -> None:
        self._interval_steps += 1

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def end_interval(self, step: int) -> dict[str, float]:
        """Close the interval since the last call: its rate, and the ETA of the whole run."""
        seconds = max(time.perf_counter() - self._interval_start - self._excluded, 1e-9)
        steps = max(self._interval_steps, 1)
        if not self._first_interval:  # the first interval includes compilation
            self._timed_steps += steps
            self._timed_seconds += seconds
        self._first_interval = False
        mean = self._timed_seconds / self._timed_steps if self._timed_steps else seconds / steps
        self._interval_start, self._interval_steps, self._excluded = time.perf_counter(), 0, 0.0
        return {
            "steps_per_second": steps / seconds,
            "eta_seconds": (self.total_steps - step) * mean,
        }


def log_progress(step: int, total_steps: int, summary: dict[str, float], eta: float) -> None:
    logging.info(
        "step %d/%d | loss %.4f | %.1f examples/s | %.2f steps/s | ETA %s",
        step,
        total_steps,
        summary["loss"],
        summary["examples_per_second"],
        summary["steps_per_second"],
        format_duration(eta),
    )
