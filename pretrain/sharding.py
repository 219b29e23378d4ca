"""One device mesh with named axes, parameter partitioning by name rules, global batches.

Mesh axes:
  data  - pure data parallelism (parameters replicated),
  fsdp  - data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3 style),
  model - tensor parallelism inside attention heads and MLP hidden units.
The batch is split over (data, fsdp). A parameter's partition comes from the first rule whose regex
matches its path (e.g. ``image_encoder/transformer/resblocks_3/attn/query/kernel``), which places
the ``model`` axis; then the fsdp axis goes on the largest remaining dimension it divides. The rules
shard optimizer state and EMA, whose paths end with the parameter's path.

Nothing here assumes one process: batches are built from per-process data with
``jax.make_array_from_process_local_data`` and every array is a global ``jax.Array``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Tensor-parallel placements for the transformer blocks (Megatron layout): heads and MLP hidden
# units are split over "model", so each block needs one all-reduce after attention and one after
# the MLP. Dimensions are given for the parameter shapes of models/layers.py.
TRANSFORMER_MODEL_PARALLEL_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/(query|key|value)/kernel$", (None, "model", None)),
    (r"attn/(query|key|value)/bias$", ("model", None)),
    (r"attn/out/kernel$", ("model", None, None)),
    # EVA-02's LayerNorm over the attention output keeps its (heads, head_dim) layout.
    (r"attn/inner_norm/(scale|bias)$", ("model", None)),
    # GELU MLP (c_fc, c_proj) and SwiGLU MLP (fc1_g, fc1_x, hidden LayerNorm norm, fc2).
    (r"mlp/(c_fc|fc1_g|fc1_x)/kernel$", (None, "model")),
    (r"mlp/(c_fc|fc1_g|fc1_x)/bias$", ("model",)),
    (r"mlp/norm/(scale|bias)$", ("model",)),
    (r"mlp/(c_proj|fc2)/kernel$", ("model", None)),
    # Classifiers over many classes (e.g. a synset vocabulary): classes split over "model".
    (r"classifier/kernel$", (None, "model")),
    (r"classifier/bias$", ("model",)),
)

# Parameters smaller than this stay replicated over fsdp: sharding them saves no memory worth the
# extra collectives.
MIN_FSDP_SHARD_SIZE = 2**14


def _axis_type_kwargs(count: int) -> dict[str, Any]:
    # JAX >= 0.7 takes axis types; Auto lets Flax/GSPMD propagate shardings (newer JAX defaults to
    # Explicit, which linen does not support).
    axis_type = getattr(jax.sharding, "AxisType", None)
    return {} if axis_type is None else {"axis_types": (axis_type.Auto,) * count}


def mesh_shape(mesh_config: Mapping[str, int], device_count: int) -> tuple[int, ...]:
    """Resolve the sizes of (data, fsdp, model); one of them may be -1 (= whatever is left)."""
    unknown = [name for name in MESH_AXES if int(mesh_config.get(name, 1)) == -1]
    extra = set(mesh_config) - set(MESH_AXES)
    if extra:
        raise ValueError(f"unknown mesh axes {sorted(extra)}; the mesh has {MESH_AXES}")
    if len(unknown) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {unknown}")
    sizes = {name: int(mesh_config.get(name, 1)) for name in MESH_AXES}
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if device_count % known:
            raise ValueError(f"{device_count} devices cannot be split into a mesh {dict(sizes)}")
        sizes[unknown[0]] = device_count // known
    if math.prod(sizes.values()) != device_count:
        raise ValueError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {device_count}"
        )
    return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """Build the (data, fsdp, model) mesh over all devices (or the given ones)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_config, len(devices))
    if devices == jax.devices():
        # make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink on GPU).
        return jax.make_mesh(shape, MESH_AXES, **_axis_type_kwargs(len(shape)))
    if devices[0].platform == "tpu":
        # Other TPU devices (e.g. a topology described for compiling ahead of time): the same
        # physical ordering.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, **_axis_type_kwargs(len(shape)))


