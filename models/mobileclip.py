"""MobileCLIP's hybrid image towers MCi0 / MCi1 / MCi2 (FastViT family), with re-parameterisation.

Layout (NHWC throughout; timm's ``fastvit_mci*``, which open_clip's MobileCLIP-S0/S1/S2 use as
``visual.trunk``):

* stem: three MobileOne blocks (3x3 stride 2, depthwise 3x3 stride 2, 1x1), GELU;
* four stages of widths ``widths`` and depths ``depths``; stages 2-4 start with a patch embedding
  that halves the resolution (a 7x7 grouped "large kernel" conv with a 3x3 branch, GELU, squeeze-
  excitation in stages 3-4, then a 1x1 MobileOne block). Stages 1-3 mix tokens with RepMixer
  (``x + layer_scale * (mixer(x) - norm(x))``, both depthwise 3x3 MobileOne blocks); stage 4 has a
  conditional positional encoding (RepCPE: ``x + dwconv7x7(x)``) and pre-BatchNorm self-
  attention blocks (head width 32, no q/k/v bias). Every block's FFN is a ConvMlp (depthwise 7x7
  conv + BN, 1x1 expansion by ``mlp_ratio`` = 3, GELU, 1x1), residual with layer scale;
* a final 3x3 MobileOne block to ``cls_ratio`` x the last width with squeeze-excitation, global
  average pooling (``pre_logits``) and a linear projection with bias to ``output_dim`` (timm's
  ``head.fc``, which open_clip's MobileCLIP configs use as the CLIP projection: ``timm_proj``
  null, ``timm_pool`` "avg").

Train-time form (``reparameterized=False``): MobileOne blocks are a sum of BatchNorm'd branches
(kxk conv, 1x1 "scale" conv, identity BN), the large-kernel conv has a small-kernel branch, RepMixer
and RepCPE keep their identity paths. :func:`reparameterize` folds all of these, with their
BatchNorms (running statistics), into single convolutions with a bias (``reparam_conv``) and
returns the inference tower (``reparameterized=True``); its outputs equal the train-time tower's
in evaluation mode. As in timm's ``inference_mode`` and Apple's release, the ConvMlp's conv + BN
and the attention blocks' BatchNorm stay as they are.

Parameter counts (train-time / inference form, with a 512-d projection): MCi0 11,406,976 /
11,357,504; MCi1 21,541,632 / 21,461,056; MCi2 35,815,232 / 35,702,992. The MobileCLIP paper's
11.4M / 21.5M / 35.7M are the inference form with the projection (timm's counts are the same).

BatchNorm is :class:`models.batchnorm.GroupedBatchNorm` (``bn_groups`` groups of the global
batch; 1 = synchronised over all devices). ``__call__(images, train=True)`` normalises with batch
statistics and updates ``batch_stats`` (apply with ``mutable=["batch_stats"]``); ``train=False``
uses the running statistics.

Depthwise convolutions (``depthwise_impl``): "conv" is ``lax.conv_general_dilated`` with
``feature_group_count``; "shifts" computes the same sum as K*K shifted, per-channel-scaled copies
of the padded input (:func:`depthwise_conv_shifts`, with its own gradients); "auto" (default)
picks "shifts" on the CPU backend and "conv" elsewhere. XLA:CPU has no fast depthwise kernel: its
grouped convs run at ~2 GFLOP/s, and the kernel gradient of a depthwise conv with a channel
multiplier (the patch embeddings' 7x7 / 3x3 convs, the final conv: ``features`` = 2 x input
channels) is ~100x slower still, which made a 64 px train step of the shallow runlocal MCi0 take
over 5 s instead of 0.25 s (bench/mci_cpu_step.py). Parameters and outputs are the same either
way (float32 round-off).

Returns ``(embedding, intermediates)``: ``stage_0`` .. ``stage_3`` (B, h, w, width_i) stage outputs
(strides 4, 8, 16, 32), ``final_features`` (B, h/32, w/32, cls_ratio * widths[-1]) the final
conv's output, ``pre_logits`` (B, width) its average; embedding = ``pre_logits @ head + bias``
(or ``pre_logits`` when ``output_dim`` is None).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.batchnorm import TORCH_BATCH_NORM_EPS, TORCH_BATCH_NORM_MOMENTUM, GroupedBatchNorm
from models.layers import REMAT_POLICIES, Dtype, MultiHeadAttention

MCI_VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "mci0": {"depths": (2, 6, 10, 2), "widths": (64, 128, 256, 512)},
    "mci1": {"depths": (4, 12, 20, 4), "widths": (64, 128, 256, 512)},
    "mci2": {"depths": (4, 12, 24, 4), "widths": (80, 160, 320, 640)},
}
TOKEN_MIXERS = ("repmixer", "attention")

REPMIXER_KERNEL = 3
CONV_MLP_KERNEL = 7
POS_EMB_KERNEL = 7
DOWNSAMPLE_KERNEL = 7
DOWNSAMPLE_SMALL_KERNEL = 3
# Squeeze-excitation widths: channels / 16 (rounded) after the final conv, channels / 4 rounded to
# a multiple of 8 in the patch embeddings (timm's SEModule arguments for these layers).
FINAL_SE_RATIO, FINAL_SE_DIVISOR = 1 / 16, 1
DOWNSAMPLE_SE_RATIO, DOWNSAMPLE_SE_DIVISOR = 1 / 4, 8


def make_divisible(value: float, divisor: int) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), as timm
    sizes squeeze-excitation layers (``round_limit=0``: never bumped up)."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def gelu(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=False)  # PyTorch's nn.GELU default (erf)


@dataclasses.dataclass(frozen=True)
class Layers:
    """Builds the tower's convs, dense layers and BatchNorms with the settings they share (dtypes,
    BatchNorm groups / momentum / eps / mode); frozen, so that modules can hold it as a field."""

    num_groups: int = 1
    momentum: float = TORCH_BATCH_NORM_MOMENTUM
    epsilon: float = TORCH_BATCH_NORM_EPS
    use_running_average: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    depthwise_impl: str = "conv"  # "conv" | "shifts", resolved (see resolve_depthwise_impl)

    def batch_norm(self, name: str) -> GroupedBatchNorm:
        return GroupedBatchNorm(
            num_groups=self.num_groups,
            momentum=self.momentum,
            epsilon=self.epsilon,
            use_running_average=self.use_running_average,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def conv(
        self,
        features: int,
        kernel_size: int,
        *,
        name: str,
        strides: int = 1,
        groups: int = 1,
        use_bias: bool = False,
    ) -> nn.Conv:
        """A conv padded by kernel_size // 2 on every side (PyTorch's symmetric padding: "SAME"
        would pad a stride-2 conv of an even input on the bottom/right only). Grouped convs are
        all depthwise in this tower (groups = input channels); with ``depthwise_impl`` "shifts"
        they run through :func:`depthwise_conv_shifts` (same parameters, same math)."""
        pad = kernel_size // 2
        depthwise = groups > 1 and self.depthwise_impl == "shifts"
        implementation = {"conv_general_dilated": depthwise_conv_shifts} if depthwise else {}
        return nn.Conv(
            features,
            (kernel_size, kernel_size),
            strides=(strides, strides),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=groups,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
            **implementation,
        )

    def dense(self, features: int, *, name: str, use_bias: bool = True) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm: one re-parameterisable branch (timm's ConvNormAct, no act)."""

    features: int
    kernel_size: int
    layers: Layers
    strides: int = 1
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.layers.conv(
            self.features, self.kernel_size, strides=self.strides, groups=self.groups, name="conv"
        )(x)
        return self.layers.batch_norm("bn")(x)


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean_hw(x))))); fc1/fc2 are timm's 1x1 convs (with biases)."""

    reduced: int
    layers: Layers

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        squeezed = x.mean(axis=(1, 2))
        squeezed = nn.relu(self.layers.dense(self.reduced, name="fc1")(squeezed))
        gate = jax.nn.sigmoid(self.layers.dense(x.shape[-1], name="fc2")(squeezed))
        return x * gate[:, None, None, :]


