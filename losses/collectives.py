"""Collective helpers shared by the losses: one code path for one device, `shard_map` and `pmap`.

Every loss takes LOCAL per-device arrays and an ``axis_name``: ``None`` (one device, plain global
computation), one mesh/pmap axis name, or a tuple of names over which the batch is split together
(e.g. ``("data", "fsdp")``). For a tuple, JAX linearises the devices in the tuple's order
(row-major, the first name most significant): ``axis_index``, tiled ``all_gather`` and
``ppermute`` all use that same linear index, which also matches a batch sharded with
``PartitionSpec(("data", "fsdp"))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "AxisName",
    "all_gather_rows",
    "axis_index",
    "axis_size",
    "global_sum",
    "ring_permutation",
    "similarity",
]

AxisName = str | tuple[str, ...] | None


def axis_size(axis_name: AxisName) -> int:
    """Static number of devices over which the batch is split (1 for ``None``)."""
    if axis_name is None:
        return 1
    if hasattr(jax.lax, "axis_size"):
        return int(jax.lax.axis_size(axis_name))
    # Older JAX: psum of a Python constant is folded to the static axis size.
    return int(jax.lax.psum(1, axis_name))


def axis_index(axis_name: AxisName) -> jax.Array:
    """This device's linear index along ``axis_name`` (0 for ``None``)."""
    if axis_name is None:
        return jnp.zeros((), jnp.int32)
    return jax.lax.axis_index(axis_name)


def all_gather_rows(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Concatenate every device's ``x`` along axis 0, in linear device order.

    Differentiable: the transpose of the gather is a reduce-scatter, so each device's local rows
    receive the gradient contributions computed on every device.
    """
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def global_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Sum over devices; the result is replicated (not device-varying) under ``shard_map``."""
    if axis_name is None:
        return x
    return jax.lax.psum(x, axis_name)


def ring_permutation(num_devices: int) -> list[tuple[int, int]]:
    """``ppermute`` pairs sending device ``i``'s block to device ``i + 1`` (mod ``num_devices``)."""
    return [(source, (source + 1) % num_devices) for source in range(num_devices)]


def similarity(queries: jax.Array, keys: jax.Array) -> jax.Array:
    """``queries @ keys.T`` at full float32 precision.

    HIGHEST keeps TPUs (whose default float32 matmul is one bfloat16 pass) from rounding cosine
    similarities to ~3 digits before they are multiplied by a logit scale of up to 100; the
    matmul is (local x global x dim), small next to the encoders.
    """
    return jnp.einsum("id,jd->ij", queries, keys, precision=jax.lax.Precision.HIGHEST)
