"""MobileCLIP's hybrid image towers MCi0 / MCi1 / MCi2 (FastViT family; timm's ``fastvit_mci*``,
which open_clip's MobileCLIP-S0/S1/S2 use as ``visual.trunk``). NHWC throughout.

* stem: three MobileOne blocks (3x3 stride 2, depthwise 3x3 stride 2, 1x1), GELU;
* four stages of widths ``widths`` and depths ``depths``; stages 2-4 start with a patch embedding
  that halves the resolution (7x7 depthwise "large kernel" conv with a 3x3 branch, GELU,
  squeeze-excitation in stages 3-4, then a 1x1 MobileOne block). Stages 1-3 mix tokens with
  RepMixer (``x + layer_scale * (mixer(x) - norm(x))``); stage 4 has a conditional positional
  encoding (RepCPE: ``x + dwconv7x7(x)``) and pre-BatchNorm self-attention blocks (head width 32,
  no q/k/v bias). Every block's FFN is a ConvMlp (depthwise 7x7 conv + BN, 1x1 expansion by
  ``mlp_ratio`` = 3, GELU, 1x1), residual with layer scale;
* a final 3x3 MobileOne block to ``cls_ratio`` x the last width with squeeze-excitation, global
  average pooling (``pre_logits``) and a linear projection with bias to ``output_dim`` (timm's
  ``head.fc``, which open_clip's MobileCLIP configs use as the CLIP projection).

``reparameterized=False`` is the train-time form (MobileOne blocks and large-kernel convs as sums
of BatchNorm'd branches, RepMixer and RepCPE with their identity paths);
:func:`models.mobileclip_reparam.reparameterize` folds it into the inference form
(``reparameterized=True``: one ``reparam_conv`` each) with the same evaluation outputs. The
paper's 11.4M / 21.5M / 35.7M parameters are the inference form with a 512-d projection.

BatchNorm is :class:`models.batchnorm.GroupedBatchNorm` (``bn_groups`` groups of the global
batch; 1 = synchronised over all devices): ``train=True`` normalises with batch statistics and
updates ``batch_stats`` (apply with ``mutable=["batch_stats"]``), ``train=False`` uses the running
statistics. Depthwise convs run as XLA convolutions or as shifted copies (``depthwise_impl``, see
:mod:`models.depthwise`; "auto" picks the shifted copies on CPU).

Returns ``(embedding, intermediates)``: ``stage_0`` .. ``stage_3`` (B, h, w, width_i) stage outputs
(strides 4, 8, 16, 32), ``final_features`` (B, h/32, w/32, cls_ratio * widths[-1]) the final
conv's output, ``pre_logits`` (B, width) its average; embedding = ``pre_logits @ head + bias``
(or ``pre_logits`` when ``output_dim`` is None).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.batchnorm import TORCH_BATCH_NORM_EPS, TORCH_BATCH_NORM_MOMENTUM, GroupedBatchNorm
from models.depthwise import depthwise_conv_shifts, resolve_depthwise_impl
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
    inference form that :func:`models.mobileclip_reparam.reparameterize` produces.
    ``depthwise_impl``: "auto" | "conv" | "shifts" (see
    :func:`models.depthwise.resolve_depthwise_impl`).
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
