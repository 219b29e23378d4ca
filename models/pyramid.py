"""Multi-scale context modules that dense heads (models/dense_heads.py) put on an image tower.

All take and return NHWC maps; ``train=True`` normalises with batch statistics and updates the
running ones (collection ``batch_stats``, models/batchnorm.py's :class:`GroupedBatchNorm` with
PyTorch's momentum and epsilon) and draws channel dropout from the ``dropout`` rng.

* :class:`ConvNormAct`: convolution (no bias: the BatchNorm's offset replaces it) ->
  BatchNorm -> activation, the unit that CoreNet's ``ConvLayer2d(use_norm, use_act)``,
  torchvision's ``Conv2d + BatchNorm2d + ReLU`` and mmsegmentation's ``ConvModule`` all are.
* :class:`AtrousSpatialPyramidPooling` (DeepLabV3, Chen et al. 2017, as CoreNet's ``ASPP``):
  (B, H, W, C) -> (B, H, W, channels). Parallel 1x1, three 3x3 atrous and image-pooling branches,
  concatenated, projected by a 1x1 convolution, channel dropout.
* :class:`PyramidPoolingModule` (PSPNet, Zhao et al. 2017, as CoreNet's ``PSP``): (B, H, W, C) ->
  (B, H, W, channels). The map and its adaptive average pools at ``bins``, each pool through a
  1x1 convolution and resized back, concatenated, fused by a 3x3 convolution, channel dropout.
  One module can feed several 1x1 task heads (CLIPTeX shares one between its tasks).
* :class:`SimpleFeaturePyramid` (ViTDet, Li et al. 2022, detectron2's ``SimpleFeaturePyramid``):
  one stride-16 map (B, h, w, C) -> four maps of ``channels`` at strides 4, 8, 16, 32, finest
  first: (B, 4h, 4w), (B, 2h, 2w), (B, h, w), (B, h // 2, w // 2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.batchnorm import GroupedBatchNorm
from models.layers import Dtype, activation_fn
from models.spatial import adaptive_avg_pool2d, resize_bilinear

# He-normal (fan-out) convolutions, as CoreNet's and mmsegmentation's heads initialise theirs:
# each is followed by a BatchNorm and usually a ReLU, whose halving of the variance it offsets.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# CoreNet's PSP rounds its branch width C / len(bins) down to a multiple of 16.
PSP_BRANCH_MULTIPLE = 16
# ViTDet's pyramid: relative scales of its four levels, and the stage each becomes
# (stride 2**stage: the input is taken to be stride 16, stage 4).
VITDET_SCALES = (4.0, 2.0, 1.0, 0.5)
VITDET_STAGES = {4.0: 2, 2.0: 3, 1.0: 4, 0.5: 5}


def channel_dropout(rate: float, x: jax.Array, train: bool) -> jax.Array:
    """PyTorch's ``Dropout2d`` (what CoreNet's and mmsegmentation's heads use): whole channels of
    each example are zeroed together, survivors scaled by ``1 / (1 - rate)``."""
    return nn.Dropout(rate, broadcast_dims=(1, 2))(x, deterministic=not train)


def psp_branch_channels(in_channels: int, num_bins: int) -> int:
    """CoreNet's PSP branch width: ``in_channels // num_bins`` rounded down to a multiple of 16
    (768 channels, 4 bins: 192). Widths under 16 (test-sized towers, where CoreNet's rule would
    give none) are kept unrounded."""
    width = in_channels // num_bins
    if width < 1:
        raise ValueError(f"{in_channels} channels cannot be split over {num_bins} bins")
    return (width // PSP_BRANCH_MULTIPLE) * PSP_BRANCH_MULTIPLE or width


class ConvNormAct(nn.Module):
    """k x k convolution (dilated, 'same' size, no bias) -> BatchNorm -> ``activation`` (None:
    none). Parameters ``conv/kernel`` (k, k, C, features), ``norm/{scale,bias}``."""

    features: int
    kernel_size: int = 1
    dilation: int = 1
    activation: Callable[[jax.Array], jax.Array] | None = nn.relu
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        # Symmetric padding of dilation * (k // 2): PyTorch's padding=dilation for the atrous 3x3.
        pad = self.dilation * (self.kernel_size // 2)
        x = nn.Conv(
            self.features,
            kernel_size=(self.kernel_size, self.kernel_size),
            kernel_dilation=(self.dilation, self.dilation),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=CONV_INIT,
            name="conv",
        )(x)
        x = GroupedBatchNorm(
            num_groups=self.bn_groups, dtype=self.dtype, param_dtype=self.param_dtype, name="norm"
        )(x, use_running_average=not train)
        return x if self.activation is None else self.activation(x)


class AtrousSpatialPyramidPooling(nn.Module):
    """DeepLabV3's ASPP (CoreNet's ``ASPP``; torchvision's without its 0.5 dropout): branches
    ``conv_1x1``, ``atrous_<i>`` (3x3, dilation ``rates[i]``) and ``image_pool`` (global mean ->
    1x1 conv -> broadcast back), each with BatchNorm and ReLU, concatenated -> ``project`` (1x1
    + BatchNorm + ReLU) -> channel dropout. CoreNet's defaults: rates (6, 12, 18) (output stride
    16; (12, 24, 36) at output stride 8), 256 channels, dropout 0.1."""

    channels: int = 256
    rates: Sequence[int] = (6, 12, 18)
    dropout: float = 0.1
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        unit = functools.partial(
            ConvNormAct,
            self.channels,
            bn_groups=self.bn_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        branches = [unit(name="conv_1x1")(x, train=train)]
        for index, rate in enumerate(self.rates):
            atrous = unit(kernel_size=3, dilation=rate, name=f"atrous_{index}")
            branches.append(atrous(x, train=train))
        # The mean over the grid in float32 (a bf16 sum over many positions loses precision).
        pooled = x.mean(axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(x.dtype)
        pooled = unit(name="image_pool")(pooled, train=train)
        # Bilinear resizing of a 1x1 map (align_corners=False) is exactly a broadcast.
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.channels)))
        out = unit(name="project")(jnp.concatenate(branches, axis=-1), train=train)
        return channel_dropout(self.dropout, out, train)


class PyramidPoolingModule(nn.Module):
    """PSPNet's pyramid pooling (CoreNet's ``PSP``): the map and ``resize(branch_<i>(pool(x,
    bins[i])))`` for each bin count, concatenated -> ``fusion`` (3x3 conv + BatchNorm + ReLU) ->
    channel dropout.

    ``branch_channels``: width of each branch's 1x1 conv + BatchNorm + ReLU (None: CoreNet's
    :func:`psp_branch_channels`; mmsegmentation's UPerHead uses ``channels``). ``align_corners``
    of the bilinear resizing back to the map's size: CoreNet's PSP aligns corners,
    mmsegmentation's PPM does not. Defaults are CoreNet's PSPNet: bins (1, 2, 3, 6), 512
    channels, dropout 0.1.

    A task with several dense outputs from one shared module (CLIPTeX) applies one instance and a
    1x1 convolution per task to its output, as :class:`~models.dense_heads.PSPHead` does for one.
    """

    channels: int = 512
    bins: Sequence[int] = (1, 2, 3, 6)
    branch_channels: int | None = None
    align_corners: bool = True
    dropout: float = 0.1
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        unit = functools.partial(
            ConvNormAct, bn_groups=self.bn_groups, dtype=self.dtype, param_dtype=self.param_dtype
        )
        width = self.branch_channels or psp_branch_channels(x.shape[-1], len(self.bins))
        size = x.shape[1:3]
        levels = [x]
        for index, bins in enumerate(self.bins):
            pooled = unit(width, name=f"branch_{index}")(adaptive_avg_pool2d(x, bins), train=train)
            levels.append(resize_bilinear(pooled, size, align_corners=self.align_corners))
        fused = unit(self.channels, kernel_size=3, name="fusion")(
            jnp.concatenate(levels, axis=-1), train=train
        )
        return channel_dropout(self.dropout, fused, train)


class PyramidLevel(nn.Module):
    """One level of :class:`SimpleFeaturePyramid` (detectron2's ``simfp_<stage>``): rescale by
    ``scale``, then ``lateral`` (1x1 conv + BatchNorm) and ``output`` (3x3 conv + BatchNorm).

    Rescaling as ViTDet: 4 = ``deconv_0`` (2x2, stride 2, C/2) -> ``norm_0`` -> GELU ->
    ``deconv_1`` (2x2, stride 2, C/4); 2 = ``deconv_0`` (C/2); 1 = identity; 0.5 = 2x2 max pool,
    stride 2 (odd sizes floored: 7x5 -> 3x2). ViTDet normalises with LayerNorm; this project's
    heads use BatchNorm. The transposed convolutions have no bias, unlike ViTDet's: each is
    followed (through at most the linear ``lateral`` conv) by a BatchNorm, which removes any
    per-channel constant, so a bias would never train.
    """

    scale: float
    channels: int = 256
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _deconv(self, features: int, name: str) -> nn.ConvTranspose:
        return nn.ConvTranspose(
            features,
            kernel_size=(2, 2),
            strides=(2, 2),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=CONV_INIT,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        width = x.shape[-1]
        if self.scale == 4.0:
            x = self._deconv(width // 2, "deconv_0")(x)
            x = GroupedBatchNorm(
                num_groups=self.bn_groups,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="norm_0",
            )(x, use_running_average=not train)
            x = activation_fn("gelu")(x)
            x = self._deconv(width // 4, "deconv_1")(x)
        elif self.scale == 2.0:
            x = self._deconv(width // 2, "deconv_0")(x)
        elif self.scale == 0.5:
            if min(x.shape[1:3]) < 2:
                raise ValueError(f"a {x.shape[1:3]} grid is too small to max-pool 2x2")
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        elif self.scale != 1.0:
            raise ValueError(f"unknown pyramid scale {self.scale}; choose from {VITDET_SCALES}")
        unit = functools.partial(
            ConvNormAct,
            self.channels,
            activation=None,
            bn_groups=self.bn_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = unit(name="lateral")(x, train=train)
        return unit(kernel_size=3, name="output")(x, train=train)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one map -> one :class:`PyramidLevel` per scale, named
    ``simfp_<stage>`` (stride 2**stage for a stride-16 input), returned in the order of
    ``scales`` (the default's: finest first, as the heads take them). Any input stride works;
    the levels are then at 1/4, 1/2, 1 and 2 times it."""

    channels: int = 256
    scales: Sequence[float] = VITDET_SCALES
    bn_groups: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
        if x.shape[-1] < 4:
            raise ValueError(f"the pyramid's x4 level needs >= 4 input channels, got {x.shape}")
        levels = []
        for scale in self.scales:
            if scale not in VITDET_STAGES:
                raise ValueError(f"unknown pyramid scale {scale}; choose from {VITDET_SCALES}")
            level = PyramidLevel(
                scale,
                self.channels,
                bn_groups=self.bn_groups,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"simfp_{VITDET_STAGES[scale]}",
            )
            levels.append(level(x, train=train))
        return levels
