"""Re-parameterisation of the MobileCLIP MCi tower: train-time branches and their BatchNorms
(running statistics) folded into single convolutions with a bias.

:func:`reparameterize` turns a train-time :class:`models.mobileclip.MobileClipImageTower`'s
variables into those of its inference form (``reparameterized=True``): each MobileOne block's sum
of branches (kxk conv+BN, 1x1 conv+BN, identity BN), each large-kernel conv with its small-kernel
branch, each RepMixer (``x + layer_scale * (mixer(x) - norm(x))``) and RepCPE (``x + dwconv(x)``)
becomes one ``reparam_conv``. As in timm's ``inference_mode``, the ConvMlp's conv + BN and the
attention blocks' BatchNorm stay. Evaluation-mode outputs are unchanged (float32 round-off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from models.mobileclip import MobileClipImageTower

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
