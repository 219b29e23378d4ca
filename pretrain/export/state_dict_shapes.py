"""Expected PyTorch state dicts as key -> shape tables: builders for the layers every format has,
and the one check that a state dict has exactly those keys and shapes (what a strict
``load_state_dict`` checks), so that a mismatch fails at export time rather than at the user's."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# A shape with None where any size is accepted (a length the caller does not know yet).
Shape = tuple[int | None, ...]
Shapes = dict[str, Shape]
# PyTorch BatchNorm's buffer counting its updates (timm's and open_clip's state dicts carry it).
BATCH_NORM_COUNTER = "num_batches_tracked"
# How many keys of each kind an error message lists.
_LISTED = 8


def linear_shapes(key: str, out_features: int, in_features: int, bias: bool = True) -> Shapes:
    """A torch ``Linear`` named ``key``."""
    shapes: Shapes = {f"{key}.weight": (out_features, in_features)}
    if bias:
        shapes[f"{key}.bias"] = (out_features,)
    return shapes


def norm_shapes(key: str, width: int) -> Shapes:
    """A torch ``LayerNorm`` (or any affine norm) named ``key``."""
    return {f"{key}.weight": (width,), f"{key}.bias": (width,)}


def batch_norm_shapes(key: str, channels: int) -> Shapes:
    """A torch ``BatchNorm2d`` named ``key``, running statistics and counter included."""
    return {
        **norm_shapes(key, channels),
        f"{key}.running_mean": (channels,),
        f"{key}.running_var": (channels,),
        f"{key}.{BATCH_NORM_COUNTER}": (),
    }


def is_batch_norm_counter(key: str) -> bool:
    return key.endswith(f".{BATCH_NORM_COUNTER}")


def _fits(shape: tuple[int, ...], wanted: Shape) -> bool:
    return len(shape) == len(wanted) and all(w is None or s == w for s, w in zip(shape, wanted))


def _listed(keys: list[str]) -> str:
    return f"{keys[:_LISTED]}{'...' if len(keys) > _LISTED else ''}"


def check_state_dict(
    state: Mapping[str, Any],
    expected: Mapping[str, Shape],
    *,
    mismatch: str,
    may_be_missing: Callable[[str], bool] = lambda key: False,
) -> None:
    """Raise ``ValueError`` naming every missing, unexpected and mis-shaped key of ``state``.

    ``mismatch`` opens the message (e.g. "state dict does not match the open_clip config");
    keys for which ``may_be_missing`` is true may be absent.
    """
    missing = sorted(key for key in set(expected) - set(state) if not may_be_missing(key))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{key}: {tuple(np.shape(state[key]))} != {expected[key]}"
        for key in sorted(set(expected) & set(state))
        if not _fits(tuple(np.shape(state[key])), expected[key])
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"{mismatch}: missing {_listed(missing)}, unexpected {_listed(unexpected)}, "
            f"wrong shapes {_listed(mis_shaped)}"
        )
