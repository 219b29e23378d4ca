"""Dense data: images with per-pixel targets (segmentation, depth, surface normals) for dense
evaluation and training, from the embedded scenes, TFDS, folders or tar shards.

Conventions (every source, every batch):

* ``segmentation``: (H, W) integer class ids, ``ignore_label`` (255) = unlabelled;
* ``depth``: (H, W) float32 metres (scene units for the embedded scenes), 0 = invalid;
* ``normals``: (H, W, 3) float32 unit vectors in the camera frame (x right, y up, z towards
  the viewer), the zero vector = invalid.

The folder / webdataset layout (PASCAL VOC, NYUv2 normals, pseudo-labels come in this way): a
sample is the files of a folder, or the members of uncompressed tar shards, that share a key (the
path up to the first ``.`` of the base name):

======================  ======================================================================
``KEY.jpg`` / ``.png``  the image (or ``.jpeg``, ``.webp``): one per key
``KEY.seg.png``         class ids: 8-bit grey or palette (VOC's) or 16-bit grey; 255 = ignore
``KEY.depth.png``       16-bit grey: depth in metres x ``depth_scale`` (1000: mm), 0 = invalid
``KEY.depth.npy``       float32 (H, W) metres, 0 = invalid (preferred over ``depth.png``)
``KEY.normals.png``     8-bit RGB: ``n = rgb / 127.5 - 1`` (renormalised), all-zero = invalid
``KEY.normals.npy``     float32 (H, W, 3), zero = invalid (preferred over ``normals.png``)
======================  ======================================================================

The ``.npy`` members and ``seg.png`` are exact; ``depth.png`` and ``normals.png`` are quantised
(:mod:`~pretrain.data.dense.encoding`). :func:`write_dense_example` writes this layout.

Modules: ``layout`` (member names), ``encoding`` (member bytes <-> arrays), ``targets`` (a
record's targets, skip reasons), ``folder`` / ``shards`` / ``tfds_sets`` / ``scenes`` (the
sources), ``sources`` (config -> source), ``resize`` (resampling, crops, flips), ``examples``
(record -> example), ``dataset`` (the grain pipeline), ``writer``.

Bad records never crash a run: a missing image or label, an undecodable image or label file and
a label whose size differs from its image's are skipped and counted per batch, by reason.
"""

from pretrain.data.dense.dataset import dense_dataset
from pretrain.data.dense.examples import DenseAugmentation, DenseExampleMaker
from pretrain.data.dense.folder import FolderSource
from pretrain.data.dense.shards import DenseShardSource
from pretrain.data.dense.sources import make_dense_source
from pretrain.data.dense.targets import IGNORE_LABEL, TARGETS
from pretrain.data.dense.tfds_sets import TfdsDenseRecords
from pretrain.data.dense.writer import dense_members, write_dense_example
from pretrain.data.pipeline import Workers  # dense_dataset's workers argument

__all__ = [
    "IGNORE_LABEL",
    "TARGETS",
    "DenseAugmentation",
    "DenseExampleMaker",
    "DenseShardSource",
    "FolderSource",
    "TfdsDenseRecords",
    "Workers",
    "dense_dataset",
    "dense_members",
    "make_dense_source",
    "write_dense_example",
]
