"""Reversed block-wise masking: exact counts, determinism, blockiness and centre/border balance.

Blockiness is measured by the number of "boundary edges" (4-neighbour pairs where one patch is
kept and the other masked) and compared with uniformly random kept sets of the same size drawn
here; balance by the per-position keep frequency over many masks, centre vs border.
"""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.data.masking import (
    block_mask,
    num_kept,
    reversed_block_mask,
    reversed_block_mask_indices,
)

GRIDS = [(14, 14), (7, 7), (16, 16), (12, 20)]
RATIOS = [0.4, 0.5]


def boundary_edges(kept: np.ndarray) -> int:
    """Number of 4-neighbour pairs with one patch kept and the other masked."""
    return int((kept[1:] != kept[:-1]).sum() + (kept[:, 1:] != kept[:, :-1]).sum())


def uniform_kept_map(rng: np.random.Generator, grid: tuple[int, int], keep: int) -> np.ndarray:
    kept = np.zeros(grid[0] * grid[1], dtype=bool)
    kept[rng.choice(kept.size, size=keep, replace=False)] = True
    return kept.reshape(grid)


def keep_frequency(grid, mask_ratio, num_samples, reverse_probability=0.5):
    total = np.zeros(grid)
    for seed in range(num_samples):
        kept, _ = reversed_block_mask(
            np.random.default_rng(seed), grid, mask_ratio, reverse_probability=reverse_probability
        )
        total += kept
    return total / num_samples


def centre_and_border(frequency: np.ndarray) -> tuple[float, float]:
    """Mean over the central half of the grid, and over the outer ring two patches wide."""
    rows, columns = frequency.shape
    centre = frequency[rows // 4 : rows - rows // 4, columns // 4 : columns - columns // 4]
    ring = np.ones(frequency.shape, dtype=bool)
    ring[2:-2, 2:-2] = False
    return float(centre.mean()), float(frequency[ring].mean())


def test_num_kept():
    assert num_kept((14, 14), 0.4) == 196 - 78
    assert num_kept((14, 14), 0.5) == 98
    assert num_kept((16, 16), 0.4) == 256 - 102  # 102.4 rounds to 102
    assert num_kept((14, 14), 0.0) == 196
    assert num_kept((14, 14), 1.0) == 0
    with pytest.raises(ValueError, match="mask_ratio"):
        num_kept((14, 14), 1.5)


@pytest.mark.parametrize("mask_ratio", RATIOS)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_exact_count_sorted_unique_in_range(grid, mask_ratio):
    expected = num_kept(grid, mask_ratio)
    reversed_seen = set()
    for seed in range(300):
        rng = np.random.default_rng(seed)
        indices = reversed_block_mask_indices(rng, grid, mask_ratio)
        assert indices.dtype == np.int32
        assert indices.shape == (expected,)
        assert np.all(np.diff(indices) > 0), "sorted and unique"
        assert indices[0] >= 0 and indices[-1] < grid[0] * grid[1]
        _, reverse = reversed_block_mask(np.random.default_rng(seed), grid, mask_ratio)
        reversed_seen.add(reverse)
    assert reversed_seen == {True, False}


@pytest.mark.parametrize("num_covered", [0, 1, 5, 9])
def test_block_mask_exact_when_no_rectangle_fits(num_covered):
    """A 3x3 grid holds no 16-patch rectangle: the count comes from growth alone, connected."""
    covered = block_mask(np.random.default_rng(num_covered), (3, 3), num_covered)
    assert covered.sum() == num_covered
    if num_covered > 1:
        # Grown from one seed patch by adding neighbours: every patch touches another one.
        padded = np.pad(covered, 1)
        neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        assert np.all(neighbours[covered] >= 1)


def test_extreme_ratios():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(reversed_block_mask_indices(rng, (5, 6), 0.0), np.arange(30))
    assert reversed_block_mask_indices(rng, (5, 6), 1.0).shape == (0,)


def test_deterministic_per_seed_and_seed_dependent():
    draw = lambda seed: reversed_block_mask_indices(np.random.default_rng(seed), (14, 14), 0.4)
    for seed in range(20):
        np.testing.assert_array_equal(draw(seed), draw(seed))
    distinct = {tuple(draw(seed)) for seed in range(50)}
    assert len(distinct) > 45


@pytest.mark.parametrize("mask_ratio", RATIOS)
@pytest.mark.parametrize("grid", [(14, 14), (16, 16)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_kept_sets_are_blocky_not_uniform(grid, mask_ratio):
    num_samples = 400
    keep = num_kept(grid, mask_ratio)
    ours = [
        boundary_edges(reversed_block_mask(np.random.default_rng(seed), grid, mask_ratio)[0])
        for seed in range(num_samples)
    ]
    rng = np.random.default_rng(12345)
    uniform = [boundary_edges(uniform_kept_map(rng, grid, keep)) for _ in range(num_samples)]
    # Measured on 14x14 at ratio 0.4: ~39 boundary edges against ~175 for uniform subsets.
    assert np.mean(ours) < 0.35 * np.mean(uniform), (np.mean(ours), np.mean(uniform))
    # Not just on average: nearly every mask is far blockier than a typical uniform one.
    assert np.mean(np.asarray(ours) < np.min(uniform)) > 0.95


@pytest.mark.parametrize("mask_ratio", RATIOS)
def test_reversal_balances_centre_and_border(mask_ratio):
    """Plain block masking keeps the border far more than the centre; reversal evens it out."""
    grid, num_samples = (14, 14), 1500
    keep_fraction = num_kept(grid, mask_ratio) / (grid[0] * grid[1])
    centre, border = centre_and_border(keep_frequency(grid, mask_ratio, num_samples))
    plain_centre, plain_border = centre_and_border(
        keep_frequency(grid, mask_ratio, num_samples, reverse_probability=0.0)
    )
    # Measured: ratio 0.5 -> 0.50 vs 0.50 (plain 0.24 vs 0.70); ratio 0.4 -> 0.62 vs 0.58
    # (plain 0.36 vs 0.78). At 0.4 the reversed blocks cover 60% and the plain ones 40%, so the
    # two centre biases cancel only approximately.
    assert abs(centre - border) < 0.06, (centre, border)
    assert plain_border - plain_centre > 0.3, (plain_centre, plain_border)
    assert abs(0.5 * (centre + border) - keep_fraction) < 0.03


def test_reverse_probability_is_about_one_half():
    num_samples = 2000
    reversals = sum(
        reversed_block_mask(np.random.default_rng(seed), (14, 14), 0.4)[1]
        for seed in range(num_samples)
    )
    # Binomial(2000, 0.5): standard deviation ~22; allow ~4.5 sigma.
    assert abs(reversals - num_samples / 2) < 100
    # In the reversed case the kept patches are the blocks: mostly one compact piece.
    assert all(
        reversed_block_mask(np.random.default_rng(s), (14, 14), 0.4, reverse_probability=1.0)[1]
        for s in range(10)
    )


def test_small_target_is_one_compact_piece():
    """16 patches on a 32x32 grid: one rectangle (plus a few grown patches) fills its box."""
    for seed in range(50):
        covered = block_mask(np.random.default_rng(seed), (32, 32), 16)
        assert covered.sum() == 16
        rows = np.flatnonzero(covered.any(axis=1))
        columns = np.flatnonzero(covered.any(axis=0))
        box = (np.ptp(rows) + 1) * (np.ptp(columns) + 1)
        assert 16 / box >= 0.6, (seed, box)
