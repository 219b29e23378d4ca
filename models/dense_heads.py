"""Dense heads: per-pixel logits or values from an image tower's feature maps (segmentation, depth,
the dense evaluations).

Every head is called as ``head(features, output_size, *, train=False)``: ``features`` is a list
of NHWC maps (B, h_i, w_i, C_i) from the tower, coarsest LAST (a ViT gives one map: its patch
tokens on the grid, any grid, square or not; a convolutional tower gives its stages), and the
result is (B, output_size[0], output_size[1], num_outputs) float32, the head's output resized by
``upsample``: "bilinear" (``F.interpolate(..., mode="bilinear", align_corners=False)``) or
"nearest" (``F.interpolate(..., mode="nearest")``, as CLIPTeX upsamples its task outputs); see
models/spatial.py. The classifier runs at the head's resolution and only its logits are resized.

* :class:`LinearHead`: the linear probe, a 1x1 convolution with bias on the last map.
* :class:`DeepLabV3Head` (Chen et al. 2017, "Rethinking Atrous Convolution", as CoreNet's
  ``deeplabv3`` head): ASPP on the last map (models/pyramid.py) -> 1x1 classifier.
* :class:`PSPHead` (Zhao et al. 2017, "Pyramid Scene Parsing Network", CoreNet's ``pspnet``):
  pyramid pooling on the last map -> 1x1 classifier.
* :class:`UperNetHead` (Xiao et al. 2018, "Unified Perceptual Parsing", mmsegmentation's
  ``UPerHead``): a pyramid pooling module on the coarsest map and an FPN over all of them, every
  level resized to the finest and fused -> 1x1 classifier. Given one map (a ViT), ViTDet's simple
  feature pyramid first makes four (strides 4 to 32 from stride 16).
* :class:`MultiTaskPSPHeads` (CLIPTeX, paper 003 Section 3): ONE pyramid pooling module shared by
  several tasks, a 1x1 convolution per task on its output, each resized (nearest by default).

Normalisation is the project's BatchNorm (models/batchnorm.py: ``batch_stats`` collection, per
``bn_groups`` statistics): apply with ``train=True, mutable=["batch_stats"]`` and a ``dropout``
rng to train, ``train=False`` for evaluation (running statistics, no dropout). Classifiers are
initialised as mmsegmentation's ``conv_seg`` (normal, std 0.01; zero bias).

``DENSE_HEADS`` names the heads for configs; :func:`build_dense_head` builds one by name.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dtype
from models.pyramid import (
    AtrousSpatialPyramidPooling,
    ConvNormAct,
    PyramidPoolingModule,
    SimpleFeaturePyramid,
    channel_dropout,
)
from models.spatial import as_size, resize_bilinear, upsample_to

CLASSIFIER_INIT_STD = 0.01


def classifier_conv(
    num_outputs: int, dtype: Dtype, param_dtype: Dtype, name: str = "classifier"
) -> nn.Conv:
    """The 1x1 convolution with bias (named ``classifier`` by default) that ends every head."""
    return nn.Conv(
        num_outputs,
        kernel_size=(1, 1),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(CLASSIFIER_INIT_STD),
        name=name,
    )


def check_features(features: Sequence[jax.Array]) -> list[jax.Array]:
    """``features`` as a list, checked to be a non-empty sequence of NHWC maps."""
    if isinstance(features, jax.Array) or not len(features):
        raise ValueError("features must be a non-empty list of (B, H, W, C) maps, coarsest last")
    for index, feature in enumerate(features):
        if feature.ndim != 4:
            raise ValueError(f"features[{index}] must be (B, H, W, C), got shape {feature.shape}")
    return list(features)


def resized_logits(logits: jax.Array, output_size: tuple[int, int], method: str) -> jax.Array:
    """Head-resolution logits -> float32 (B, *output_size, K); resized in float32, so bf16
    heads do not interpolate in bf16."""
    return upsample_to(logits.astype(jnp.float32), as_size(output_size), method)


def pyramid_pooled(head: nn.Module, features: Sequence[jax.Array], train: bool) -> jax.Array:
    """The last map through ``psp``, a :class:`~models.pyramid.PyramidPoolingModule` with the
    calling head's ``channels``, ``bins``, ``dropout``, ``bn_groups`` and dtypes (call it from the
    head's compact ``__call__``)."""
    x = check_features(features)[-1].astype(head.dtype)
    return PyramidPoolingModule(
        head.channels,
        head.bins,
        dropout=head.dropout,
        bn_groups=head.bn_groups,
        dtype=head.dtype,
        param_dtype=head.param_dtype,
        name="psp",
    )(x, train=train)


