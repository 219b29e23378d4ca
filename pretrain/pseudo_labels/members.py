"""An expert's predictions for one image -> the label members of its shard sample.

The members are the dense layout's (:mod:`pretrain.data.dense`), so the dense reader and
CLIPTeX's training read them back:

==============  =========================================================================
``seg.png``     class ids, 8-bit grey (16-bit above 255 classes); 255 = no label. Exact.
``depth.png``   16-bit grey, ``round(depth * 1000)``, 0 = invalid: lossless PNG of depth
                quantised to a thousandth (a millimetre, or a thousandth of the image's
                median for relative depth); valid depths beyond 65.535 become invalid.
``depth.npy``   float32 depth, 0 = invalid. Exact (``depth_member="depth.npy"``).
``normals.png`` 8-bit RGB ``round((n + 1) * 127.5)``, all-zero = invalid: lossless PNG of
                normals quantised to within 0.3 degrees.
``normals.npy`` float32 (H, W, 3), zero = invalid. Exact (``normals_member="normals.npy"``).
==============  =========================================================================

A target whose labelled share of pixels is below ``min_labelled_fraction`` gets no member: the
expert gave no usable label there (CLIPTeX then leaves the example out of that task's loss).
With ``relative_depth`` each image's depth is divided by its median valid depth before it is
stored: monocular depth is known up to scale (DPT's is relative already), and labels of order 1
keep an L1 depth term comparable to the other losses whatever unit an expert predicts in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from pretrain.data.dense import encoding, layout

DEPTH_MEMBERS = (layout.DEPTH_PNG, layout.DEPTH_NPY)
NORMALS_MEMBERS = (layout.NORMALS_PNG, layout.NORMALS_NPY)


@dataclasses.dataclass(frozen=True)
class LabelEncoding:
    """How predictions are stored (see the module docstring)."""

    depth_member: str = layout.DEPTH_PNG
    normals_member: str = layout.NORMALS_PNG
    ignore_label: int = 255
    min_labelled_fraction: float = 0.0
    relative_depth: bool = True

    def __post_init__(self) -> None:
        if self.depth_member not in DEPTH_MEMBERS:
            raise ValueError(f"depth_member {self.depth_member!r}; choose from {DEPTH_MEMBERS}")
        if self.normals_member not in NORMALS_MEMBERS:
            raise ValueError(
                f"normals_member {self.normals_member!r}; choose from {NORMALS_MEMBERS}"
            )

    def keeps(self, share: float) -> bool:
        """Whether a prediction labelling this share of its pixels is stored."""
        return share > 0.0 and share >= self.min_labelled_fraction


def labelled(target: str, array: np.ndarray, ignore_label: int) -> np.ndarray:
    """(H, W) bool: the pixels the prediction labels."""
    if target == "segmentation":
        return array != ignore_label
    if target == "depth":
        return np.isfinite(array) & (array > 0)
    return np.linalg.norm(np.nan_to_num(array), axis=-1) > 0.5


def _depth_member(depth: np.ndarray, storage: LabelEncoding) -> tuple[str, bytes]:
    valid = labelled("depth", depth, storage.ignore_label)
    depth = np.where(valid, depth, 0.0)
    if storage.relative_depth:
        depth = depth / np.median(depth[valid])  # the caller stores only labelled images
    depth = depth.astype(np.float32)
    if storage.depth_member == layout.DEPTH_NPY:
        return layout.DEPTH_NPY, encoding.encode_npy(depth)
    # Beyond the 16-bit range: no label rather than a wrong one.
    depth = np.where(depth * layout.DEFAULT_DEPTH_SCALE <= 65535, depth, 0.0)
    return layout.DEPTH_PNG, encoding.encode_depth_png(depth)


def _normals_member(normals: np.ndarray, storage: LabelEncoding) -> tuple[str, bytes]:
    # Experts give unit normals: stored as they are, invalid ones zero.
    valid = labelled("normals", normals, storage.ignore_label)
    normals = np.where(valid[..., None], np.nan_to_num(normals), 0.0).astype(np.float32)
    if storage.normals_member == layout.NORMALS_NPY:
        return layout.NORMALS_NPY, encoding.encode_npy(normals)
    return layout.NORMALS_PNG, encoding.encode_normals_png(normals)


def label_members(
    predictions: Mapping[str, np.ndarray], storage: LabelEncoding
) -> tuple[dict[str, bytes], dict[str, float]]:
    """The members of one image's predictions and each target's labelled share of pixels (a
    target under ``min_labelled_fraction`` gets no member)."""
    members, shares = {}, {}
    for target, array in predictions.items():
        share = float(labelled(target, array, storage.ignore_label).mean())
        shares[target] = share
        if not storage.keeps(share):
            continue
        if target == "segmentation":
            members[layout.SEGMENTATION_PNG] = encoding.encode_segmentation_png(
                np.asarray(array).astype(np.int64)
            )
        elif target == "depth":
            name, payload = _depth_member(np.asarray(array, np.float64), storage)
            members[name] = payload
        else:
            name, payload = _normals_member(np.asarray(array, np.float64), storage)
            members[name] = payload
    return members, shares
