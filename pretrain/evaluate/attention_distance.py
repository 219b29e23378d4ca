"""Mean attention distance of a ViT tower, per layer and head (the ViT paper's measure, its Fig. 7;
paper 000's Fig. 3).

Definition. For one image, one layer and one head with attention weights ``a`` (the softmax over
the keys that the tower really attends with, i.e. after any rotary embedding), the attention
distance of a query patch ``q`` is

    d(q) = sum_k a[q, k] * ||pos(q) - pos(k)||        (k over the patches only)

where ``pos`` is the patch's (row, column) on the patch grid times the patch size, in pixels, the
patches in the row-major order in which the tower flattens its grid. The mean attention distance
is d averaged over the query patches of an image, then over the images.

Conventions:

* The prefix tokens (a ViT's class token) are removed from the queries and from the keys. By
  default the weights left on the patch keys are NOT renormalised, as in the public notebooks of
  the ViT paper: weight a query puts on the class token counts as distance 0, so a head that attends
  mostly to the class token has a small distance. ``renormalize=True`` divides each query's patch
  weights by their sum instead (the distance among patches only; undefined, NaN, for a query that
  gives the patches no weight at all).
* Distances are in pixels of the tower's input; any grid, square or not.

The weights come from the ``attention_weights`` collection that ``models.layers.MultiHeadAttention``
sows when it is mutable; this module only applies a given Flax module and reads that collection.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The Flax collection models.layers.MultiHeadAttention sows its weights into, and the entry name.
COLLECTION = "attention_weights"
ENTRY = "weights"
CSV_COLUMNS = ("layer", "head", "mean_distance_px")


def patch_distances(grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """(N, N) float32 Euclidean distances in pixels between the N = rows * cols patches of
    ``grid`` (row-major order), a patch's position being its (row, col) times ``patch_size``."""
    rows, cols = (int(size) for size in grid)
    if rows < 1 or cols < 1 or patch_size < 1:
        raise ValueError(
            f"need a non-empty grid and a positive patch size, got {grid}, {patch_size}"
        )
    row_index, col_index = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    positions = np.stack([row_index.reshape(-1), col_index.reshape(-1)], axis=-1) * patch_size
    offsets = positions[:, None, :] - positions[None, :, :]
    return np.sqrt((offsets.astype(np.float64) ** 2).sum(-1)).astype(np.float32)


def mean_attention_distance(
    weights: Any,
    grid: tuple[int, int],
    patch_size: int,
    *,
    prefix_tokens: int = 1,
    renormalize: bool = False,
) -> jax.Array:
    """(B, heads) mean attention distance in pixels of attention weights ``weights`` (B, heads,
    prefix + N, prefix + N), queries on the second-to-last axis, keys on the last, the first
    ``prefix_tokens`` tokens being the class token(s) and the others the N patches of ``grid``.

    The prefix tokens are dropped from queries and keys; ``renormalize`` (default False) says
    whether the remaining weights are divided by their sum per query (see the module docstring).
    NumPy or JAX input; runs under jit.
    """
    weights = jnp.asarray(weights, jnp.float32)
    num_patches = int(grid[0]) * int(grid[1])
    expected = prefix_tokens + num_patches
    if weights.ndim != 4 or weights.shape[-2:] != (expected, expected):
        raise ValueError(
            f"attention weights of shape {weights.shape}; expected (batch, heads, {expected}, "
            f"{expected}) for {prefix_tokens} prefix token(s) and a {grid[0]}x{grid[1]} grid"
        )
    patch_weights = weights[..., prefix_tokens:, prefix_tokens:]
    if renormalize:
        patch_weights = patch_weights / patch_weights.sum(axis=-1, keepdims=True)
    distances = jnp.asarray(patch_distances(grid, patch_size))
    per_query = jnp.einsum("bhqk,qk->bhq", patch_weights, distances)
    return per_query.mean(axis=-1)


