"""Depthwise convolutions as shifted, per-channel-scaled copies of the input, with own gradients.

XLA:CPU has no fast depthwise kernel: its grouped convolutions, and above all the kernel gradient
of a depthwise conv with a channel multiplier, are far slower than the same sums written as K*K
strided slices of the padded input times a per-channel scale (bench/mci_cpu_step.py measures
both). :func:`depthwise_conv_shifts` is a drop-in ``lax.conv_general_dilated`` for depthwise convs
(``nn.Conv``'s ``conv_general_dilated``); :func:`resolve_depthwise_impl` picks it ("shifts") or
XLA's convolution ("conv") per backend. Same parameters and outputs either way (float32
round-off).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

DEPTHWISE_IMPLS = ("auto", "conv", "shifts")
# Kernel gradients of windows with more live taps than this go through XLA's convolution (for a 7x7
# kernel XLA:CPU's depthwise kernel gradient without channel multiplier beats 49 reductions);
# smaller ones (3x3 kernels, 7x7 kernels on 2x2 maps) through one reduction per tap, which wins
# there.
MAX_TAPS_REDUCED = 9


def resolve_depthwise_impl(impl: str) -> str:
    """The implementation ``depthwise_impl`` stands for: "conv" or "shifts" as given, "auto" is
    "shifts" on the CPU backend (decided at trace time) and "conv" on any other."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"unknown depthwise_impl {impl!r}; choose from {DEPTHWISE_IMPLS}")
    if impl == "auto":
        return "shifts" if jax.default_backend() == "cpu" else "conv"
    return impl


def live_taps(size: int, pad_low: int, kernel_size: int, stride: int, out_size: int) -> list[int]:
    """Kernel offsets (along one axis) whose window reads at least one input element: the others
    only ever multiply padding zeros (e.g. 4 of a 7x7 kernel's 7 rows on a 2x2 map)."""
    return [
        offset
        for offset in range(kernel_size)
        if any(0 <= i * stride + offset - pad_low < size for i in range(out_size))
    ]


def _window(padded: jax.Array, start, strides, out_hw) -> jax.Array:
    """padded[:, start_h + strides_h * i, start_w + strides_w * j, :] for i, j < out_hw."""
    limits = [first + step * (count - 1) + 1 for first, step, count in zip(start, strides, out_hw)]
    batch, channels = padded.shape[0], padded.shape[-1]
    return jax.lax.slice(padded, (0, *start, 0), (batch, *limits, channels), (1, *strides, 1))


def _materialise(x: jax.Array) -> jax.Array:
    """The identity, as a gather of rows 0..H-1 (NHWC). XLA:CPU fuses an elementwise chain (here
    the K*K shifted products) into EVERY consumer, so a conv output read by a BatchNorm's
    statistics, its normalisation and their gradients would be recomputed per consumer; a gather
    is an op XLA:CPU never duplicates, so the chain is computed once, into the gather's buffer.
    Along the height axis: the batch axis is sharded over the data-parallel devices, and a gather
    along it makes GSPMD all-gather activations."""
    rows = jnp.arange(x.shape[1])
    return jnp.take(x, rows, axis=1, mode="clip", unique_indices=True, indices_are_sorted=True)