def path_to_name(path: Sequence[Any]) -> str:
    """'a/b/c' for a pytree key path (dict keys, attribute names and sequence indices)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def partition_spec(
    name: str,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Sequence[str | None]]] = TRANSFORMER_MODEL_PARALLEL_RULES,
    min_fsdp_size: int = MIN_FSDP_SHARD_SIZE,
) -> PartitionSpec:
    """The partition of one array named ``name``: model axis from the rules, then fsdp by size."""
    spec: list[str | None] = [None] * len(shape)
    model_size = mesh.shape.get("model", 1)
    for pattern, rule_spec in rules:
        if re.search(pattern, name) and len(rule_spec) == len(shape):
            for dim, axis in enumerate(rule_spec):
                # A dimension the axis does not divide stays replicated rather than failing: the
                # same rules then serve every model size (e.g. 3 heads on a model axis of 2).
                if axis is not None and shape[dim] % mesh.shape.get(axis, 1) == 0:
                    spec[dim] = axis
            break
    if model_size == 1:
        spec = [None if axis == "model" else axis for axis in spec]
    fsdp_size = mesh.shape.get("fsdp", 1)
    if fsdp_size > 1 and math.prod(shape) >= min_fsdp_size:
        free_dims = [dim for dim in range(len(shape)) if spec[dim] is None]
        divisible = [dim for dim in free_dims if shape[dim] % fsdp_size == 0]
        if divisible:
            largest = max(divisible, key=lambda dim: shape[dim])
            spec[largest] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(
    tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Sequence[str | None]]] = TRANSFORMER_MODEL_PARALLEL_RULES,
) -> Any:
    """NamedShardings for every leaf of a pytree of arrays or ShapeDtypeStructs."""

    def leaf_sharding(path: Sequence[Any], leaf: Any) -> NamedSharding:
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, partition_spec(path_to_name(path), shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_spec(ndim: int) -> PartitionSpec:
    return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """The leading (batch) dimension split over every data-parallel axis."""
    return NamedSharding(mesh, batch_spec(ndim))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def gather_to_host(tree: Any, mesh: Mesh) -> Any:
    """Whole host (NumPy) arrays of a sharded tree: every shard, from every device and host, is
    gathered first (every process must call this)."""
    return jax.device_get(jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def global_batch_from_local(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh
) -> dict[str, jax.Array]:
    """Assemble the global batch from this process's rows (each process holds its own slice)."""
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
        for key, value in local_batch.items()
    }


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> int:
    """Per-process batch size; fails early with a readable message when sizes do not divide."""
    shards = data_parallel_size(mesh) * grad_accum_steps
    if global_batch_size % shards:
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by data-parallel devices x "
            f"grad_accum_steps = {shards}"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by {jax.process_count()} processes"
        )
    return global_batch_size // jax.process_count()


def local_batch_multiple(mesh: Mesh, grad_accum_steps: int = 1) -> int:
    """The rows a process's batch must be a multiple of, for the global batch to split over the
    data-parallel devices and the accumulation steps (variable-size batches)."""
    shards = data_parallel_size(mesh) * grad_accum_steps
    return max(1, shards // jax.process_count())


def check_processes_own_distinct_rows(mesh: Mesh) -> None:
    """Each process must feed its own rows of the batch (its data shard): fail at start-up when
    two processes' devices hold the same rows, i.e. when the ``model`` axis spans hosts."""
    shards = data_parallel_size(mesh)
    owners: dict[int, set[int]] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((shards,)).items():
        owners.setdefault(index[0].start or 0, set()).add(device.process_index)
    shared = {row: procs for row, procs in owners.items() if len(procs) > 1}
    if shared:
        raise ValueError(
            f"batch rows are shared by processes {sorted(map(sorted, shared.values()))}: the "
            "'model' mesh axis must stay within one host (use fewer model shards per host)"
        )


def batch_loss(loss_fn: Any, mesh: Mesh, *batch_arrays: jax.Array, **options: Any) -> jax.Array:
    """``loss_fn(*local rows, axis_name=BATCH_AXES, **options)`` under ``shard_map`` with the
    arrays' leading (batch) dimension split over the data-parallel axes; a replicated scalar."""
    spec = PartitionSpec(BATCH_AXES)
    sharded = jax.shard_map(
        functools.partial(loss_fn, axis_name=BATCH_AXES, **options),
        mesh=mesh,
        in_specs=(spec,) * len(batch_arrays),
        out_specs=PartitionSpec(),
    )
    return sharded(*batch_arrays)