class MobileOneBlock(nn.Module):
    """Sum of branches (``num_conv_branches`` kxk conv+BN, a 1x1 conv+BN "scale" branch when
    k > 1, an identity BN when the shape is kept), then squeeze-excitation and GELU (optional).
    ``reparameterized``: one kxk conv with a bias (``reparam_conv``) replaces the sum."""

    features: int
    kernel_size: int
    layers: Layers
    strides: int = 1
    groups: int = 1
    use_se: bool = False
    use_act: bool = True
    use_scale_branch: bool = True
    num_conv_branches: int = 1
    reparameterized: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        geometry = dict(strides=self.strides, groups=self.groups)
        branch = dict(layers=self.layers, **geometry)
        if self.reparameterized:
            out = self.layers.conv(
                self.features, self.kernel_size, use_bias=True, name="reparam_conv", **geometry
            )(x)
        else:
            out = jnp.zeros((), x.dtype)
            if x.shape[-1] == self.features and self.strides == 1:
                out = out + self.layers.batch_norm("identity")(x)
            for index in range(self.num_conv_branches):
                name = f"conv_kxk_{index}"
                out = out + ConvBN(self.features, self.kernel_size, name=name, **branch)(x)
            if self.kernel_size > 1 and self.use_scale_branch:
                out = out + ConvBN(self.features, 1, name="conv_scale", **branch)(x)
        if self.use_se:
            reduced = make_divisible(self.features * FINAL_SE_RATIO, FINAL_SE_DIVISOR)
            out = SqueezeExcite(reduced, self.layers, name="se")(out)
        return gelu(out) if self.use_act else out