def _sum(terms: list[jax.Array], shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return functools.reduce(jnp.add, terms) if terms else jnp.zeros(shape, dtype)


def _output_hw(x_hw, kernel_hw, strides, padding) -> tuple[int, int]:
    return tuple(
        (size + low + high - kernel) // stride + 1
        for size, kernel, stride, (low, high) in zip(x_hw, kernel_hw, strides, padding)
    )


def _depthwise_forward(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """out[b, i, j, c] = sum_{dy, dx} x_padded[b, s_h*i + dy, s_w*j + dx, c] * kernel[dy, dx, c]."""
    batch, height, width, channels = x.shape
    out_h, out_w = _output_hw((height, width), kernel.shape[:2], strides, padding)
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    rows = live_taps(height, padding[0][0], kernel.shape[0], strides[0], out_h)
    cols = live_taps(width, padding[1][0], kernel.shape[1], strides[1], out_w)
    terms = [
        _window(padded, (dy, dx), strides, (out_h, out_w)) * kernel[dy, dx]
        for dy in rows
        for dx in cols
    ]
    return _materialise(_sum(terms, (batch, out_h, out_w, channels), x.dtype))


def _phase_taps(size, pad_low, kernel_size, stride, out_size, phase) -> list[tuple[int, int]]:
    """(offset d, shift o) pairs along one axis such that input position stride * q + phase gets
    g[q + o] * kernel[d] (the input gradient of a strided conv, one output phase at a time)."""
    return [
        (offset, (phase + pad_low - offset) // stride)
        for offset in live_taps(size, pad_low, kernel_size, stride, out_size)
        if (phase + pad_low - offset) % stride == 0
    ]


def _shift_padding(phases: list[list[tuple[int, int]]], count: int, out_size: int):
    """Zero padding of g along one axis so that every g[q + o] (q < count) is in range."""
    shifts = [shift for taps in phases for _, shift in taps] or [0]
    return max(0, -min(shifts)), max(0, count - 1 + max(shifts) - (out_size - 1))


def _depthwise_input_grad(g: jax.Array, kernel: jax.Array, x_hw, strides, padding) -> jax.Array:
    """d out / d x as shifted copies of g: for a stride s, the input positions s*q + r (phase r)
    each get their own sum of taps, and the s x s phases are interleaved at the end."""
    batch, out_h, out_w, channels = g.shape
    counts = [-(-size // stride) for size, stride in zip(x_hw, strides)]  # ceil(size / stride)
    phases = [
        [_phase_taps(size, low, kernel_size, stride, out, r) for r in range(stride)]
        for size, (low, _), kernel_size, stride, out in zip(
            x_hw, padding, kernel.shape[:2], strides, (out_h, out_w)
        )
    ]
    (top, bottom), (left, right) = (
        _shift_padding(axis_phases, count, out)
        for axis_phases, count, out in zip(phases, counts, (out_h, out_w))
    )
    padded = jnp.pad(g, ((0, 0), (top, bottom), (left, right), (0, 0)))
    phase_shape = (batch, *counts, channels)
    rows = []
    for row_taps in phases[0]:
        cols = []
        for col_taps in phases[1]:
            terms = [
                _window(padded, (top + row_shift, left + col_shift), (1, 1), counts)
                * kernel[dy, dx]
                for dy, row_shift in row_taps
                for dx, col_shift in col_taps
            ]
            cols.append(_sum(terms, phase_shape, g.dtype))
        rows.append(jnp.stack(cols, axis=3))  # (B, qh, qw, s_w, C)
    interleaved = jnp.stack(rows, axis=2)  # (B, qh, s_h, qw, s_w, C)
    full_hw = [count * stride for count, stride in zip(counts, strides)]
    dx = interleaved.reshape(batch, *full_hw, channels)[:, : x_hw[0], : x_hw[1]]
    return _materialise(dx)


def _depthwise_kernel_grad(x: jax.Array, g: jax.Array, kernel_hw, strides, padding) -> jax.Array:
    """d out / d kernel over the live taps (zero elsewhere): XLA's depthwise-conv kernel gradient
    (no channel multiplier here) for large windows, one reduction per tap for small ones."""
    channels = x.shape[-1]
    rows = live_taps(x.shape[1], padding[0][0], kernel_hw[0], strides[0], g.shape[1])
    cols = live_taps(x.shape[2], padding[1][0], kernel_hw[1], strides[1], g.shape[2])
    if len(rows) * len(cols) <= MAX_TAPS_REDUCED:
        padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))

        def tap_grad(dy: int, dx: int) -> jax.Array:
            if dy not in rows or dx not in cols:
                return jnp.zeros((channels,), g.dtype)
            window = _window(padded, (dy, dx), strides, g.shape[1:3])
            return jnp.sum(window * g, axis=(0, 1, 2))

        height, width = kernel_hw
        return jnp.stack(
            [jnp.stack([tap_grad(dy, dx) for dx in range(width)]) for dy in range(height)]
        )
    # The live taps are a box; XLA's conv over that box alone (its padding moved by the box's
    # corner) skips the taps that only see padding.
    (top, bottom), (left, right) = padding
    box_padding = (
        (top - rows[0], bottom - (kernel_hw[0] - 1 - rows[-1])),
        (left - cols[0], right - (kernel_hw[1] - 1 - cols[-1])),
    )

    def conv(box_kernel: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x,
            box_kernel[:, :, None, :],
            strides,
            box_padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
        )

    box_shape = (len(rows), len(cols), channels)
    _, pullback = jax.vjp(conv, jnp.zeros(box_shape, g.dtype))
    (box_grad,) = pullback(g)
    outside_box = (
        (rows[0], kernel_hw[0] - 1 - rows[-1]),
        (cols[0], kernel_hw[1] - 1 - cols[-1]),
        (0, 0),
    )
    return jnp.pad(box_grad, outside_box)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifts(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
    """Depthwise conv (kernel (KH, KW, C), one filter per channel) by shifted copies."""
    return _depthwise_forward(x, kernel, strides, padding)


def _depthwise_shifts_fwd(x, kernel, strides, padding):
    return _depthwise_forward(x, kernel, strides, padding), (x, kernel)


def _depthwise_shifts_bwd(strides, padding, residuals, g):
    # Own gradients: autodiff of the shifted sum would keep all K*K windows as residuals and
    # pad-and-add one cotangent per tap; these are again sums of shifted copies.
    x, kernel = residuals
    g = _materialise(g)
    dx = _depthwise_input_grad(g, kernel, x.shape[1:3], strides, padding)
    return dx, _depthwise_kernel_grad(x, g, kernel.shape[:2], strides, padding)


_depthwise_shifts.defvjp(_depthwise_shifts_fwd, _depthwise_shifts_bwd)


def depthwise_conv_shifts(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` for depthwise convs (NHWC input, HWIO kernel (KH, KW, 1,
    m * C), ``feature_group_count`` = C, no dilation), computed as K*K shifted, per-channel-scaled
    copies of the padded input, with gradients of the same kind; usable as ``nn.Conv``'s
    ``conv_general_dilated``. A channel multiplier m > 1 repeats each input channel m times
    (output channel o reads input channel o // m, as in a grouped conv). Sums are taken in at
    least float32; the result has the inputs' dtype (or ``preferred_element_type``)."""
    del precision  # the products and sums are plain float32 (or wider) arithmetic
    channels = lhs.shape[-1]
    nhwc = ("NHWC", "HWIO", "NHWC")
    if (
        lhs.ndim != 4
        or rhs.ndim != 4
        or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, nhwc)
    ):
        raise ValueError("depthwise_conv_shifts takes NHWC inputs and HWIO kernels")
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        raise ValueError("depthwise_conv_shifts does not dilate")
    if feature_group_count != channels or rhs.shape[2] != 1 or rhs.shape[3] % channels:
        raise ValueError(
            f"not a depthwise conv: {channels} input channels, feature_group_count "
            f"{feature_group_count}, kernel {rhs.shape}"
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    padding = tuple((int(low), int(high)) for low, high in padding)
    if any(p < 0 for pair in padding for p in pair):
        raise ValueError(f"depthwise_conv_shifts needs non-negative padding, got {padding}")
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    compute_dtype = jnp.promote_types(jnp.result_type(lhs, rhs), jnp.float32)
    multiplier = rhs.shape[3] // channels
    if multiplier > 1:
        lhs = jnp.repeat(lhs, multiplier, axis=-1)
    kernel = rhs.reshape(*rhs.shape[:2], rhs.shape[3]).astype(compute_dtype)
    out = _depthwise_shifts(lhs.astype(compute_dtype), kernel, strides, padding)
    return out.astype(out_dtype)
