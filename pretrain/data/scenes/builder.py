"""TFDS builder ``synthetic_scenes``: the procedural scenes of :mod:`pretrain.data.scenes`, on disk.

All data is made locally from seeds (nothing is downloaded), so ``download_and_prepare`` works
offline and gives the same files on every machine. Example ``i`` of ``train`` is
``scenes.make_example(i)``; example ``i`` of ``test`` is ``make_example(TEST_SEED_OFFSET + i)``,
so the two splits never share a scene. The ``base``, ``dense`` and ``tiny`` configs use the
same seeds, so the ``dense`` config's images equal the ``base`` config's (same size), with dense
targets added; ``unlabelled`` draws its scenes from seeds no other config uses.

Configs (sizes chosen so that preparing ``base`` takes well under two minutes on two CPU cores):

* ``base``  — 64x64, 20,000 train / 1,000 test: image, captions, label, primary metadata.
* ``dense`` — 64x64, 8,000 train / 500 test, plus ``segmentation``, ``depth``, ``normals``.
* ``tiny``  — 32x32, 256 train / 64 test, dense features; for tests.
* ``unlabelled`` — 64x64, 10,000 train / 500 test from seeds offset by
  :data:`UNLABELLED_SEED_OFFSET`: images and captions only, a set for experts to pseudo-label
  (CLIPTeX's :runlocal fine-tuning data, disjoint from the scenes the experts learn from).

Files are ARRAY_RECORD, read back with random access by :func:`data_source` (no TensorFlow
needed: TFDS decodes with NumPy and PIL). An element is a dict: ``image`` (S, S, 3) uint8 array,
``captions`` and ``synthetic_captions`` Python lists of ``bytes`` (UTF-8: decode them), ``label``,
``seed`` and ``num_objects`` Python ints, ``primary`` a dict (``shape`` and ``colour`` ints,
``area`` a float, ``centre`` a (2,) float32 array of (row, column) in [0, 1]), and in dense configs
``segmentation`` (S, S) uint8, ``depth`` (S, S) float32 and ``normals`` (S, S, 3) float32 arrays.

The data are a pure function of the code: bump ``VERSION`` whenever a change to
:mod:`pretrain.data.scenes` or the renderer changes the examples, or old files will be reused.

The examples of a large split are rendered by worker processes (one per CPU core; set
``SYNTHETIC_SCENES_WORKERS`` to choose); TFDS then writes them in its own key-hashed order, so
index ``i`` of a data source is not seed ``i``: read the ``seed`` field.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

from pretrain.data.scenes import geometry, sampling
from pretrain.data.scenes.example import make_example

TEST_SEED_OFFSET = 1_000_000_000
UNLABELLED_SEED_OFFSET = 500_000_000
_CHUNK = 256  # examples per task sent to a worker process
# Below this many examples, starting worker processes (each imports TFDS) costs more than it saves.
_MIN_EXAMPLES_FOR_WORKERS = 2_000


@dataclasses.dataclass
class SyntheticScenesConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and whether to store the dense targets."""

    image_size: int = 64
    train_examples: int = 20_000
    test_examples: int = 1_000
    dense: bool = False
    seed_offset: int = 0


def split_seeds(split: str, num_examples: int, seed_offset: int = 0) -> range:
    """The example seeds of a split: ``train`` from ``seed_offset``, ``test`` from
    :data:`TEST_SEED_OFFSET` + ``seed_offset``."""
    offsets = {"train": 0, "test": TEST_SEED_OFFSET}
    if split not in offsets:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(offsets)}")
    if num_examples > UNLABELLED_SEED_OFFSET:
        raise ValueError(f"{num_examples} examples would reach another config's seeds")
    start = offsets[split] + seed_offset
    return range(start, start + num_examples)


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG-encode with PIL: TFDS's own encoder for NumPy images needs TensorFlow."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _example_features(example: dict[str, Any], dense: bool) -> dict[str, Any]:
    features = {
        "seed": example["seed"],
        "image": _png_bytes(example["image"]),
        "captions": example["captions"],
        "synthetic_captions": example["synthetic_captions"],
        "label": example["label"],
        "num_objects": example["num_objects"],
        "primary": example["primary"],
    }
    if dense:
        features.update(
            segmentation=example["segmentation"],
            depth=example["depth"],
            normals=example["normals"],
        )
    return features


def _make_chunk(seeds: list[int], image_size: int, dense: bool) -> list[dict[str, Any]]:
    return [_example_features(make_example(seed, image_size, dense=dense), dense) for seed in seeds]


