"""timm FastVit's state-dict layout for an MCi tower (``models.mobileclip``), from the tower's
fields alone: every entry's timm key and shape, the JAX variables it holds and how its values
convert. timm_fastvit.py maps with it both ways; open_clip's MobileCLIP family puts it under
``visual.trunk.``.

The JAX tower's module names are timm's, so keys are mostly a renaming of paths:

===========================================  ===========================================
JAX (``params`` / ``batch_stats`` paths)     timm ``FastVit`` ``state_dict``
===========================================  ===========================================
``stem_0`` .. ``stem_2``, ``stages_i``,      ``stem.0`` .. ``stem.2``, ``stages.i``,
``blocks_j``, ``conv_kxk_0``, ``proj_0/1``   ``blocks.j``, ``conv_kxk.0``, ``proj.0/1``
Conv ``kernel`` HWIO (I = in / groups)       ``weight`` OIHW
BatchNorm ``scale``, ``bias``                ``weight``, ``bias``
BatchNorm ``batch_stats`` ``mean``, ``var``  ``running_mean``, ``running_var``, and
                                             ``num_batches_tracked`` (int64 scalar)
``mlp/c_fc``, ``mlp/c_proj`` (Dense)         ``mlp.fc1``, ``mlp.fc2`` (1x1 convs)
``se/fc1``, ``se/fc2`` (Dense)               ``se.fc1``, ``se.fc2`` (1x1 convs)
``layer_scale``, ``layer_scale_1/2`` (C,)    ``layer_scale.gamma`` ... (C, 1, 1)
``attn/{query,key,value}`` (C, H, 32)        ``token_mixer.qkv.weight`` (3C, C), [q|k|v]
``attn/out`` (H, 32, C) + bias               ``token_mixer.proj`` (C, C) + bias
``head`` Dense (width, out) + bias           ``head.fc`` (out, width) + bias
===========================================  ===========================================

The re-parameterised tower (``reparameterized=True``, timm's ``inference_mode=True``) has one
``reparam_conv`` (with bias) in place of each MobileOne block's branches, each large-kernel
conv's two branches, each RepMixer and each RepCPE.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from models.mobileclip import MCI_VARIANTS, MobileClipImageTower
from pretrain.export.state_dict_shapes import BATCH_NORM_COUNTER, Shapes
from pretrain.export.tree_io import (
    conv_from_torch,
    conv_to_torch,
    heads_from_torch,
    heads_out_from_torch,
    heads_out_to_torch,
    heads_to_torch,
    module_field,
)

# timm's FastVit layer sizes (timm/models/fastvit.py), which its fastvit_mci* entry points fix.
_DOWNSAMPLE_KERNEL, _DOWNSAMPLE_SMALL_KERNEL = 7, 3
_REPMIXER_KERNEL, _CONV_MLP_KERNEL, _POS_EMB_KERNEL = 3, 7, 7
# Squeeze-excitation widths: timm's SEModule in a MobileOne block (rd_ratio 1/16, rd_divisor 1)
# and in a patch embedding's large-kernel conv (rd_ratio 1/4, rd_divisor 8).
_FINAL_SE, _DOWNSAMPLE_SE = (1 / 16, 1), (1 / 4, 8)

# Flax's "<name>_<i>" children are timm's "<name>.<i>" list entries; a few modules are renamed.
_INDEXED = re.compile(r"^(stem|stages|blocks|conv_kxk|proj)_(\d+)$")
_RENAMED = {"attn": "token_mixer", "c_fc": "fc1", "c_proj": "fc2", "head": "head.fc"}


def _se_width(channels: int, ratio_and_divisor: tuple[float, int]) -> int:
    """timm's ``make_divisible(channels * ratio, divisor, round_limit=0)``."""
    ratio, divisor = ratio_and_divisor
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


# --------------------------------------------------------------------------------------------------
# The tower's fields
# --------------------------------------------------------------------------------------------------

_FIELDS = (
    *("depths", "widths", "token_mixers", "pos_embs", "se_downsamples", "mlp_ratio"),
    *("head_dim", "cls_ratio", "output_dim", "bn_epsilon", "reparameterized"),
)
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(MobileClipImageTower)}


