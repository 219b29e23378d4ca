"""Host arrays through a compiled function in batches of one size (one compilation)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def apply_in_batches(
    function: Callable[[np.ndarray], object], inputs: np.ndarray, batch_size: int
) -> np.ndarray:
    """``function`` over the rows of ``inputs`` in calls of leading size ``batch_size``, outputs
    concatenated in order; the last batch is padded by repeating its last row (a valid input for
    any model) and the padding's outputs dropped. No rows: an empty (0,) float32 array."""
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        rows = len(chunk)
        if rows < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - rows, axis=0)])
        outputs.append(np.asarray(function(chunk))[:rows])
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)
