"""CLIP's modified ResNet image tower (open_clip's ``ModifiedResNet``: RN50, RN101, RN50x4...).

Differences from a torchvision ResNet, all kept here because exported weights must run the same
in open_clip:

* a stem of three 3x3 convolutions (the first with stride 2; widths ``width // 2``,
  ``width // 2``, ``width``), each with BatchNorm and ReLU, then a 2x2 average pool (no max pool);
* anti-aliased strided bottlenecks: every convolution has stride 1, and a ``stride`` x ``stride``
  average pool runs after the 3x3 convolution (main branch) and before the 1x1 downsampling
  convolution (shortcut);
* an attention-pooling head instead of global average pooling: the spatial mean is prepended to
  the final feature map's positions as a query token, learned position embeddings are added, and
  one multi-head attention of that token over all tokens, projected by ``c_proj`` to
  ``output_dim``, is the embedding.

Images are (B, H, W, 3) NHWC, normalised. ``__call__(images, train=...)`` returns ``(embedding,
intermediates)``; with ``train=True`` BatchNorm normalises with the batch's statistics (each of
``bn_groups`` equal slices of the batch with its own, see models/batchnorm.py) and updates the
running averages, so the caller applies with ``mutable=["batch_stats"]``; with ``train=False`` it
uses the running averages.
Intermediates, for evaluators and dense heads:

* ``stem`` (B, H/4, W/4, width): after the stem's average pool;
* ``stage_1`` .. ``stage_4`` (B, H/4 .. H/32, W/4 .. W/32, 4 * width * 2**i): each stage's
  output (open_clip's ``layer1`` .. ``layer4``);
* ``patch_tokens``: ``stage_4`` again, the final grid (the name the ViT uses for its grid);
* ``pre_logits`` (B, 32 * width): the attention-pooled token before ``c_proj``.

Parameter names follow open_clip's (``conv1``, ``bn1``, ``layer1_0/conv1``,
``layer1_0/downsample_0``, ``attnpool/q_proj``...), so the export (pretrain/export/
open_clip_resnet.py) is a renaming plus layout changes. The attention projections are laid out
(width, heads, head_dim) / (heads, head_dim, output_dim) as in models/layers.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.batchnorm import TORCH_BATCH_NORM_EPS, TORCH_BATCH_NORM_MOMENTUM, GroupedBatchNorm
from models.layers import REMAT_POLICIES, Dtype, normal_init
from models.rope import as_pair
from models.vit import resize_position_grid

# open_clip's model_configs/RN*.json: blocks per stage, stem width, joint embedding width.
RESNET_VARIANTS: dict[str, dict[str, Any]] = {
    "RN50": {"layers": (3, 4, 6, 3), "width": 64, "output_dim": 1024},
    "RN101": {"layers": (3, 4, 23, 3), "width": 64, "output_dim": 512},
    "RN50x4": {"layers": (4, 6, 10, 6), "width": 80, "output_dim": 640},
    "RN50x16": {"layers": (6, 8, 18, 8), "width": 96, "output_dim": 768},
    "RN50x64": {"layers": (3, 15, 36, 10), "width": 128, "output_dim": 1024},
}
# A bottleneck's output has 4x the channels of its 3x3 convolution.
BOTTLENECK_EXPANSION = 4
# The final feature map has 32 * width channels (width * 2**3 * 4); it is 32x smaller than the
# image (stem 4x, stages 2..4 2x each).
FEATURE_WIDTH_FACTOR = 32
# open_clip's attention pool: heads = feature width // 64.
ATTENTION_HEAD_WIDTH = 64
# ResNets are usually initialised with He-normal (fan-out) convolutions: each is followed by a
# BatchNorm, so the scale matters little, but ReLU's halving of the variance is accounted for.
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def resnet_variant(name: str) -> dict[str, Any]:
    """``layers``, ``width``, ``num_heads`` and ``output_dim`` of an open_clip ResNet name."""
    if name not in RESNET_VARIANTS:
        raise ValueError(f"unknown ResNet variant {name!r}; choose from {list(RESNET_VARIANTS)}")
    variant = dict(RESNET_VARIANTS[name])
    variant["num_heads"] = variant["width"] * FEATURE_WIDTH_FACTOR // ATTENTION_HEAD_WIDTH
    return variant


def average_pool(x: jax.Array, size: int) -> jax.Array:
    """torch's ``AvgPool2d(size)``: non-overlapping size x size windows, trailing rows dropped."""
    if size == 1:
        return x
    return nn.avg_pool(x, (size, size), strides=(size, size), padding="VALID")


