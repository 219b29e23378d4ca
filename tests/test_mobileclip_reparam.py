"""Re-parameterisation of the MCi towers (models/mobileclip_reparam.py): the folded identity and
padded kernels are the convs they stand for, and folding leaves evaluation outputs unchanged
(random weights and random, non-trivial BatchNorm statistics).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_mobileclip import SMALL, evaluate, random_images, random_variables, variable_shapes

from models.mobileclip import MobileClipImageTower
from models.mobileclip_reparam import identity_kernel, pad_kernel, reparameterize

REPARAMETERIZE_TOLERANCE = 1e-5


def test_identity_and_padded_kernels():
    """The folded identity is a conv that returns its input (grouped: 2 inputs per group), and a
    1x1 kernel padded to 3x3 gives the same conv (stride 2 included)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 6, 6, 4)).astype(np.float32)

    def conv(inputs, kernel, stride=1, groups=1):
        pad = kernel.shape[0] // 2
        return jax.lax.conv_general_dilated(
            inputs,
            kernel.astype(np.float32),
            (stride, stride),
            ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )

    np.testing.assert_allclose(conv(x, identity_kernel(4, 2, 3), groups=2), x, atol=1e-7)
    np.testing.assert_allclose(conv(x, identity_kernel(4, 1, 7), groups=4), x, atol=1e-7)
    small = rng.standard_normal((1, 1, 4, 8))
    np.testing.assert_allclose(
        conv(x, small, stride=2), conv(x, pad_kernel(small, 3), stride=2), atol=1e-6
    )


def assert_reparameterized_outputs_equal(tower: MobileClipImageTower, seed: int) -> dict:
    variables = random_variables(tower, seed=seed)
    inference_variables, inference_tower = reparameterize(variables, tower)
    assert inference_tower.reparameterized and not tower.reparameterized
    # The folded tree is exactly the inference tower's layout.
    expected = variable_shapes(inference_tower)
    assert jax.tree.structure(inference_variables) == jax.tree.structure(expected)
    for folded, wanted in zip(jax.tree.leaves(inference_variables), jax.tree.leaves(expected)):
        assert np.shape(folded) == wanted.shape and np.asarray(folded).dtype == wanted.dtype
    images = random_images(3, seed=seed + 7)
    before, before_intermediates = evaluate(tower, variables, images)
    after, after_intermediates = evaluate(inference_tower, inference_variables, images)
    differences = {"embedding": float(np.abs(np.asarray(before) - np.asarray(after)).max())}
    for name in ("pre_logits", "final_features", "stage_0", "stage_1", "stage_2", "stage_3"):
        reference = np.asarray(before_intermediates[name])
        difference = float(np.abs(reference - np.asarray(after_intermediates[name])).max())
        # Feature maps reach ~10 here; their float32 rounding scales with that magnitude.
        assert difference <= REPARAMETERIZE_TOLERANCE * max(1.0, np.abs(reference).max()), name
        differences[name] = difference
    assert differences["embedding"] <= REPARAMETERIZE_TOLERANCE
    assert differences["pre_logits"] <= REPARAMETERIZE_TOLERANCE
    # The random statistics matter: ignoring them (identity BN) changes the outputs a lot.
    plain = {**variables, "batch_stats": jax.tree.map(np.ones_like, variables["batch_stats"])}
    assert np.abs(np.asarray(evaluate(tower, plain, images)[0]) - np.asarray(before)).max() > 1e-2
    print(f"reparameterize max |diff|: {differences}")
    return differences


def test_reparameterize_keeps_outputs_small():
    assert_reparameterized_outputs_equal(MobileClipImageTower(**SMALL, output_dim=24), seed=1)


def test_reparameterize_keeps_outputs_mci0():
    assert_reparameterized_outputs_equal(
        MobileClipImageTower.from_variant("mci0", output_dim=512), seed=2
    )


def test_reparameterize_rejects_inference_tower():
    tower = MobileClipImageTower(**SMALL, reparameterized=True)
    with pytest.raises(ValueError, match="already"):
        reparameterize({"params": {}, "batch_stats": {}}, tower)
