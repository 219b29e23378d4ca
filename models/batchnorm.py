"""BatchNorm for models that run under GSPMD on global arrays, with PyTorch's semantics.

The trainer jits the model over GLOBAL arrays whose batch axis is sharded over the data axes (no
``shard_map``/``pmap``), so a plain mean over the batch axis is a mean over every device: that is
synchronised BatchNorm (PyTorch's ``SyncBatchNorm``). PyTorch DDP *without* SyncBN normalises
each device's slice with that slice's own statistics instead. :class:`GroupedBatchNorm` covers
both: the batch is cut into ``num_groups`` groups of consecutive rows, ``(B, ...) -> (G, B/G,
...)``, and each group is normalised with its own statistics. ``num_groups=1`` is SyncBN over the
global batch; ``num_groups`` = the number of data-parallel devices reproduces per-device
statistics (the global batch is laid out device after device along the batch axis, so the
reshape keeps each group on one device and its statistics need no communication).

Running statistics (collection ``batch_stats``: ``mean``, ``var``, float32) follow PyTorch:
``running = momentum * running + (1 - momentum) * batch`` with Flax's momentum convention
(``momentum=0.9`` here is PyTorch's ``momentum=0.1``), the batch mean and variance being the mean
over groups of the group statistics, and the variance the UNBIASED one (``n / (n - 1)`` with ``n``
the values per channel in a group), which is what PyTorch stores in ``running_var``; the
normalisation itself uses the biased variance, as PyTorch does. Statistics are computed in
float32 whatever ``dtype`` is.

Train: ``module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])``;
evaluation: ``use_running_average=True`` (running statistics, no update). During ``init`` the
running statistics are created (zeros / ones) and not updated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's BatchNorm defaults (timm's FastViT / MobileCLIP use them): eps 1e-5 and torch
# momentum 0.1, i.e. 0.9 in the Flax convention used here.
TORCH_BATCH_NORM_EPS = 1e-5
TORCH_BATCH_NORM_MOMENTUM = 0.9


def group_statistics(x: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array, int]:
    """Per-group, per-channel mean and biased variance of ``x`` (B, ..., C), in float32.

    Returns ``(mean, var, count)`` with mean and var (G, C) and ``count`` the number of values
    each group's statistics are taken over (B/G times the spatial size).
    """
    batch = x.shape[0]
    if batch % num_groups:
        raise ValueError(
            f"batch size {batch} is not divisible by the BatchNorm's num_groups={num_groups}"
        )
    grouped = x.astype(jnp.float32).reshape(num_groups, batch // num_groups, *x.shape[1:])
    axes = tuple(range(1, grouped.ndim - 1))
    mean = grouped.mean(axis=axes)
    # Two passes (centred second moment) rather than E[x^2] - E[x]^2, which cancels badly when
    # the mean is large next to the spread.
    centred = grouped - jnp.expand_dims(mean, axes)
    var = jnp.square(centred).mean(axis=axes)
    count = grouped.size // (num_groups * grouped.shape[-1])
    return mean, var, count


class GroupedBatchNorm(nn.Module):
    """BatchNorm over the last axis with statistics per group of ``num_groups`` (see the module
    docstring). ``momentum`` uses Flax's convention (0.9 == PyTorch's 0.1)."""

    num_groups: int = 1
    momentum: float = TORCH_BATCH_NORM_MOMENTUM
    epsilon: float = TORCH_BATCH_NORM_EPS
    use_running_average: bool | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scale_init: Callable[..., jax.Array] = nn.initializers.ones
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {self.num_groups}")
        features = x.shape[-1]
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((features,), jnp.float32)
        )
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)

        if use_running_average:
            # One group: the running statistics apply to every row.
            mean = running_mean.value[None]
            var = running_var.value[None]
            groups = 1
        else:
            groups = self.num_groups
            mean, var, count = group_statistics(x, groups)
            if not self.is_initializing():
                unbiased = var * (count / max(count - 1, 1))
                keep = self.momentum
                running_mean.value = keep * running_mean.value + (1 - keep) * mean.mean(axis=0)
                running_var.value = keep * running_var.value + (1 - keep) * unbiased.mean(axis=0)

        # y = (x - mean) * scale / sqrt(var + eps) + bias as one multiply-add per element.
        multiplier = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)  # (G, C)
        offset = bias.astype(jnp.float32) - mean * multiplier
        batch = x.shape[0]
        grouped = x.reshape(groups, batch // groups, *x.shape[1:])
        broadcast = (slice(None), *([None] * (grouped.ndim - 2)), slice(None))
        out = grouped.astype(jnp.float32) * multiplier[broadcast] + offset[broadcast]
        return out.reshape(x.shape).astype(self.dtype)