def mci_fields(tower: Any) -> dict[str, Any]:
    """The fields that fix the layout, of a ``MobileClipImageTower`` or a mapping of its fields
    (the tower's defaults filling in)."""
    fields = {name: module_field(tower, name, _DEFAULTS[name]) for name in _FIELDS}
    for name in ("depths", "widths", "token_mixers", "pos_embs", "se_downsamples"):
        fields[name] = tuple(fields[name])
    return fields


def variant_fields(variant: str, output_dim: int | None) -> dict[str, Any]:
    """:func:`mci_fields` of ``MobileClipImageTower.from_variant(variant, output_dim=...)``."""
    return mci_fields({**MCI_VARIANTS[variant], "output_dim": output_dim})


def final_width(fields: Mapping[str, Any]) -> int:
    """Channels of the final conv (``pre_logits``)."""
    return int(fields["widths"][-1] * fields["cls_ratio"])


# --------------------------------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One timm state-dict entry and the JAX variables it holds (none for a BatchNorm counter)."""

    timm: str
    shape: tuple[int, ...]
    kind: str  # how values convert: see TO_TIMM / FROM_TIMM
    jax: tuple[str, ...] = ()  # flat "params/..." or "batch_stats/..." keys


def _timm_module(jax_path: str) -> str:
    parts = []
    for segment in jax_path.split("/"):
        indexed = _INDEXED.match(segment)
        parts.append(f"{indexed[1]}.{indexed[2]}" if indexed else _RENAMED.get(segment, segment))
    return ".".join(parts)