class ReparamLargeKernelConv(nn.Module):
    """Large-kernel conv+BN plus a small-kernel conv+BN branch (RepLKNet), then optional
    squeeze-excitation and GELU; ``reparameterized``: one large-kernel conv with a bias."""

    features: int
    kernel_size: int
    small_kernel: int
    strides: int
    groups: int
    layers: Layers
    use_se: bool = False
    reparameterized: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        geometry = dict(strides=self.strides, groups=self.groups)
        branch = dict(layers=self.layers, **geometry)
        if self.reparameterized:
            out = self.layers.conv(
                self.features, self.kernel_size, use_bias=True, name="reparam_conv", **geometry
            )(x)
        else:
            out = ConvBN(self.features, self.kernel_size, name="large_conv", **branch)(x)
            out = out + ConvBN(self.features, self.small_kernel, name="small_conv", **branch)(x)
        if self.use_se:
            reduced = make_divisible(self.features * DOWNSAMPLE_SE_RATIO, DOWNSAMPLE_SE_DIVISOR)
            out = SqueezeExcite(reduced, self.layers, name="se")(out)
        return gelu(out)


class PatchEmbed(nn.Module):
    """Halves the resolution: grouped 7x7 stride-2 large-kernel conv, then a 1x1 MobileOne block
    (``proj_0``, ``proj_1``: timm's ``downsample.proj.0/1``)."""

    features: int
    layers: Layers
    use_se: bool = False
    reparameterized: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ReparamLargeKernelConv(
            self.features,
            DOWNSAMPLE_KERNEL,
            DOWNSAMPLE_SMALL_KERNEL,
            strides=2,
            groups=x.shape[-1],
            layers=self.layers,
            use_se=self.use_se,
            reparameterized=self.reparameterized,
            name="proj_0",
        )(x)
        return MobileOneBlock(
            self.features,
            1,
            self.layers,
            reparameterized=self.reparameterized,
            name="proj_1",
        )(x)


def _layer_scale(module: nn.Module, name: str, width: int, init: float, dtype: Dtype) -> jax.Array:
    scale = module.param(name, nn.initializers.constant(init), (width,), module.layers.param_dtype)
    return scale.astype(dtype)


class RepMixer(nn.Module):
    """x + layer_scale * (mixer(x) - norm(x)) with depthwise MobileOne blocks (``norm`` is the
    identity BN alone); ``reparameterized``: one depthwise conv with a bias."""

    layers: Layers
    kernel_size: int = REPMIXER_KERNEL
    layer_scale_init: float = 1e-5
    reparameterized: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if self.reparameterized:
            return self.layers.conv(
                width, self.kernel_size, groups=width, use_bias=True, name="reparam_conv"
            )(x)
        depthwise = dict(groups=width, use_act=False, layers=self.layers)
        mixed = MobileOneBlock(width, self.kernel_size, name="mixer", **depthwise)(x)
        normed = MobileOneBlock(
            width,
            self.kernel_size,
            use_scale_branch=False,
            num_conv_branches=0,
            name="norm",
            **depthwise,
        )(x)
        layer_scale = _layer_scale(self, "layer_scale", width, self.layer_scale_init, x.dtype)
        return x + layer_scale * (mixed - normed)


