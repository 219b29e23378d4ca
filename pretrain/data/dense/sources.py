"""From a source config to a dense source (``len``, ``[i]``), as ``image_text.make_source`` does
for image-text data.

A source config (a ConfigDict or a dict) names its kind in ``source``:
  source="synthetic_scenes"  the embedded scenes with exact targets (built locally on first use):
                             ``scenes_config`` "dense" (64 px, 8,000 train / 500 test, default)
                             or "tiny" (32 px, for tests); ``split``, ``data_dir``;
  source="tfds"              a prepared TFDS set ``tfds_name`` ("scene_parse150", "nyu_depth_v2",
                             "cityscapes"... see :mod:`pretrain.data.dense.tfds_sets`);
                             ``image_field``, ``segmentation_field``, ``depth_field`` override its
                             feature names; ``ignore_label`` (255); ``split``, ``data_dir``;
  source="folder"            a folder of samples in the dense layout: ``directory``,
                             ``recursive`` (False), ``depth_scale`` (1000);
  source="webdataset"        tar shards of samples in the dense layout: ``shards`` (paths, brace
                             pattern, glob), ``depth_scale`` (1000).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pretrain.data import image_text
from pretrain.data.dense import layout
from pretrain.data.dense.folder import FolderSource
from pretrain.data.dense.scenes import SceneRecords
from pretrain.data.dense.shards import DenseShardSource
from pretrain.data.dense.targets import IGNORE_LABEL
from pretrain.data.dense.tfds_sets import TfdsDenseRecords, tfds_layout

SOURCES = ("synthetic_scenes", "tfds", "folder", "webdataset")
DEFAULT_SCENES_CONFIG = "dense"


def _scenes_source(source_config: Mapping[str, Any]) -> Any:
    from pretrain.data.scenes import builder  # imports TFDS: only when asked for

    name = source_config.get("scenes_config") or DEFAULT_SCENES_CONFIG
    configs = builder.SyntheticScenes.builder_configs
    if name not in configs or not configs[name].dense:
        dense = sorted(n for n, config in configs.items() if config.dense)
        raise ValueError(f"scenes_config {name!r} has no dense targets; choose from {dense}")
    # image_text's scenes source: the same preparation (process 0 first on multi-host runs).
    scenes = image_text.make_source({**dict(source_config), "scenes_config": name})
    return SceneRecords(scenes)


def _tfds_source(source_config: Mapping[str, Any]) -> Any:
    name = source_config.get("tfds_name")
    if not name:
        raise ValueError("dense source 'tfds' needs tfds_name, e.g. 'scene_parse150'")
    builder = image_text.prepared_tfds_builder(name, source_config.get("data_dir") or None)
    return TfdsDenseRecords(
        builder.as_data_source(split=source_config.get("split", "train")),
        features=builder.info.features,
        layout=tfds_layout(
            name,
            image_field=source_config.get("image_field", ""),
            segmentation_field=source_config.get("segmentation_field", ""),
            depth_field=source_config.get("depth_field", ""),
        ),
        ignore_label=int(source_config.get("ignore_label", IGNORE_LABEL)),
    )


def make_dense_source(source_config: Mapping[str, Any]) -> Any:
    """A random-access dense source for one source config (see the module docstring)."""
    kind = source_config.get("source", "")
    depth_scale = float(source_config.get("depth_scale", layout.DEFAULT_DEPTH_SCALE))
    if kind == "synthetic_scenes":
        return _scenes_source(source_config)
    if kind == "tfds":
        return _tfds_source(source_config)
    if kind == "folder":
        if not source_config.get("directory"):
            raise ValueError("dense source 'folder' needs directory")
        return FolderSource(
            source_config["directory"],
            recursive=bool(source_config.get("recursive", False)),
            depth_scale=depth_scale,
        )
    if kind == "webdataset":
        if not source_config.get("shards"):
            raise ValueError("dense source 'webdataset' needs shards, e.g. '/data/voc/{0..9}.tar'")
        return DenseShardSource(source_config["shards"], depth_scale=depth_scale)
    raise ValueError(f"unknown dense source {kind!r}; choose from {SOURCES}")
