"""What the torch-side experts share: config fields, the device, batching that shrinks on
out-of-memory, uint8 images -> float tensors. Torch environment only (never imports JAX or
``pretrain``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")
R = TypeVar("R")


def log(message: str) -> None:
    """Everything the server says besides its replies goes to stderr (stdout is the protocol)."""
    print(f"[torch experts] {message}", file=sys.stderr, flush=True)


def expert_fields(
    config: Mapping[str, Any], target: str, defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """``config`` (one target's entry) completed with ``defaults``; ``kind`` and ``weights`` are
    required; a misspelt field is an error naming the fields there are."""
    known = {"kind", "weights", *defaults}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{target}: unknown fields {unknown}; known: {sorted(known)}")
    if not config.get("weights"):
        raise ValueError(f"{target}: 'weights' (a path on disk) is required")
    return {**defaults, **config}


def existing_path(path: str, target: str, *, directory: bool = False) -> Path:
    """``path`` as a Path, or a clear error when it is not there (nothing is ever downloaded)."""
    resolved = Path(path).expanduser()
    ok = resolved.is_dir() if directory else resolved.is_file()
    if not ok:
        kind = "directory" if directory else "file"
        raise FileNotFoundError(f"{target}: weights {kind} not found: {resolved}")
    return resolved


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def image_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 in [0, 1] on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    return tensor.permute(2, 0, 1).float().div_(255.0)


def batched(run: Callable[[Sequence[T]], list[R]], items: Sequence[T], batch_size: int) -> list[R]:
    """``run`` over ``items`` in batches of ``batch_size``; a batch that runs out of accelerator
    memory is retried in halves (down to one item, which then fails for real)."""
    results: list[R] = []
    start = 0
    size = max(1, batch_size)
    while start < len(items):
        chunk = items[start : start + size]
        try:
            results.extend(run(chunk))
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            torch.cuda.empty_cache()
            log(f"out of memory: batch size -> {size}")
            continue
        start += len(chunk)
    return results


def group_by_shape(shapes: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Indices of ``shapes`` grouped by equal shape, in first-seen order (one batch per shape)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return groups
