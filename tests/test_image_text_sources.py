"""Source configs: the embedded scenes, TFDS data sets by name (with and without captions)."""

import numpy as np
import pytest

from pretrain.data import image_text, scenes
from pretrain.data.scenes import builder


@pytest.fixture(scope="module")
def tiny_scenes():
    return builder.prepare("tiny")


def test_tfds_source_by_name_reads_captions_and_labels(tiny_scenes):
    del tiny_scenes
    source = image_text.make_source(
        {"source": "tfds", "tfds_name": "synthetic_scenes/tiny", "split": "test"}
    )
    direct = builder.data_source("test", "tiny")
    assert len(source) == len(direct) == 64
    record, expected = source[5], direct[5]
    np.testing.assert_array_equal(record["image"], expected["image"])
    assert list(record["captions"]) == list(expected["captions"])
    assert record["label"] == expected["label"]


def test_tfds_classification_set_uses_class_names_as_captions(tiny_scenes):
    del tiny_scenes
    source = image_text.make_source(
        {
            "source": "tfds",
            "tfds_name": "synthetic_scenes/tiny",
            "split": "train",
            "caption_field": "label",
        }
    )
    for index in range(10):
        record = source[index]
        assert record["captions"] == [scenes.CLASS_NAMES[record["label"]]]


def test_source_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown data source 'lmdb'"):
        image_text.make_source({"source": "lmdb"})
    with pytest.raises(ValueError, match="needs shards"):
        image_text.make_source({"source": "webdataset", "shards": ""})
    with pytest.raises(FileNotFoundError, match="not prepared"):
        image_text.make_source(
            {"source": "tfds", "tfds_name": "synthetic_scenes/dense", "data_dir": str(tmp_path)}
        )
    with pytest.raises(ValueError, match="caption_field 'alt_text' is not a feature"):
        image_text.make_source(
            {"source": "tfds", "tfds_name": "synthetic_scenes/tiny", "caption_field": "alt_text"}
        )