class RepCPE(nn.Module):
    """Conditional positional encoding x + dwconv(x) (7x7, with bias); ``reparameterized``: the
    identity folded into the kernel."""

    layers: Layers
    kernel_size: int = POS_EMB_KERNEL
    reparameterized: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        name = "reparam_conv" if self.reparameterized else "pos_enc"
        out = self.layers.conv(width, self.kernel_size, groups=width, use_bias=True, name=name)(x)
        return out if self.reparameterized else x + out


class ConvMlp(nn.Module):
    """Depthwise 7x7 conv + BN, then a 1x1 MLP (``c_fc`` -> GELU -> ``c_proj``; timm's fc1/fc2)."""

    hidden_dim: int
    layers: Layers

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = ConvBN(width, CONV_MLP_KERNEL, groups=width, layers=self.layers, name="conv")(x)
        x = gelu(self.layers.dense(self.hidden_dim, name="c_fc")(x))
        return self.layers.dense(width, name="c_proj")(x)


class RepMixerBlock(nn.Module):
    """RepMixer token mixing, then x + layer_scale * ConvMlp(x)."""

    mlp_dim: int
    layers: Layers
    layer_scale_init: float = 1e-5
    reparameterized: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = RepMixer(
            self.layers,
            layer_scale_init=self.layer_scale_init,
            reparameterized=self.reparameterized,
            name="token_mixer",
        )(x)
        scale = _layer_scale(self, "layer_scale", x.shape[-1], self.layer_scale_init, x.dtype)
        return x + scale * ConvMlp(self.mlp_dim, self.layers, name="mlp")(x)


class AttentionBlock(nn.Module):
    """x + ls1 * attn(BN(x)) over the h*w tokens, then x + ls2 * ConvMlp(x)."""

    mlp_dim: int
    num_heads: int
    layers: Layers
    layer_scale_init: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width_px, width = x.shape
        tokens = self.layers.batch_norm("norm")(x).reshape(batch, height * width_px, width)
        attended = MultiHeadAttention(
            self.num_heads,
            dtype=self.layers.dtype,
            param_dtype=self.layers.param_dtype,
            qkv_bias="none",
            name="attn",
        )(tokens).reshape(x.shape)
        scale_1 = _layer_scale(self, "layer_scale_1", width, self.layer_scale_init, x.dtype)
        x = x + scale_1 * attended
        scale_2 = _layer_scale(self, "layer_scale_2", width, self.layer_scale_init, x.dtype)
        return x + scale_2 * ConvMlp(self.mlp_dim, self.layers, name="mlp")(x)


def _block_class(block_cls: type[nn.Module], remat_policy: str) -> Any:
    if remat_policy == "none":
        return block_cls
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(
            f"unknown remat_policy {remat_policy!r}; choose from {['none', *REMAT_POLICIES]}"
        )
    return nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy])


class FastVitStage(nn.Module):
    """Optional patch embedding (``downsample``), optional RepCPE (``pos_emb``), then ``depth``
    RepMixer or attention blocks (``blocks_<i>``), each rematerialised per ``remat_policy``."""

    width: int
    depth: int
    token_mixer: str
    layers: Layers
    downsample: bool = True
    se_downsample: bool = False
    pos_emb: bool = False
    mlp_ratio: float = 3.0
    head_dim: int = 32
    layer_scale_init: float = 1e-5
    reparameterized: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample:
            x = PatchEmbed(
                self.width,
                self.layers,
                use_se=self.se_downsample,
                reparameterized=self.reparameterized,
                name="downsample",
            )(x)
        elif x.shape[-1] != self.width:
            raise ValueError(
                f"a stage without downsample keeps its width: {x.shape[-1]} != {self.width}"
            )
        if self.pos_emb:
            x = RepCPE(self.layers, reparameterized=self.reparameterized, name="pos_emb")(x)
        mlp_dim = int(self.width * self.mlp_ratio)
        for index in range(self.depth):
            if self.token_mixer == "repmixer":
                x = _block_class(RepMixerBlock, self.remat_policy)(
                    mlp_dim,
                    self.layers,
                    layer_scale_init=self.layer_scale_init,
                    reparameterized=self.reparameterized,
                    name=f"blocks_{index}",
                )(x)
            else:
                x = _block_class(AttentionBlock, self.remat_policy)(
                    mlp_dim,
                    self.width // self.head_dim,
                    self.layers,
                    layer_scale_init=self.layer_scale_init,
                    name=f"blocks_{index}",
                )(x)
        return x


