"""Comparing parameter and gradient trees in tests."""

import jax
import numpy as np

from pretrain.sharding import path_to_name


def without_key_biases(tree):
    """Drop attention key biases: their true gradient is exactly zero (shifting every key by the
    same vector adds a constant to each query's logits, which softmax ignores), so what is left is
    float noise, which Adam even scales up to a full step in a random direction."""
    return {
        path_to_name(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if not path_to_name(path).endswith("attn/key/bias")
    }


def assert_close_at_scale(actual, expected, rtol=1e-4, scale_atol=1e-4):
    """Leaf by leaf, with an absolute tolerance relative to each expected tensor's largest value
    (float reordering errors are proportional to the magnitudes summed)."""
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=scale_atol * np.abs(b).max()),
        actual,
        expected,
    )


def assert_close_at_one_scale(actual, expected, rtol=1e-4, scale_atol=1e-5):
    """All leaves at once, with an absolute tolerance relative to the largest expected value of
    the whole tree: for gradients where some leaves are zero up to float noise (e.g. a conv or
    bias before a normalisation has no gradient along what the normalisation removes)."""
    flat = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(expected)])
    actual_flat = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(actual)])
    np.testing.assert_allclose(actual_flat, flat, rtol=rtol, atol=scale_atol * np.abs(flat).max())