def top_down_sums(laterals: Sequence[jax.Array]) -> list[jax.Array]:
    """FPN's top-down path over levels given finest first: from the coarsest down, each level
    plus the sum formed at the next coarser one, resized (bilinear, align_corners=False, as
    mmsegmentation) to the level's exact size, so sizes need not halve (7 -> 3 -> 7)."""
    sums = [laterals[-1]]
    for lateral in reversed(laterals[:-1]):
        sums.append(lateral + resize_bilinear(sums[-1], lateral.shape[1:3]))
    return sums[::-1]


class LinearHead(nn.Module):
    """The standard linear probe: ``classifier`` (1x1 conv with bias) on the last map, resized.
    Parameters ``classifier/{kernel (1, 1, C, K), bias (K,)}``; no BatchNorm, no dropout."""

    num_outputs: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    upsample: str = "bilinear"

    @nn.compact
    def __call__(
        self, features: Sequence[jax.Array], output_size: tuple[int, int], *, train: bool = False
    ) -> jax.Array:
        del train  # nothing in a linear probe differs between training and evaluation
        x = check_features(features)[-1].astype(self.dtype)
        logits = classifier_conv(self.num_outputs, self.dtype, self.param_dtype)(x)
        return resized_logits(logits, output_size, self.upsample)


class DeepLabV3Head(nn.Module):
    """CoreNet's DeepLabV3 head: ``aspp`` (:class:`~models.pyramid.AtrousSpatialPyramidPooling`:
    1x1, three 3x3 atrous at ``rates``, image pooling; each conv + BatchNorm + ReLU to
    ``channels``; concat -> 1x1 projection + BatchNorm + ReLU -> channel dropout) ->
    ``classifier``. Rates (6, 12, 18) suit output stride 16; (12, 24, 36) output stride 8."""

    num_outputs: int
    channels: int = 256
    rates: Sequence[int] = (6, 12, 18)
    dropout: float = 0.1
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    upsample: str = "bilinear"

    @nn.compact
    def __call__(
        self, features: Sequence[jax.Array], output_size: tuple[int, int], *, train: bool = False
    ) -> jax.Array:
        x = check_features(features)[-1].astype(self.dtype)
        x = AtrousSpatialPyramidPooling(
            self.channels,
            self.rates,
            self.dropout,
            bn_groups=self.bn_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="aspp",
        )(x, train=train)
        logits = classifier_conv(self.num_outputs, self.dtype, self.param_dtype)(x)
        return resized_logits(logits, output_size, self.upsample)


class PSPHead(nn.Module):
    """CoreNet's PSPNet head: ``psp`` (:class:`~models.pyramid.PyramidPoolingModule`: pools at
    ``bins``, each 1x1 conv + BatchNorm + ReLU to C / len(bins) channels (CoreNet's rounding)
    and resized back with aligned corners; concat with the map -> 3x3 conv + BatchNorm + ReLU to
    ``channels`` -> channel dropout) -> ``classifier``."""

    num_outputs: int
    channels: int = 512
    bins: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    upsample: str = "bilinear"

    @nn.compact
    def __call__(
        self, features: Sequence[jax.Array], output_size: tuple[int, int], *, train: bool = False
    ) -> jax.Array:
        x = pyramid_pooled(self, features, train)
        logits = classifier_conv(self.num_outputs, self.dtype, self.param_dtype)(x)
        return resized_logits(logits, output_size, self.upsample)