def _natural_key(name: str) -> tuple[tuple[str, int], ...]:
    # "resblocks_10" after "resblocks_9": numbers compare as numbers, not as text.
    parts = re.split(r"(\d+)", name)
    return tuple((text, int(number)) for text, number in zip(parts[0::2], [*parts[1::2], "-1"]))


def _sown_entries(node: Mapping[str, Any], path: tuple[str, ...]) -> Iterator[tuple[tuple, Any]]:
    for name, child in node.items():
        if name == ENTRY and isinstance(child, tuple):
            if len(child) != 1:
                # A module applied twice in one pass (shared weights) is not one layer.
                raise ValueError(
                    f"{'/'.join(path)} recorded {len(child)} attention matrices in one pass; "
                    "expected one per layer"
                )
            yield path, child[0]
        elif isinstance(child, Mapping):
            yield from _sown_entries(child, (*path, name))


def sown_attention_weights(collections: Mapping[str, Any]) -> list[Any]:
    """The attention weights sown in one ``apply(..., mutable=["attention_weights"])``, one
    (B, heads, tokens, tokens) array per attention layer, in depth order.

    ``collections``: the mutated variables ``apply`` returns (or their ``attention_weights``
    entry). Layers are ordered by their module path with numbers compared as numbers, so that
    ``transformer/resblocks_10`` (models.layers.Transformer's names) comes after ``resblocks_9``.
    """
    tree = collections.get(COLLECTION, collections)
    entries = list(_sown_entries(tree, ()))
    entries.sort(key=lambda entry: tuple(_natural_key(name) for name in entry[0]))
    return [weights for _, weights in entries]


class AttentionDistanceAccumulator:
    """Means over images of per-image (layers, B, heads) distances, batch after batch."""

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self.num_images = 0

    def add(self, per_image: Any) -> None:
        """``per_image``: (layers, B, heads) mean attention distances of B images."""
        per_image = np.asarray(per_image, np.float64)
        if per_image.ndim != 3:
            raise ValueError(f"expected (layers, batch, heads), got shape {per_image.shape}")
        batch_sum = per_image.sum(axis=1)
        if self._sum is None:
            self._sum = batch_sum
        elif self._sum.shape != batch_sum.shape:
            raise ValueError(f"(layers, heads) {batch_sum.shape} after {self._sum.shape}")
        else:
            self._sum = self._sum + batch_sum
        self.num_images += per_image.shape[1]

    def result(self) -> np.ndarray:
        """(layers, heads) float64 mean attention distance over all images added."""
        if self._sum is None or not self.num_images:
            raise ValueError("no images were added")
        return self._sum / self.num_images


def attention_distances(
    module: Any,
    variables: Mapping[str, Any],
    images_batches: Iterable[Any],
    *,
    patch_size: int | None = None,
    prefix_tokens: int = 1,
    renormalize: bool = False,
) -> np.ndarray:
    """(layers, heads) mean attention distance in pixels of a ViT tower over all images given.

    ``module``: a Flax ViT tower whose attention layers sow their weights (models.layers), called
    as ``module.apply(variables, images)``; ``variables``: its variables (``params``, ...);
    ``images_batches``: (B, H, W, 3) float images, normalised as the tower expects, any H x W
    divisible by the patch size (``module.patch_size`` unless given). ``prefix_tokens`` and
    ``renormalize`` as in :func:`mean_attention_distance`. Every batch is padded to the first
    one's size, so the jitted pass compiles once per image shape.
    """
    patch_size = int(patch_size or getattr(module, "patch_size", 0))
    if not patch_size:
        raise ValueError(f"{type(module).__name__} has no patch_size; pass patch_size")

    def per_image(variables: Any, images: jax.Array) -> jax.Array:
        grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
        _, collections = module.apply(variables, images, mutable=[COLLECTION])
        layers = sown_attention_weights(collections)
        if not layers:
            raise ValueError(
                f"{type(module).__name__} recorded no attention weights: not a ViT tower of "
                "models/ (its attention must be models.layers.MultiHeadAttention)"
            )
        return jnp.stack(
            [
                mean_attention_distance(
                    weights, grid, patch_size, prefix_tokens=prefix_tokens, renormalize=renormalize
                )
                for weights in layers
            ]
        )

    compute = jax.jit(per_image)
    variables = jax.device_put(variables)  # once, not at every batch
    accumulator = AttentionDistanceAccumulator()
    batch_size: int | None = None
    for images in images_batches:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1] % patch_size or images.shape[2] % patch_size:
            raise ValueError(
                f"images of shape {images.shape}: expected (B, H, W, 3) with H and W divisible "
                f"by the patch size {patch_size}"
            )
        count = images.shape[0]
        if not count:
            continue
        batch_size = batch_size or count
        if count > batch_size:
            raise ValueError(f"a batch of {count} images after a first batch of {batch_size}")
        padded = np.concatenate(
            [images, np.zeros((batch_size - count, *images.shape[1:]), np.float32)]
        )
        accumulator.add(np.asarray(compute(variables, padded))[:, :count])
    return accumulator.result()