class _Layout:
    """Collects the leaves of a tower, module by module (JAX module paths, timm's sizes)."""

    def __init__(self, reparameterized: bool):
        self.reparameterized = reparameterized
        self.leaves: list[Leaf] = []

    def leaf(self, path: str, timm_leaf: str, shape: tuple[int, ...], kind: str, *jax: str):
        self.leaves.append(Leaf(f"{_timm_module(path)}.{timm_leaf}", shape, kind, jax))

    def vector(self, path: str, jax_leaf: str, timm_leaf: str, size: int, collection="params"):
        self.leaf(path, timm_leaf, (size,), "vector", f"{collection}/{path}/{jax_leaf}")

    def conv(self, path: str, out: int, in_per_group: int, kernel: int, bias: bool = False):
        shape = (out, in_per_group, kernel, kernel)
        self.leaf(path, "weight", shape, "conv", f"params/{path}/kernel")
        if bias:
            self.vector(path, "bias", "bias", out)

    def pointwise(self, path: str, out: int, in_channels: int):
        """A Dense in JAX, a 1x1 conv with bias in timm."""
        self.leaf(path, "weight", (out, in_channels, 1, 1), "pointwise", f"params/{path}/kernel")
        self.vector(path, "bias", "bias", out)

    def batch_norm(self, path: str, channels: int):
        self.vector(path, "scale", "weight", channels)
        self.vector(path, "bias", "bias", channels)
        self.vector(path, "mean", "running_mean", channels, "batch_stats")
        self.vector(path, "var", "running_var", channels, "batch_stats")
        self.leaf(path, BATCH_NORM_COUNTER, (), "counter")

    def conv_bn(self, path: str, out: int, in_per_group: int, kernel: int):
        """timm's ConvNormAct without activation: a bias-free ``conv`` and its ``bn``."""
        self.conv(f"{path}/conv", out, in_per_group, kernel)
        self.batch_norm(f"{path}/bn", out)

    def layer_scale(self, path: str, width: int):
        self.leaf(path, "gamma", (width, 1, 1), "layer_scale", f"params/{path}")

    def squeeze_excite(self, path: str, channels: int, reduced: int):
        self.pointwise(f"{path}/fc1", reduced, channels)
        self.pointwise(f"{path}/fc2", channels, reduced)

    def mobileone(self, path: str, in_channels: int, out: int, kernel: int, **options: Any):
        """timm's MobileOneBlock: an identity BatchNorm when the shape is kept, ``conv_kxk``
        branches, a 1x1 ``conv_scale`` branch for kernels above 1, optional squeeze-excite."""
        stride, groups = options.get("stride", 1), options.get("groups", 1)
        in_per_group = in_channels // groups
        if self.reparameterized:
            self.conv(f"{path}/reparam_conv", out, in_per_group, kernel, bias=True)
        else:
            if in_channels == out and stride == 1:
                self.batch_norm(f"{path}/identity", out)
            for branch in range(options.get("conv_branches", 1)):
                self.conv_bn(f"{path}/conv_kxk_{branch}", out, in_per_group, kernel)
            if kernel > 1 and options.get("scale_branch", True):
                self.conv_bn(f"{path}/conv_scale", out, in_per_group, 1)
        if options.get("se_reduced"):
            self.squeeze_excite(f"{path}/se", out, options["se_reduced"])

    def patch_embed(self, path: str, width: int, use_se: bool):
        """A stride-2 large-kernel conv with one input channel per group (and a small-kernel
        branch, optional squeeze-excite), then a 1x1 MobileOne block."""
        large = f"{path}/proj_0"
        if self.reparameterized:
            self.conv(f"{large}/reparam_conv", width, 1, _DOWNSAMPLE_KERNEL, bias=True)
        else:
            self.conv_bn(f"{large}/large_conv", width, 1, _DOWNSAMPLE_KERNEL)
            self.conv_bn(f"{large}/small_conv", width, 1, _DOWNSAMPLE_SMALL_KERNEL)
        if use_se:
            self.squeeze_excite(f"{large}/se", width, _se_width(width, _DOWNSAMPLE_SE))
        self.mobileone(f"{path}/proj_1", width, width, 1)

    def conv_mlp(self, path: str, width: int, hidden: int):
        self.conv_bn(f"{path}/conv", width, 1, _CONV_MLP_KERNEL)
        self.pointwise(f"{path}/c_fc", hidden, width)
        self.pointwise(f"{path}/c_proj", width, hidden)

    def repmixer_block(self, path: str, width: int, hidden: int):
        mixer = f"{path}/token_mixer"
        if self.reparameterized:
            self.conv(f"{mixer}/reparam_conv", width, 1, _REPMIXER_KERNEL, bias=True)
        else:
            # the norm is a MobileOne block reduced to its identity BatchNorm
            depthwise = {"groups": width, "scale_branch": False, "conv_branches": 0}
            self.mobileone(f"{mixer}/norm", width, width, _REPMIXER_KERNEL, **depthwise)
            self.mobileone(f"{mixer}/mixer", width, width, _REPMIXER_KERNEL, groups=width)
            self.layer_scale(f"{mixer}/layer_scale", width)
        self.conv_mlp(f"{path}/mlp", width, hidden)
        self.layer_scale(f"{path}/layer_scale", width)

    def attention_block(self, path: str, width: int, hidden: int):
        self.batch_norm(f"{path}/norm", width)
        attention = f"{path}/attn"
        qkv = tuple(f"params/{attention}/{name}/kernel" for name in ("query", "key", "value"))
        self.leaf(attention, "qkv.weight", (3 * width, width), "qkv", *qkv)  # no q/k/v bias
        out = f"params/{attention}/out"
        self.leaf(attention, "proj.weight", (width, width), "attention_out", f"{out}/kernel")
        self.leaf(attention, "proj.bias", (width,), "vector", f"{out}/bias")
        self.layer_scale(f"{path}/layer_scale_1", width)
        self.conv_mlp(f"{path}/mlp", width, hidden)
        self.layer_scale(f"{path}/layer_scale_2", width)

    def pos_emb(self, path: str, width: int):
        name = "reparam_conv" if self.reparameterized else "pos_enc"
        self.conv(f"{path}/{name}", width, 1, _POS_EMB_KERNEL, bias=True)


