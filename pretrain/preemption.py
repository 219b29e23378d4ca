"""SIGTERM as a request to save a checkpoint and stop, for single-process runs."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from absl import logging


class PreemptionWatcher:
    """Turns SIGTERM into a flag the loop checks once per step (then it saves and exits).

    Single-process runs only: with several processes each would see the signal at a different
    step, and the collective save needs one agreed step. There JAX's preemption service (started
    by ``jax.distributed.initialize``, with its own SIGTERM handler) agrees on the step, read
    through ``Checkpointer.reached_preemption``.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        single_process = jax.process_count() == 1
        if single_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint before exiting")
        self.requested = True

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
