"""Reversed block-wise masking (paper 004, Sec. 2.2) with an exact number of kept patches.

Paper 004 "first generates a mask with block-wise masking [BEiT] and then randomly reverses the
mask with a probability of 0.5": plain block masking covers the centre of the image more often than
the border (a rectangle placed anywhere covers the centre more often), so the border patches
would be trained more; reversing half of the masks balances the two.

BEiT's generator draws rectangles (area >= ``min_block_patches``, aspect ratio log-uniform in
``aspect_range``) until a target count is covered; it rejects a rectangle that would overshoot,
and gives up (undershoots) after ten failed tries in a row. A batch under ``jit`` needs the same
number of kept patches in every image, so here:

1. the coin is flipped first. Reversed: the blocks mark the KEPT patches and must cover exactly
   ``num_keep``. Not reversed: the blocks mark the MASKED patches and cover ``N - num_keep``;
2. rectangles are drawn as in BEiT (never overshooting the target);
3. any shortfall is filled by growing the covered region from its boundary: each added patch is
   one of the uncovered patches with the most covered 4-neighbours (ties broken at random), so
   the region stays compact (concavities fill first) instead of gaining scattered patches.

Everything is NumPy and deterministic given the ``np.random.Generator``; it runs inside the grain
data workers, which derive one generator per example.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "block_mask",
    "num_kept",
    "reversed_block_mask",
    "reversed_block_mask_indices",
]

# BEiT's MaskingGenerator: ten tries to place one more rectangle before giving up.
_MAX_TRIES_PER_BLOCK = 10


def num_kept(grid: tuple[int, int], mask_ratio: float) -> int:
    """Number of kept patches: ``N - round(N * mask_ratio)`` for ``N = rows * columns``."""
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    num_patches = int(grid[0]) * int(grid[1])
    return num_patches - round(num_patches * mask_ratio)


def _place_rectangles(
    rng: np.random.Generator,
    covered: np.ndarray,
    target: int,
    min_block_patches: int,
    log_aspect_range: tuple[float, float],
) -> int:
    """Add BEiT-style rectangles to ``covered`` (in place) without exceeding ``target``.

    Returns the number of covered patches. Stops when the target is met or when
    ``_MAX_TRIES_PER_BLOCK`` rectangles in a row would add nothing or too much.
    """
    rows, columns = covered.shape
    count = int(covered.sum())
    while count < target:
        remaining = target - count
        added = 0
        for _ in range(_MAX_TRIES_PER_BLOCK):
            area = rng.uniform(min_block_patches, max(min_block_patches, remaining))
            aspect = math.exp(rng.uniform(*log_aspect_range))
            height = round(math.sqrt(area * aspect))
            width = round(math.sqrt(area / aspect))
            if not (1 <= height <= rows and 1 <= width <= columns):
                continue
            top = int(rng.integers(0, rows - height + 1))
            left = int(rng.integers(0, columns - width + 1))
            window = covered[top : top + height, left : left + width]
            new = height * width - int(window.sum())
            if 0 < new <= remaining:
                window[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return count


def _covered_neighbour_counts(covered: np.ndarray) -> np.ndarray:
    """For every patch, how many of its (up to four) grid neighbours are covered."""
    padded = np.pad(covered, 1).astype(np.int8)
    return padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]


def _grow_to(rng: np.random.Generator, covered: np.ndarray, target: int) -> None:
    """Add patches adjacent to ``covered`` (in place) until exactly ``target`` are covered."""
    count = int(covered.sum())
    while count < target:
        if count == 0:
            seed = int(rng.integers(0, covered.size))
            covered.flat[seed] = True
            count = 1
            continue
        neighbours = np.where(covered, -1, _covered_neighbour_counts(covered))
        # A non-empty, non-full region on a grid always has an uncovered 4-neighbour.
        candidates = np.flatnonzero(neighbours == neighbours.max())
        covered.flat[candidates[int(rng.integers(0, candidates.size))]] = True
        count += 1


def block_mask(
    rng: np.random.Generator,
    grid: tuple[int, int],
    num_covered: int,
    min_block_patches: int = 16,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """A (rows, columns) boolean map with exactly ``num_covered`` True patches, in blocks."""
    rows, columns = int(grid[0]), int(grid[1])
    if not 0 <= num_covered <= rows * columns:
        raise ValueError(f"cannot cover {num_covered} of {rows * columns} patches")
    low, high = aspect_range
    if not 0 < low <= high:
        raise ValueError(f"aspect_range must be 0 < low <= high, got {aspect_range}")
    covered = np.zeros((rows, columns), dtype=bool)
    _place_rectangles(
        rng, covered, num_covered, max(1, int(min_block_patches)), (math.log(low), math.log(high))
    )
    _grow_to(rng, covered, num_covered)
    return covered


def reversed_block_mask(
    rng: np.random.Generator,
    grid: tuple[int, int],
    mask_ratio: float,
    reverse_probability: float = 0.5,
    min_block_patches: int = 16,
    aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
) -> tuple[np.ndarray, bool]:
    """The (rows, columns) boolean map of KEPT patches and whether the blocks were reversed.

    Reversed (probability ``reverse_probability``): the blocks are the kept patches. Otherwise
    the blocks are the masked patches and the kept ones are their complement. Either way exactly
    :func:`num_kept` patches are kept.
    """
    keep = num_kept(grid, mask_ratio)
    num_patches = int(grid[0]) * int(grid[1])
    reverse = bool(rng.random() < reverse_probability)
    blocks = block_mask(
        rng,
        grid,
        keep if reverse else num_patches - keep,
        min_block_patches=min_block_patches,
        aspect_range=aspect_range,
    )
    return (blocks if reverse else ~blocks), reverse


def reversed_block_mask_indices(
    rng: np.random.Generator,
    grid: tuple[int, int],
    mask_ratio: float,
    reverse_probability: float = 0.5,
) -> np.ndarray:
    """Sorted int32 row-major indices of the patches :func:`reversed_block_mask` keeps (default
    blocks), exactly ``num_kept(grid, mask_ratio)`` of them: a fixed shape for batching."""
    kept, _ = reversed_block_mask(rng, grid, mask_ratio, reverse_probability)
    return np.flatnonzero(kept.ravel()).astype(np.int32)