class MobileClipImageTower(nn.Module):
    """MobileCLIP's MCi image tower (timm ``fastvit_mci*``); see the module docstring.

    ``from_variant("mci0" | "mci1" | "mci2", output_dim=512)``. ``bn_groups``: BatchNorm
    statistics per group of the global batch (1: synchronised). ``reparameterized``: the
    inference form that :func:`reparameterize` produces. ``depthwise_impl``: "auto" | "conv" |
    "shifts" (see the module docstring).
    """

    depths: tuple[int, ...] = MCI_VARIANTS["mci0"]["depths"]
    widths: tuple[int, ...] = MCI_VARIANTS["mci0"]["widths"]
    token_mixers: tuple[str, ...] = ("repmixer", "repmixer", "repmixer", "attention")
    pos_embs: tuple[bool, ...] = (False, False, False, True)
    se_downsamples: tuple[bool, ...] = (False, False, True, True)
    mlp_ratio: float = 3.0
    head_dim: int = 32
    cls_ratio: float = 2.0
    layer_scale_init: float = 1e-5
    output_dim: int | None = 512
    bn_groups: int = 1
    bn_momentum: float = TORCH_BATCH_NORM_MOMENTUM
    bn_epsilon: float = TORCH_BATCH_NORM_EPS
    reparameterized: bool = False
    remat_policy: str = "none"
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_variant(cls, variant: str, **kwargs: Any) -> MobileClipImageTower:
        """E.g. ``MobileClipImageTower.from_variant("mci2", output_dim=512)``; kwargs override."""
        if variant not in MCI_VARIANTS:
            raise ValueError(
                f"unknown MobileCLIP variant {variant!r}; choose from {list(MCI_VARIANTS)}"
            )
        return cls(**{**MCI_VARIANTS[variant], **kwargs})

    @property
    def width(self) -> int:
        """Width of ``pre_logits`` (the final conv's channels)."""
        return int(self.widths[-1] * self.cls_ratio)

    def _check_fields(self) -> None:
        stages = len(self.depths)
        for name in ("widths", "token_mixers", "pos_embs", "se_downsamples"):
            entries = len(getattr(self, name))
            if entries != stages:
                raise ValueError(f"{name} has {entries} entries for {stages} stages")
        resolve_depthwise_impl(self.depthwise_impl)  # raises on an unknown value
        unknown = set(self.token_mixers) - set(TOKEN_MIXERS)
        if unknown:
            raise ValueError(f"unknown token_mixers {sorted(unknown)}; choose from {TOKEN_MIXERS}")
        for width, mixer in zip(self.widths, self.token_mixers):
            if mixer == "attention" and width % self.head_dim:
                raise ValueError(f"width {width} is not divisible by head_dim {self.head_dim}")

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, Any]]:
        self._check_fields()
        layers = Layers(
            num_groups=self.bn_groups,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            use_running_average=not train,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            depthwise_impl=resolve_depthwise_impl(self.depthwise_impl),
        )
        stem_width = self.widths[0]
        block = dict(layers=layers, reparameterized=self.reparameterized)
        x = images.astype(self.dtype)
        x = MobileOneBlock(stem_width, 3, strides=2, name="stem_0", **block)(x)
        x = MobileOneBlock(stem_width, 3, strides=2, groups=stem_width, name="stem_1", **block)(x)
        x = MobileOneBlock(stem_width, 1, name="stem_2", **block)(x)
        intermediates: dict[str, Any] = {}
        for index, depth in enumerate(self.depths):
            x = FastVitStage(
                self.widths[index],
                depth,
                self.token_mixers[index],
                layers,
                # The stem already brings the input to the first stage's width and stride 4.
                downsample=index > 0,
                se_downsample=self.se_downsamples[index],
                pos_emb=self.pos_embs[index],
                mlp_ratio=self.mlp_ratio,
                head_dim=self.head_dim,
                layer_scale_init=self.layer_scale_init,
                reparameterized=self.reparameterized,
                remat_policy=self.remat_policy,
                name=f"stages_{index}",
            )(x)
            intermediates[f"stage_{index}"] = x
        x = MobileOneBlock(
            self.width, 3, groups=self.widths[-1], use_se=True, name="final_conv", **block
        )(x)
        intermediates["final_features"] = x
        pooled = x.mean(axis=(1, 2))
        intermediates["pre_logits"] = pooled
        if self.output_dim is None:
            return pooled, intermediates
        return layers.dense(self.output_dim, name="head")(pooled), intermediates