def _default_num_workers(num_examples: int) -> int:
    if "SYNTHETIC_SCENES_WORKERS" in os.environ:
        return int(os.environ["SYNTHETIC_SCENES_WORKERS"])
    if num_examples < _MIN_EXAMPLES_FOR_WORKERS:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def generate_examples(
    seeds: range,
    image_size: int,
    dense: bool,
    num_workers: int | None = None,
    chunk_size: int = _CHUNK,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(seed, features) for every seed, in seed order, rendered by ``num_workers`` processes
    (default: one per CPU core for large splits, else this process alone).

    Workers are started with ``spawn``: forking a process that has started JAX's or TFDS's
    threads can deadlock. As with any ``spawn`` pool, a script that prepares the data set must
    keep its top-level code under ``if __name__ == "__main__":`` (absl's ``app.run`` does).
    """
    if num_workers is None:
        num_workers = _default_num_workers(len(seeds))
    chunks = [list(seeds[i : i + chunk_size]) for i in range(0, len(seeds), chunk_size)]
    if num_workers <= 1:
        results = (_make_chunk(chunk, image_size, dense) for chunk in chunks)
        for chunk in results:
            for features in chunk:
                yield features["seed"], features
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        sizes, denses = [image_size] * len(chunks), [dense] * len(chunks)
        for chunk in pool.map(_make_chunk, chunks, sizes, denses):
            for features in chunk:
                yield features["seed"], features


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
    """Procedural 3-D primitive scenes with captions; see the module docstring."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release.",
        "1.1.0": "Synthetic (captioner-style) captions; images and real captions unchanged.",
    }
    BUILDER_CONFIGS: ClassVar[list[SyntheticScenesConfig]] = [
        SyntheticScenesConfig(
            name="base",
            description="64x64 images with captions and labels.",
            image_size=64,
            train_examples=20_000,
            test_examples=1_000,
        ),
        SyntheticScenesConfig(
            name="dense",
            description="64x64 images with captions, labels, segmentation, depth and normals.",
            image_size=64,
            train_examples=8_000,
            test_examples=500,
            dense=True,
        ),
        SyntheticScenesConfig(
            name="tiny",
            description="32x32, a few hundred examples with all features, for tests.",
            image_size=32,
            train_examples=256,
            test_examples=64,
            dense=True,
        ),
        SyntheticScenesConfig(
            name="unlabelled",
            description="64x64 images with captions from seeds no other config uses.",
            image_size=64,
            train_examples=10_000,
            test_examples=500,
            seed_offset=UNLABELLED_SEED_OFFSET,
        ),
    ]
    DEFAULT_CONFIG_NAME = "base"
    # TFDS 4.9.10 finds a builder's file through the `importlib_resources` back-port, which only
    # Python < 3.9 installs; naming the file here skips that look-up (it only locates an absent
    # checksums file: nothing is downloaded).
    code_path = epath.Path(__file__)

    def __init__(self, **kwargs: Any):
        # Random access (grain, tfds.data_source) needs ARRAY_RECORD; TFDS defaults to TFRECORD.
        kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        features = {
            "seed": tfds.features.Scalar(np.int64, doc="make_example seed of this example"),
            "image": tfds.features.Image(shape=(size, size, 3), dtype=np.uint8),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "synthetic_captions": tfds.features.Sequence(
                tfds.features.Text(), doc="captioner-style captions (DataCompDR's synthetic ones)"
            ),
            "label": tfds.features.ClassLabel(names=sampling.CLASS_NAMES),
            "num_objects": tfds.features.Scalar(np.int64),
            "primary": tfds.features.FeaturesDict(
                {
                    "shape": tfds.features.ClassLabel(names=list(geometry.SHAPES)),
                    "colour": tfds.features.ClassLabel(names=list(sampling.COLOURS)),
                    "area": tfds.features.Scalar(np.float32, doc="fraction of pixels"),
                    "centre": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                }
            ),
        }
        if self.builder_config.dense:
            # zlib: the ground's constant normal and class compress well.
            zlib = tfds.features.Encoding.ZLIB
            features.update(
                segmentation=tfds.features.Tensor(
                    shape=(size, size), dtype=np.uint8, encoding=zlib
                ),
                depth=tfds.features.Tensor(shape=(size, size), dtype=np.float32, encoding=zlib),
                normals=tfds.features.Tensor(
                    shape=(size, size, 3), dtype=np.float32, encoding=zlib
                ),
            )
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: every example is rendered from its seed
        config = self.builder_config
        return {
            split: self._generate_examples(split_seeds(split, count, config.seed_offset))
            for split, count in (("train", config.train_examples), ("test", config.test_examples))
        }

    def _generate_examples(self, seeds: range):
        config = self.builder_config
        yield from generate_examples(seeds, config.image_size, config.dense)


def prepare(config_name: str = "base", data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The builder for ``config_name``, generating its files first if they are not there yet.

    ``data_dir`` defaults to TFDS's (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    Calling it again is cheap: TFDS sees the finished files and does nothing.
    """
    builder = SyntheticScenes(config=config_name, data_dir=data_dir)
    builder.download_and_prepare(file_format=tfds.core.FileFormat.ARRAY_RECORD)
    return builder


def data_source(split: str = "train", config_name: str = "base", data_dir: str | None = None):
    """A random-access source (``len``, ``[i]``) over a prepared split, built first if needed."""
    builder = prepare(config_name, data_dir)
    return builder.as_data_source(split=split)