class UperNetHead(nn.Module):
    """mmsegmentation's UPerHead, over ViTDet's simple feature pyramid when given one map.

    Levels (finest first): with one map, ``pyramid`` (:class:`~models.pyramid.SimpleFeaturePyramid`,
    ``pyramid_channels``) makes strides 4, 8, 16, 32 of it; with several maps they are the
    levels. The coarsest goes through ``ppm`` (bins ``bins``, branches of ``channels``, resized
    without aligned corners, 3x3 bottleneck; no dropout), the others through ``lateral_<i>`` (1x1
    conv + BatchNorm + ReLU). Top-down (:func:`top_down_sums`), each level adds the sum formed
    at the next coarser one; ``fpn_<i>`` (3x3 conv + BatchNorm + ReLU) then smooths each sum but
    the coarsest. All levels are
    resized to the finest, concatenated -> ``fusion`` (3x3 conv + BatchNorm + ReLU) -> channel
    dropout -> ``classifier``."""

    num_outputs: int
    channels: int = 512
    pyramid_channels: int = 256
    bins: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    upsample: str = "bilinear"

    @nn.compact
    def __call__(
        self, features: Sequence[jax.Array], output_size: tuple[int, int], *, train: bool = False
    ) -> jax.Array:
        levels = [feature.astype(self.dtype) for feature in check_features(features)]
        settings = {
            "bn_groups": self.bn_groups,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }
        if len(levels) == 1:
            pyramid = SimpleFeaturePyramid(self.pyramid_channels, name="pyramid", **settings)
            levels = pyramid(levels[0], train=train)
        unit = functools.partial(ConvNormAct, self.channels, **settings)
        ppm = PyramidPoolingModule(
            self.channels,
            self.bins,
            branch_channels=self.channels,
            align_corners=False,
            dropout=0.0,
            name="ppm",
            **settings,
        )
        laterals = [unit(name=f"lateral_{i}")(x, train=train) for i, x in enumerate(levels[:-1])]
        laterals.append(ppm(levels[-1], train=train))
        sums = top_down_sums(laterals)
        outputs = [
            unit(kernel_size=3, name=f"fpn_{i}")(x, train=train) for i, x in enumerate(sums[:-1])
        ]
        outputs.append(sums[-1])
        finest = outputs[0].shape[1:3]
        outputs = [resize_bilinear(x, finest) for x in outputs]
        fused = unit(kernel_size=3, name="fusion")(jnp.concatenate(outputs, axis=-1), train=train)
        fused = channel_dropout(self.dropout, fused, train)
        logits = classifier_conv(self.num_outputs, self.dtype, self.param_dtype)(fused)
        return resized_logits(logits, output_size, self.upsample)


class MultiTaskPSPHeads(nn.Module):
    """CLIPTeX's light task heads: ``psp`` (:class:`~models.pyramid.PyramidPoolingModule`, CoreNet's
    defaults: bins (1, 2, 3, 6), 512 channels, dropout 0.1) on the last map, shared by the tasks,
    then per task ``head_<name>`` (a 1x1 convolution with bias, initialised as ``classifier``)
    resized to ``output_size`` by ``upsample`` (the paper upsamples to the label size by nearest
    neighbour). ``outputs``: (task name, output channels) pairs; returns {name: (B, H, W, K)
    float32}."""

    outputs: Sequence[tuple[str, int]]
    channels: int = 512
    bins: Sequence[int] = (1, 2, 3, 6)
    dropout: float = 0.1
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    upsample: str = "nearest"

    @nn.compact
    def __call__(
        self, features: Sequence[jax.Array], output_size: tuple[int, int], *, train: bool = False
    ) -> dict[str, jax.Array]:
        x = pyramid_pooled(self, features, train)
        results = {}
        for name, count in self.outputs:
            head = classifier_conv(count, self.dtype, self.param_dtype, name=f"head_{name}")
            results[name] = resized_logits(head(x), output_size, self.upsample)
        return results


DENSE_HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearHead,
    "deeplabv3": DeepLabV3Head,
    "pspnet": PSPHead,
    "upernet": UperNetHead,
}


def build_dense_head(name: str, num_outputs: int, **fields: Any) -> nn.Module:
    """``DENSE_HEADS[name](num_outputs, **fields)``, with the known names in the error."""
    if name not in DENSE_HEADS:
        raise ValueError(f"unknown dense head {name!r}; choose from {sorted(DENSE_HEADS)}")
    return DENSE_HEADS[name](num_outputs, **fields)