# --------------------------------------------------------------------------------------------------
# Depthwise convolutions as shifted, per-channel-scaled copies (for XLA:CPU)
# --------------------------------------------------------------------------------------------------

DEPTHWISE_IMPLS = ("auto", "conv", "shifts")
# Kernel gradients of windows with more live taps than this go through XLA's convolution; smaller
# ones (3x3 kernels, 7x7 kernels on 2x2 maps) through one reduction per tap. Measured on a 2-core
# CPU: for a 7x7 kernel XLA's depthwise kernel gradient (without channel multiplier) beats 49
# separate reductions ~4x; for 9 taps or fewer the reductions win (~2x).
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
    statistics, its normalisation and their gradients would be recomputed per consumer (~1.6x
    the runlocal tower's forward+backward time, measured); a gather is an op XLA:CPU never
    duplicates, so the chain is computed once, into the gather's buffer. Along the height axis:
    the batch axis is sharded over the data-parallel devices, and a gather along it makes GSPMD
    all-gather activations."""
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


# --------------------------------------------------------------------------------------------------
# Re-parameterisation (train-time branches + BatchNorms -> single convolutions)
# --------------------------------------------------------------------------------------------------

Tree = Mapping[str, Any]


def fold_batch_norm(
    kernel: np.ndarray, params: Tree, stats: Tree, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of conv-then-BN (evaluation mode) as one conv; HWIO kernel, float64."""
    multiplier = np.asarray(params["scale"], np.float64) / np.sqrt(
        np.asarray(stats["var"], np.float64) + epsilon
    )
    mean = np.asarray(stats["mean"], np.float64)
    bias = np.asarray(params["bias"], np.float64) - mean * multiplier
    return np.asarray(kernel, np.float64) * multiplier, bias


def identity_kernel(channels: int, in_per_group: int, kernel_size: int) -> np.ndarray:
    """HWIO kernel of the identity map for a conv with ``channels // in_per_group`` groups."""
    kernel = np.zeros((kernel_size, kernel_size, in_per_group, channels))
    centre = kernel_size // 2
    kernel[centre, centre, np.arange(channels) % in_per_group, np.arange(channels)] = 1.0
    return kernel


def pad_kernel(kernel: np.ndarray, kernel_size: int) -> np.ndarray:
    """Zero-pad an HWIO kernel to kernel_size x kernel_size, centred (same output alignment)."""
    pad = (kernel_size - kernel.shape[0]) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad), (0, 0), (0, 0)))


