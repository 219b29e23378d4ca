"""What a dense target is to a head: its outputs, its loss, its predictions and its metrics.

One table for the three dense targets of the papers, shared by the tasks that train heads on them
(dense probes and fine-tuning; CLIPTeX's pseudo-label heads):

=============  ==================  =====================================  ======================
target         outputs             losses (``loss``)                      metrics
=============  ==================  =====================================  ======================
segmentation   ``num_classes``     ``cross_entropy`` (ignore label)       mIoU, pixel accuracy
depth          1                   ``ssi`` (disparity, scale and shift    AbsRel, RMSE, delta
                                   invariant: probes) or ``l1`` (metres)  (aligned as the loss)
normals        4 (``nll_angmf``)   ``nll_angmf`` (Bae et al. 2021) or     angular error: mean,
               or 3 (``l1``)       ``l1`` (CLIPTeX)                       median, % within
=============  ==================  =====================================  ======================

Batch conventions (pretrain/data/dense): ``segmentation`` int32 with ``ignore_label`` where
unlabelled, ``depth`` float32 metres with 0 where invalid, ``normals`` float32 unit vectors with
the zero vector where invalid. An ``ssi`` depth head predicts disparity up to scale and shift, so
its evaluation aligns it per image (``disparity_scale_shift``, the MiDaS protocol paper 003 cites);
an ``l1`` head predicts metres, evaluated as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from losses import dense as dense_losses
from pretrain import sharding
from pretrain.evaluate import dense_metrics

TARGETS = ("segmentation", "depth", "normals")
LOSSES = {
    "segmentation": ("cross_entropy",),
    "depth": ("ssi", "l1"),
    "normals": ("nll_angmf", "l1"),
}
# The depth alignment each depth loss implies at evaluation.
DEPTH_ALIGNMENT = {"ssi": "disparity_scale_shift", "l1": "none"}
# A normal of the data is valid when it is a unit vector, invalid when it is the zero vector.
_VALID_NORMAL_SQUARED = 0.25


@dataclasses.dataclass(frozen=True)
class DenseTarget:
    """One target of a dense head: ``name`` (its batch field), ``loss`` (one of ``LOSSES``),
    ``num_classes`` / ``ignore_label`` for segmentation, ``min_depth`` / ``max_depth`` (metres:
    pixels outside are not trained or evaluated) and ``eval_crop`` (top, bottom, left, right of
    the evaluated depth region, e.g. NYUv2's) for depth."""

    name: str
    loss: str
    num_classes: int = 0
    ignore_label: int = 255
    min_depth: float = 1e-3
    max_depth: float = 10.0
    eval_crop: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"dense target {self.name!r}; choose from {TARGETS}")
        if self.loss not in LOSSES[self.name]:
            raise ValueError(f"{self.name} loss {self.loss!r}; choose from {LOSSES[self.name]}")
        if self.name == "segmentation" and self.num_classes < 2:
            raise ValueError(f"segmentation needs num_classes >= 2, got {self.num_classes}")

    @property
    def num_outputs(self) -> int:
        if self.name == "segmentation":
            return self.num_classes
        if self.name == "depth":
            return 1
        return 4 if self.loss == "nll_angmf" else 3

    # -- training -------------------------------------------------------------------------------

    def valid_pixels(self, labels: jax.Array) -> jax.Array:
        """(B, H, W) bool: the pixels whose label is trained on and evaluated."""
        if self.name == "segmentation":
            return labels != self.ignore_label
        if self.name == "depth":
            return (labels > self.min_depth) & (labels < self.max_depth)
        return jnp.sum(jnp.square(labels), axis=-1) > _VALID_NORMAL_SQUARED

    def loss_value(
        self, outputs: jax.Array, labels: jax.Array, mesh: Mesh, weights: jax.Array | None = None
    ) -> jax.Array:
        """The global-batch loss of head ``outputs`` (B, H, W, num_outputs) float32 against the
        batch field ``labels``; ``weights`` (B,) 0/1 leaves examples out (no label for them)."""
        if self.name == "segmentation":
            return _global_loss(
                dense_losses.pixel_cross_entropy,
                mesh,
                (outputs, labels),
                weights,
                ignore_label=self.ignore_label,
            )
        valid = self.valid_pixels(labels)
        if self.name == "depth":
            prediction = outputs[..., 0]
            if self.loss == "ssi":
                disparity = jnp.where(valid, 1.0 / jnp.where(valid, labels, 1.0), 0.0)
                arrays = (prediction, disparity, valid)
                return _global_loss(dense_losses.ssi_depth_loss, mesh, arrays, weights)
            arrays = (prediction, labels, valid)
            return _global_loss(dense_losses.masked_l1_loss, mesh, arrays, weights)
        arrays = (outputs, labels, valid)
        if self.loss == "nll_angmf":
            return _global_loss(dense_losses.nll_angmf_loss, mesh, arrays, weights)
        return _global_loss(dense_losses.masked_l1_loss, mesh, arrays, weights)

    def pixel_losses(self, outputs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per pixel (B, H, W): the loss float32 and whether the pixel counts, for the losses
        that are plain means over pixels (``cross_entropy``, ``l1``), so that a task may pool
        them itself (CLIPTeX pools per-example sums over accumulated micro-batches). ``ssi``
        fits each image and ``nll_angmf`` leaves pixels out by their prediction: use
        :meth:`loss_value` for those."""
        if self.name == "segmentation":
            return dense_losses.pixel_nll(outputs, labels, ignore_label=self.ignore_label)
        if self.loss != "l1":
            raise ValueError(f"the {self.name} loss {self.loss!r} is not a mean over pixels")
        valid = self.valid_pixels(labels)
        prediction = outputs[..., 0] if self.name == "depth" else outputs
        return dense_losses.pixel_l1(prediction, labels, valid), valid

    # -- evaluation -----------------------------------------------------------------------------

    def predict(self, outputs: jax.Array) -> jax.Array:
        """What the metrics compare with the labels: class ids (B, H, W) int32, depth or
        disparity (B, H, W) float32, or unit normals (B, H, W, 3) float32."""
        if self.name == "segmentation":
            return jnp.argmax(outputs, axis=-1).astype(jnp.int32)
        if self.name == "depth":
            return outputs[..., 0].astype(jnp.float32)
        normals = outputs[..., :3].astype(jnp.float32)
        if self.loss == "nll_angmf":
            normals, _ = dense_losses.angmf_normals_and_kappa(outputs.astype(jnp.float32))
        return normals / jnp.maximum(jnp.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)

    def metrics(self) -> Any:
        """A fresh host-side accumulator of this target's metrics (``update``, ``result``)."""
        if self.name == "segmentation":
            return dense_metrics.SegmentationMetrics(self.num_classes, self.ignore_label)
        if self.name == "depth":
            return dense_metrics.DepthMetrics(
                min_depth=self.min_depth,
                max_depth=self.max_depth,
                crop=self.eval_crop,
                alignment=DEPTH_ALIGNMENT[self.loss],
            )
        return dense_metrics.NormalMetrics()


def _global_loss(
    loss_fn: Any,
    mesh: Mesh,
    arrays: tuple[jax.Array, ...],
    weights: jax.Array | None,
    **options: Any,
) -> jax.Array:
    """``loss_fn(*local arrays, weights=local weights, axis_name=...)`` over the global batch:
    the per-example weights are split over the devices with the arrays they weigh."""
    if weights is None:
        return sharding.batch_loss(loss_fn, mesh, *arrays, **options)

    def weighted(*local: jax.Array, axis_name: Any) -> jax.Array:
        return loss_fn(*local[:-1], weights=local[-1], axis_name=axis_name, **options)

    return sharding.batch_loss(weighted, mesh, *arrays, weights)


def dense_target(config: Mapping[str, Any]) -> DenseTarget:
    """The target a ``config.dense`` section describes (``target``, ``loss``, ...)."""
    crop = config.get("eval_crop")
    return DenseTarget(
        name=config["target"],
        loss=config["loss"],
        num_classes=int(config.get("num_classes", 0)),
        ignore_label=int(config.get("ignore_label", 255)),
        min_depth=float(config.get("min_depth", 1e-3)),
        max_depth=float(config.get("max_depth", 10.0)),
        eval_crop=tuple(int(v) for v in crop) if crop else None,
    )
