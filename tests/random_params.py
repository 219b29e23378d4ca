"""Random, non-trivial parameter values for a Flax module, drawn in NumPy from its shapes.

Flax's own init runs eagerly op by op (seconds on a busy CPU); these are drawn from
``jax.eval_shape`` shapes instead, with LayerNorm scales off 1 and biases off 0 so that no
parameter is a no-op a wrong mapping could hide behind, at roughly the init's scale (a two-tower
model's logit scale and bias near CLIP's and SigLIP's initial values).
"""

import jax
import numpy as np

# Attention projections with (width, heads, head_dim) kernels (ViT / text, and the ResNet's pool).
_PROJECTIONS = ("query", "key", "value", "q_proj", "k_proj", "v_proj")


def random_value(path: tuple[str, ...], shape: tuple[int, ...], rng) -> np.ndarray:
    noise = rng.standard_normal(shape).astype(np.float32)
    name, parent = path[-1], path[-2] if len(path) > 1 else ""
    if name == "scale":
        return 1 + 0.1 * noise
    if name == "bias":
        return 0.1 * noise
    if name == "logit_scale":
        return np.float32(np.log(1 / 0.07)) + 0.1 * noise
    if name == "logit_bias":
        return np.float32(-10) + 0.1 * noise
    if name == "kernel":
        # q/k/v kernels are (width, heads, head_dim): their fan-in is the first axis alone.
        fan_in = shape[0] if parent in _PROJECTIONS else np.prod(shape[:-1])
        return noise / np.sqrt(fan_in).astype(np.float32)
    if name in ("proj", "text_projection", "class_embedding"):
        return noise / np.sqrt(shape[0]).astype(np.float32)
    return 0.1 * noise  # token and position embeddings


def random_params(module, *init_args, seed: int = 0):
    """The ``params`` collection of ``module.init(key, *init_args)``, filled with random values."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *init_args)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: random_value(tuple(entry.key for entry in path), leaf.shape, rng),
        shapes,
    )


def random_variables(module, *init_args, seed: int = 0):
    """``{"params", "batch_stats"}`` of a module with BatchNorm: random parameters as
    :func:`random_params` draws them, running means around 0 with spread, running variances in
    [0.5, 2] (not the init's 0 and 1, which a dropped statistic would go unnoticed at)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *init_args)
    rng = np.random.default_rng(seed)

    def parameter(path, leaf):
        return random_value(tuple(entry.key for entry in path), leaf.shape, rng)

    def statistic(path, leaf):
        if path[-1].key == "mean":
            return (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
        return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)

    return {
        "params": jax.tree_util.tree_map_with_path(parameter, shapes["params"]),
        "batch_stats": jax.tree_util.tree_map_with_path(statistic, shapes["batch_stats"]),
    }