def _fold_conv_bn(params: Tree, stats: Tree, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    return fold_batch_norm(params["conv"]["kernel"], params["bn"], stats["bn"], epsilon)


def _fold_mobileone(
    params: Tree,
    stats: Tree,
    epsilon: float,
    kernel_size: int | None = None,
    in_per_group: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One (kernel, bias) for the sum of a MobileOne block's branches. ``kernel_size`` and
    ``in_per_group`` are read off the conv branches; give them for an identity-only block."""
    branches = sorted(name for name in params if name.startswith("conv_kxk_"))
    if branches:
        shape = np.shape(params[branches[0]]["conv"]["kernel"])
        kernel_size, in_per_group = shape[0], shape[2]
    elif "conv_scale" in params:
        in_per_group = np.shape(params["conv_scale"]["conv"]["kernel"])[2]
    if kernel_size is None or in_per_group is None:
        raise ValueError("kernel_size and in_per_group are needed for an identity-only block")
    kernel, bias = 0.0, 0.0
    for name in branches:
        branch_kernel, branch_bias = _fold_conv_bn(params[name], stats[name], epsilon)
        kernel, bias = kernel + branch_kernel, bias + branch_bias
    if "conv_scale" in params:
        scale_kernel, scale_bias = _fold_conv_bn(params["conv_scale"], stats["conv_scale"], epsilon)
        kernel, bias = kernel + pad_kernel(scale_kernel, kernel_size), bias + scale_bias
    if "identity" in params:
        channels = np.shape(params["identity"]["scale"])[0]
        identity = identity_kernel(channels, in_per_group, kernel_size)
        id_kernel, id_bias = fold_batch_norm(
            identity, params["identity"], stats["identity"], epsilon
        )
        kernel, bias = kernel + id_kernel, bias + id_bias
    return kernel, bias


def _conv_params(kernel: np.ndarray, bias: np.ndarray, like: Any) -> dict[str, np.ndarray]:
    dtype = np.asarray(like).dtype
    return {"kernel": kernel.astype(dtype), "bias": bias.astype(dtype)}


def _is_mobileone(params: Tree) -> bool:
    branches = ("identity", "conv_scale")
    return any(name.startswith("conv_kxk_") or name in branches for name in params)


def _reparameterize_node(params: Tree, stats: Tree, epsilon: float) -> tuple[dict, dict]:
    """(params, batch_stats) of one module subtree in the inference form."""
    like = jax.tree.leaves(params)[0]
    if "large_conv" in params:
        kernel, bias = _fold_conv_bn(params["large_conv"], stats["large_conv"], epsilon)
        small_kernel, small_bias = _fold_conv_bn(params["small_conv"], stats["small_conv"], epsilon)
        kernel = kernel + pad_kernel(small_kernel, kernel.shape[0])
        folded = {"reparam_conv": _conv_params(kernel, bias + small_bias, like)}
        return folded | ({"se": params["se"]} if "se" in params else {}), {}
    if {"mixer", "norm", "layer_scale"} <= set(params):  # RepMixer
        mixer_kernel, mixer_bias = _fold_mobileone(params["mixer"], stats["mixer"], epsilon)
        size, in_per_group = mixer_kernel.shape[0], mixer_kernel.shape[2]
        norm_kernel, norm_bias = _fold_mobileone(
            params["norm"], stats["norm"], epsilon, size, in_per_group
        )
        gamma = np.asarray(params["layer_scale"], np.float64)
        identity = identity_kernel(gamma.shape[0], in_per_group, size)
        kernel = identity + gamma * (mixer_kernel - norm_kernel)
        return {"reparam_conv": _conv_params(kernel, gamma * (mixer_bias - norm_bias), like)}, {}
    if "pos_enc" in params:  # RepCPE
        pos_kernel = np.asarray(params["pos_enc"]["kernel"], np.float64)
        size, in_per_group, channels = pos_kernel.shape[0], pos_kernel.shape[2], pos_kernel.shape[3]
        kernel = identity_kernel(channels, in_per_group, size) + pos_kernel
        bias = np.asarray(params["pos_enc"]["bias"], np.float64)
        return {"reparam_conv": _conv_params(kernel, bias, like)}, {}
    if _is_mobileone(params):
        kernel, bias = _fold_mobileone(params, stats, epsilon)
        folded = {"reparam_conv": _conv_params(kernel, bias, like)}
        return folded | ({"se": params["se"]} if "se" in params else {}), {}
    new_params, new_stats = {}, {}
    for name, child in params.items():
        if isinstance(child, Mapping):
            child_params, child_stats = _reparameterize_node(child, stats.get(name, {}), epsilon)
            new_params[name] = child_params
            if child_stats:
                new_stats[name] = child_stats
        else:
            new_params[name] = child
    # BatchNorms that stay (ConvMlp's, the attention blocks') keep their running statistics,
    # the leaves (mean, var) of their stats node.
    new_stats.update({name: leaf for name, leaf in stats.items() if name not in params})
    return new_params, new_stats


def reparameterize(
    variables: Tree, tower: MobileClipImageTower
) -> tuple[dict[str, Any], MobileClipImageTower]:
    """Fold the train-time tower's branches and their BatchNorms (running statistics) into single
    convolutions: returns ``(inference_variables, inference_tower)`` whose evaluation-mode
    outputs equal ``tower.apply(variables, images, train=False)``. ``variables`` holds
    ``params`` and ``batch_stats`` (fully addressable: gather sharded arrays first); the folding
    runs in float64 in NumPy and the results take the parameters' dtype."""
    if tower.reparameterized:
        raise ValueError("the tower is already re-parameterised")
    params, stats = _reparameterize_node(
        variables["params"], variables.get("batch_stats", {}), tower.bn_epsilon
    )
    return {"params": params, "batch_stats": stats}, tower.clone(reparameterized=True)
