"""Depthwise convs as shifted copies (models/depthwise.py; ``depthwise_impl="shifts"``, the CPU
default): values and both gradients against a float64 NumPy loop over kernel taps, for the
geometries the MCi towers have (3x3 / 7x7, strides 1 and 2, channel multiplier 2, maps smaller than
the kernel) and some they have not; no activation all-gather under the trainer's data mesh. The
whole MCi tower with shifts against grouped convs: test_mobileclip.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from models.depthwise import depthwise_conv_shifts, live_taps, resolve_depthwise_impl
from pretrain import sharding

NHWC = ("NHWC", "HWIO", "NHWC")

# (height, width, channels, multiplier, kernel (h, w), strides, padding)
GEOMETRIES = {
    "convmlp 7x7": (16, 16, 8, 1, (7, 7), (1, 1), ((3, 3), (3, 3))),
    "patch embed 7x7 s2 x2": (16, 16, 8, 2, (7, 7), (2, 2), ((3, 3), (3, 3))),
    "odd map 3x3 s2 x2": (15, 13, 4, 2, (3, 3), (2, 2), ((1, 1), (1, 1))),
    "7x7 on 2x2": (2, 2, 16, 1, (7, 7), (1, 1), ((3, 3), (3, 3))),
    "final 3x3 x2 on 2x2": (2, 2, 16, 2, (3, 3), (1, 1), ((1, 1), (1, 1))),
    "1x1 s2": (8, 8, 4, 1, (1, 1), (2, 2), ((0, 0), (0, 0))),
    "5x3 strides 2,3 x3 asymmetric": (9, 7, 3, 3, (5, 3), (2, 3), ((2, 1), (0, 2))),
    "even 4x4 s2 x2 asymmetric": (7, 7, 2, 2, (4, 4), (2, 2), ((1, 2), (2, 1))),
    "1x1 map": (1, 1, 4, 1, (3, 3), (1, 1), ((1, 1), (1, 1))),
}


def numpy_depthwise(x, kernel, strides, padding, cotangent=None):
    """Float64 reference: out[b, i, j, o] = sum_{dy, dx} x_pad[b, s*i + dy, s*j + dx, o // m]
    * kernel[dy, dx, 0, o]; with a cotangent g, also (d x, d kernel) of sum(out * g)."""
    (top, bottom), (left, right) = padding
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    multiplier = kernel.shape[-1] // x.shape[-1]
    repeated = np.repeat(padded, multiplier, axis=-1)  # channel o reads input channel o // m
    out_h = (padded.shape[1] - kernel.shape[0]) // strides[0] + 1
    out_w = (padded.shape[2] - kernel.shape[1]) // strides[1] + 1

    def window(dy, dx):
        return (
            slice(dy, dy + strides[0] * (out_h - 1) + 1, strides[0]),
            slice(dx, dx + strides[1] * (out_w - 1) + 1, strides[1]),
        )

    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    d_repeated, d_kernel = np.zeros_like(repeated), np.zeros_like(kernel)
    for dy in range(kernel.shape[0]):
        for dx in range(kernel.shape[1]):
            rows, cols = window(dy, dx)
            out += repeated[:, rows, cols] * kernel[dy, dx, 0]
            if cotangent is not None:
                d_kernel[dy, dx, 0] = np.sum(repeated[:, rows, cols] * cotangent, axis=(0, 1, 2))
                d_repeated[:, rows, cols] += cotangent * kernel[dy, dx, 0]
    if cotangent is None:
        return out
    d_padded = d_repeated.reshape(*padded.shape, multiplier).sum(-1)
    d_x = d_padded[:, top : top + x.shape[1], left : left + x.shape[2]]
    return out, d_x, d_kernel


def shifted_conv(x, kernel, strides, padding):
    return depthwise_conv_shifts(
        x, kernel, strides, padding, dimension_numbers=NHWC, feature_group_count=x.shape[-1]
    )


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_values_and_gradients_match_a_float64_reference(geometry):
    height, width, channels, multiplier, kernel_hw, strides, padding = geometry
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, height, width, channels))
    kernel = rng.standard_normal((*kernel_hw, 1, channels * multiplier))
    cotangent = rng.standard_normal(numpy_depthwise(x, kernel, strides, padding).shape)
    expected = numpy_depthwise(x, kernel, strides, padding, cotangent)
    f32 = [np.asarray(a, np.float32) for a in (x, kernel, cotangent)]
    out, pullback = jax.vjp(jax.jit(lambda x, k: shifted_conv(x, k, strides, padding)), *f32[:2])
    actual = [out, *pullback(f32[2])]
    assert out.dtype == jnp.float32
    for got, want in zip(actual, expected):
        assert got.shape == want.shape
        # Float32 round-off of sums of at most a few hundred products (a float32 grouped lax
        # conv is off by ~3e-7 of the largest value here).
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_reference_is_a_grouped_conv():
    """The NumPy reference is what ``lax`` computes for feature_group_count = input channels."""
    height, width, channels, multiplier, kernel_hw, strides, padding = GEOMETRIES[
        "5x3 strides 2,3 x3 asymmetric"
    ]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, height, width, channels)).astype(np.float32)
    kernel = rng.standard_normal((*kernel_hw, 1, channels * multiplier)).astype(np.float32)
    grouped = jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=NHWC, feature_group_count=channels
    )
    np.testing.assert_allclose(
        grouped, numpy_depthwise(x, kernel, strides, padding), rtol=1e-5, atol=1e-5
    )


def test_live_taps_skip_kernel_offsets_that_only_see_padding():
    # 7 taps, padding 3, a 2-long axis: offsets 2..4 reach row 0 or 1, the rest only padding.
    assert live_taps(2, 3, 7, 1, 2) == [2, 3, 4]
    assert live_taps(16, 3, 7, 2, 8) == list(range(7))
    assert live_taps(1, 1, 3, 1, 1) == [1]


def test_rejects_convs_that_are_not_depthwise():
    x, kernel = jnp.zeros((1, 4, 4, 4)), jnp.zeros((3, 3, 2, 4))
    with pytest.raises(ValueError, match="not a depthwise conv"):
        depthwise_conv_shifts(
            x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, feature_group_count=2
        )
    with pytest.raises(ValueError, match="dilate"):
        depthwise_conv_shifts(
            x,
            kernel[:, :, :1],
            (1, 1),
            "SAME",
            rhs_dilation=(2, 2),
            dimension_numbers=NHWC,
            feature_group_count=4,
        )


def test_auto_is_shifts_on_cpu_and_unknown_names_fail():
    assert jax.default_backend() == "cpu"
    assert resolve_depthwise_impl("auto") == "shifts"
    assert resolve_depthwise_impl("conv") == "conv"
    with pytest.raises(ValueError, match="depthwise_impl"):
        resolve_depthwise_impl("fft")


def test_data_parallel_gradients_gather_no_activations():
    """Images sharded over the 8 test devices (the trainer's layout) through the tower's stem (a
    dense stride-2 conv, then a depthwise stride-2 conv, then batch statistics): the parameter
    gradients need no all-gather of activations (a gather along the batch axis would)."""
    mesh = sharding.make_mesh({"data": -1})
    images = jax.device_put(
        jnp.zeros((16, 64, 64, 3)), NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    )
    dense_kernel, depthwise_kernel = jnp.zeros((3, 3, 3, 16)), jnp.zeros((3, 3, 1, 16))

    def loss(dense_kernel, depthwise_kernel, images):
        pad = ((1, 1), (1, 1))
        x = jax.lax.conv_general_dilated(images, dense_kernel, (2, 2), pad, dimension_numbers=NHWC)
        x = shifted_conv(x, depthwise_kernel, (2, 2), pad)
        return jnp.sum(jnp.sin(x) * x.mean(axis=(0, 1, 2)))

    program = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = program.lower(dense_kernel, depthwise_kernel, images).compile()
    assert not re.findall(r"\ball-gather(?:-start)?\(", compiled.as_text())