@dataclasses.dataclass(frozen=True)
class ConvBatchNormFactory:
    """Builds the tower's bias-free convolutions and BatchNorms with shared settings, so that
    every BatchNorm of the tower gets the same grouping, momentum and epsilon. Frozen (hashable):
    it is a field of the (possibly rematerialised) blocks."""

    dtype: Dtype
    param_dtype: Dtype
    bn_groups: int
    momentum: float
    epsilon: float

    def conv(self, features: int, kernel_size: int, name: str, strides: int = 1) -> nn.Conv:
        # Explicit symmetric padding: torch's padding=1 on a stride-2 convolution pads both sides,
        # where "SAME" would pad only the bottom/right of an even-sized input.
        pad = kernel_size // 2
        return nn.Conv(
            features,
            kernel_size=(kernel_size, kernel_size),
            strides=(strides, strides),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=CONV_INIT,
            name=name,
        )

    def batch_norm(self, name: str, zero_scale: bool = False) -> nn.Module:
        return GroupedBatchNorm(
            num_groups=self.bn_groups,
            momentum=self.momentum,
            epsilon=self.epsilon,
            scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> [avg pool] -> 1x1 (x4 channels) with BatchNorms, plus the shortcut.

    The last BatchNorm's scale starts at zero (open_clip's init), so that every block starts as
    the identity. The shortcut is ``[avg pool] -> 1x1 conv -> BatchNorm`` (``downsample_0``,
    ``downsample_1``) when the block changes the resolution or the channel count.
    """

    planes: int
    stride: int
    layers: ConvBatchNormFactory

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        layers = self.layers
        bn = lambda name, y, zero_scale=False: layers.batch_norm(name, zero_scale)(
            y, use_running_average=not train
        )
        out = nn.relu(bn("bn1", layers.conv(self.planes, 1, "conv1")(x)))
        out = nn.relu(bn("bn2", layers.conv(self.planes, 3, "conv2")(out)))
        out = average_pool(out, self.stride)
        out_channels = self.planes * BOTTLENECK_EXPANSION
        out = bn("bn3", layers.conv(out_channels, 1, "conv3")(out), zero_scale=True)

        identity = x
        if self.stride > 1 or x.shape[-1] != out_channels:
            identity = average_pool(identity, self.stride)
            identity = bn("downsample_1", layers.conv(out_channels, 1, "downsample_0")(identity))
        return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
    """One multi-head attention of the mean token over [mean token, grid tokens] + positions.

    Only the mean token's query is computed: it is the only output open_clip keeps. Returns
    ``(c_proj output (B, output_dim), attended (B, width))``. ``pos_embed_grid``: the grid the
    position embeddings are stored for (None: the input's); another input grid resizes them.
    """

    num_heads: int
    output_dim: int | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    pos_embed_grid: int | tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch, rows, cols, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"feature width {width} is not divisible by {self.num_heads} heads")
        grid = (rows, cols)
        tokens = x.reshape(batch, rows * cols, width)
        # The mean over the grid in float32: a bf16 sum over many positions loses precision.
        mean_token = tokens.mean(axis=1, keepdims=True, dtype=jnp.float32).astype(self.dtype)
        tokens = jnp.concatenate([mean_token, tokens.astype(self.dtype)], axis=1)

        stored_grid = as_pair(self.pos_embed_grid) if self.pos_embed_grid else grid
        std = width**-0.5
        positions = self.param(
            "positional_embedding",
            normal_init(std),
            (1 + stored_grid[0] * stored_grid[1], width),
            self.param_dtype,
        )
        grid_positions = positions[1:]
        if stored_grid != grid:
            grid_positions = resize_position_grid(grid_positions, stored_grid, grid)
        positions = jnp.concatenate([positions[:1].astype(jnp.float32), grid_positions])
        tokens = tokens + positions.astype(self.dtype)

        project_in = functools.partial(
            nn.DenseGeneral,
            features=(self.num_heads, width // self.num_heads),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=normal_init(std),
        )
        query = project_in(name="q_proj")(tokens[:, :1])
        key = project_in(name="k_proj")(tokens)
        value = project_in(name="v_proj")(tokens)
        attended = jax.nn.dot_product_attention(query, key, value)[:, 0]  # (B, heads, head_dim)
        output = nn.DenseGeneral(
            features=self.output_dim or width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=normal_init(std),
            name="c_proj",
        )(attended)
        return output, attended.reshape(batch, width)


class ModifiedResNet(nn.Module):
    """open_clip's ``ModifiedResNet`` image tower; ``from_variant("RN50")`` etc.

    ``layers``: bottleneck blocks per stage; ``width``: the stem's width (stage i has
    ``width * 2**i`` planes); ``num_heads`` of the attention pool (open_clip: ``32 * width //
    64``); ``output_dim``: the attention pool's output (None: the feature width ``32 * width``, as
    open_clip's ``output_dim or embed_dim``). ``bn_groups``: BatchNorm statistics are computed per
    group of that many equal slices of the batch (1: over the global batch);
    ``batch_norm_momentum`` has Flax's convention (running = momentum * running + (1 - momentum)
    * batch statistic; the default 0.9 is torch's 0.1) and ``batch_norm_eps`` torch's default.
    ``remat_policy`` rematerialises each bottleneck (see models/layers.py).
    ``pos_embed_grid``: the final grid the attention pool's position embeddings are stored for
    (None: the input's, e.g. 7 at 224 px); inputs of another size resize them.
    """

    layers: Sequence[int] = RESNET_VARIANTS["RN50"]["layers"]
    width: int = 64
    num_heads: int = 32
    output_dim: int | None = 1024
    bn_groups: int = 1
    batch_norm_momentum: float = TORCH_BATCH_NORM_MOMENTUM
    batch_norm_eps: float = TORCH_BATCH_NORM_EPS
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    pos_embed_grid: int | tuple[int, int] | None = None

    @classmethod
    def from_variant(cls, variant: str, **kwargs: Any) -> ModifiedResNet:
        """E.g. ``ModifiedResNet.from_variant("RN50", output_dim=1024)``; kwargs override the
        variant's fields."""
        return cls(**{**resnet_variant(variant), **kwargs})

    def _block_class(self) -> Callable[..., nn.Module]:
        if self.remat_policy == "none":
            return Bottleneck
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat_policy {self.remat_policy!r}; choose from "
                f"{['none', *REMAT_POLICIES]}"
            )
        # ``train`` (argument 2, counting the module as 0) picks Python branches: static.
        return nn.remat(Bottleneck, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(2,))

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, Any]]:
        if len(self.layers) != 4:
            raise ValueError(f"layers must give 4 stages' block counts, got {self.layers}")
        layers = ConvBatchNormFactory(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            bn_groups=self.bn_groups,
            momentum=self.batch_norm_momentum,
            epsilon=self.batch_norm_eps,
        )
        intermediates: dict[str, Any] = {}
        x = images.astype(self.dtype)
        stem = ((self.width // 2, 2), (self.width // 2, 1), (self.width, 1))
        for index, (features, stride) in enumerate(stem, start=1):
            x = layers.conv(features, 3, f"conv{index}", strides=stride)(x)
            x = nn.relu(layers.batch_norm(f"bn{index}")(x, use_running_average=not train))
        x = average_pool(x, 2)
        intermediates["stem"] = x

        block_class = self._block_class()
        for stage, blocks in enumerate(self.layers, start=1):
            planes = self.width * 2 ** (stage - 1)
            for index in range(blocks):
                stride = 2 if stage > 1 and index == 0 else 1
                x = block_class(planes, stride, layers, name=f"layer{stage}_{index}")(x, train)
            intermediates[f"stage_{stage}"] = x
        intermediates["patch_tokens"] = x

        embedding, attended = AttentionPool2d(
            num_heads=self.num_heads,
            output_dim=self.output_dim,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            pos_embed_grid=self.pos_embed_grid,
            name="attnpool",
        )(x)
        intermediates["pre_logits"] = attended
        return embedding, intermediates