def write_csv(path: str | os.PathLike, distances: Any) -> None:
    """One row per (layer, head) of a (layers, heads) array: columns ``layer`` (1 .. L, input side
    first, as in the figure), ``head`` (0 .. H - 1, the head's index in the parameters) and
    ``mean_distance_px`` (pixels; the keys are the patches only, class token removed, weights not
    renormalised unless the caller computed them with ``renormalize=True``)."""
    distances = np.asarray(distances)
    if distances.ndim != 2:
        raise ValueError(f"expected (layers, heads), got shape {distances.shape}")
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for layer, row in enumerate(distances, start=1):
            for head, value in enumerate(row):
                writer.writerow([layer, head, f"{float(value):.6g}"])


def read_csv(path: str | os.PathLike) -> np.ndarray:
    """The (layers, heads) array a file of :func:`write_csv` holds."""
    with open(path, newline="") as file:
        rows = [
            (int(r["layer"]), int(r["head"]), float(r["mean_distance_px"]))
            for r in csv.DictReader(file)
        ]
    if not rows:
        raise ValueError(f"{path} holds no rows")
    layers = max(r[0] for r in rows)
    heads = max(r[1] for r in rows) + 1
    distances = np.full((layers, heads), np.nan)
    for layer, head, value in rows:
        distances[layer - 1, head] = value
    return distances


def plot_attention_distances(distances: Any, path: str | os.PathLike, title: str = "") -> None:
    """A PNG in the style of Fig. 3: x the layer index 1 .. L, y the mean attention distance in
    pixels, one dot per head, a light grid."""
    # The object-oriented API with the Agg canvas: no pyplot, so no global backend is changed
    # in a process that may also hold other figures.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    distances = np.asarray(distances, np.float64)
    if distances.ndim != 2:
        raise ValueError(f"expected (layers, heads), got shape {distances.shape}")
    layers, heads = distances.shape
    figure = Figure(figsize=(4.0, 3.2), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    x = np.repeat(np.arange(1, layers + 1), heads)
    axes.scatter(x, distances.reshape(-1), s=12, alpha=0.8, linewidths=0, zorder=3)
    axes.set_xlabel("Layer")
    axes.set_ylabel("Mean attention distance (pixels)")
    axes.set_xlim(0.5, layers + 0.5)
    # Integer ticks, at most about a dozen of them, also for deep towers.
    step = max(1, int(np.ceil(layers / 12)))
    axes.set_xticks(np.arange(1, layers + 1, step))
    top = np.nanmax(distances) if np.isfinite(distances).any() else 1.0
    axes.set_ylim(0, top * 1.08 or 1.0)
    axes.grid(True, color="0.85", linewidth=0.6, zorder=0)
    axes.set_axisbelow(True)
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png")