def fastvit_leaves(fields: Mapping[str, Any]) -> list[Leaf]:
    """The entries of timm's ``FastVit`` state dict for a tower's :func:`mci_fields` (timm's
    fixed layout: RepMixer or attention stages, a patch embedding before every stage but the
    first, RepCPE where ``pos_embs`` says), BatchNorm buffers included."""
    layout = _Layout(bool(fields["reparameterized"]))
    widths = fields["widths"]
    stem = widths[0]
    layout.mobileone("stem_0", 3, stem, 3, stride=2)
    layout.mobileone("stem_1", stem, stem, 3, stride=2, groups=stem)
    layout.mobileone("stem_2", stem, stem, 1)
    for index, (depth, width) in enumerate(zip(fields["depths"], widths)):
        stage = f"stages_{index}"
        hidden = int(width * fields["mlp_ratio"])
        if index > 0:
            layout.patch_embed(f"{stage}/downsample", width, fields["se_downsamples"][index])
        if fields["pos_embs"][index]:
            layout.pos_emb(f"{stage}/pos_emb", width)
        attention = fields["token_mixers"][index] == "attention"
        block = layout.attention_block if attention else layout.repmixer_block
        for block_index in range(depth):
            block(f"{stage}/blocks_{block_index}", width, hidden)
    final = final_width(fields)
    se_reduced = _se_width(final, _FINAL_SE)
    layout.mobileone("final_conv", widths[-1], final, 3, groups=widths[-1], se_reduced=se_reduced)
    if fields["output_dim"]:
        output_dim = int(fields["output_dim"])
        layout.leaf("head", "weight", (output_dim, final), "linear", "params/head/kernel")
        layout.vector("head", "bias", "bias", output_dim)
    return layout.leaves


def timm_shapes(leaves: list[Leaf], prefix: str = "") -> Shapes:
    """The timm state dict's keys (under ``prefix``) and shapes."""
    return {f"{prefix}{leaf.timm}": leaf.shape for leaf in leaves}


def jax_shapes(leaf: Leaf, head_dim: int) -> tuple[tuple[int, ...], ...]:
    """The shapes of ``leaf.jax``, derived from timm's shape."""
    shape = leaf.shape
    if leaf.kind == "conv":
        out, in_per_group, height, width = shape
        return ((height, width, in_per_group, out),)
    if leaf.kind in ("linear", "pointwise"):
        return ((shape[1], shape[0]),)
    if leaf.kind == "layer_scale":
        return ((shape[0],),)
    if leaf.kind == "qkv":
        width = shape[1]
        return ((width, width // head_dim, head_dim),) * 3
    if leaf.kind == "attention_out":
        return ((shape[1] // head_dim, head_dim, shape[0]),)
    return (shape,) if leaf.jax else ()


def jax_variable_shapes(leaves: list[Leaf], head_dim: int) -> Shapes:
    """Flat JAX variable keys (``params/...``, ``batch_stats/...``) and shapes."""
    return {
        key: shape for leaf in leaves for key, shape in zip(leaf.jax, jax_shapes(leaf, head_dim))
    }


# --------------------------------------------------------------------------------------------------
# Value conversions, by kind
# --------------------------------------------------------------------------------------------------

TO_TIMM: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
    "conv": lambda a: conv_to_torch(a[0]),
    "linear": lambda a: a[0].T,
    "pointwise": lambda a: a[0].T[:, :, None, None],
    "vector": lambda a: a[0],
    "layer_scale": lambda a: a[0].reshape(-1, 1, 1),
    # rows [q | k | v] (timm reshapes to (3, H, D))
    "qkv": lambda a: np.concatenate([heads_to_torch(kernel) for kernel in a]),
    "attention_out": lambda a: heads_out_to_torch(a[0]),
}
FROM_TIMM: dict[str, Callable[[np.ndarray, tuple[tuple[int, ...], ...]], list[np.ndarray]]] = {
    "conv": lambda w, s: [conv_from_torch(w)],
    "linear": lambda w, s: [w.T],
    "pointwise": lambda w, s: [w.reshape(w.shape[:2]).T],
    "vector": lambda w, s: [w],
    "layer_scale": lambda w, s: [w.reshape(-1)],
    "qkv": lambda w, s: [heads_from_torch(part, s[0][1]) for part in np.split(w, 3)],
    "attention_out": lambda w, s: [heads_out_from_torch(w, s[0][0])],
}
