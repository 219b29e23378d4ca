"""The member names of a dense sample in a folder or in webdataset tar shards.

A sample is the set of files (folder) or tar members (shards) sharing a key: the path up to the
first ``.`` of the base name, webdataset's rule (:func:`pretrain.data.webdataset.tar.split_key`),
so ``train/0001.jpg`` and ``train/0001.seg.png`` are the members ``jpg`` and ``seg.png`` of the
sample ``train/0001``. Keys therefore hold no ``.`` in their last path component. The encodings
of the label members are in :mod:`pretrain.data.dense.encoding`.
"""

from __future__ import annotations

from pretrain.data.webdataset.shard_index import IMAGE_EXTENSIONS

IMAGE = "image"  # the slot and record field of the image member, whichever extension it has
SEGMENTATION_PNG = "seg.png"
DEPTH_PNG = "depth.png"
DEPTH_NPY = "depth.npy"
NORMALS_PNG = "normals.png"
NORMALS_NPY = "normals.npy"
LABEL_MEMBERS = (SEGMENTATION_PNG, DEPTH_PNG, DEPTH_NPY, NORMALS_PNG, NORMALS_NPY)
# Per target, the members that can give it, the exact .npy before the quantised PNG.
TARGET_MEMBERS = {
    "segmentation": (SEGMENTATION_PNG,),
    "depth": (DEPTH_NPY, DEPTH_PNG),
    "normals": (NORMALS_NPY, NORMALS_PNG),
}
# A raw record's scale of its depth.png member (depth in metres x scale, 16-bit).
DEPTH_SCALE = "depth_scale"
DEFAULT_DEPTH_SCALE = 1000.0
# The index slots of a shard (webdataset.shard_index): the image, then one per label member.
SLOTS = (IMAGE, *LABEL_MEMBERS)


def member_of(extension: str) -> str | None:
    """The slot of a member with this (lower-case) extension: ``image``, a label member's name,
    or None for members the dense layout ignores (``txt``, ``json``...)."""
    if extension in IMAGE_EXTENSIONS:
        return IMAGE
    return extension if extension in LABEL_MEMBERS else None
