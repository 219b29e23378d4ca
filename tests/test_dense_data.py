"""Tests of the dense data package: sources (scenes, TFDS, folders, shards), the folder layout's
encodings, the examples (scale, crop, flip, resize), skips and the grain pipeline."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from pretrain.data import dense, pipeline, webdataset
from pretrain.data.dense import encoding, resize, scenes, tfds_sets
from pretrain.data.dense.examples import DenseExampleMaker
from pretrain.data.examples import SkippedRecord
from pretrain.data.scenes import geometry, render, sampling

ALL_TARGETS = ("segmentation", "depth", "normals")
TINY = dense.DenseAugmentation(image_size=32, crop_size=(32, 32), eval_size=(32, 32))


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1)
    return np.clip(base + rng.integers(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)


def _unit_normals(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    normals = rng.normal(size=(height, width, 3))
    normals[..., 2] = np.abs(normals[..., 2]) + 0.1  # facing the camera, as visible surfaces do
    return (normals / np.linalg.norm(normals, axis=-1, keepdims=True)).astype(np.float32)


def _dense_record(height: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """A decoded record with every target, some pixels unlabelled / invalid."""
    rng = np.random.default_rng(seed)
    segmentation = rng.integers(0, 5, (height, width)).astype(np.uint8)
    segmentation[0, :3] = 255
    depth = rng.uniform(0.5, 10.0, (height, width)).astype(np.float32)
    depth[1, :2] = 0
    normals = _unit_normals(height, width, seed)
    normals[2, :2] = 0
    return {
        "image": _picture(height, width, seed),
        "segmentation": segmentation,
        "depth": depth,
        "normals": normals,
    }


def _batches(dataset, limit: int | None = None) -> list[dict]:
    out = []
    for batch in dataset:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def _valid_indices(batches) -> list[int]:
    return [int(i) for b in batches for i, v in zip(b["index"], b["valid"]) if v]


@pytest.fixture(scope="module")
def scene_source():
    return dense.make_dense_source(
        {"source": "synthetic_scenes", "scenes_config": "tiny", "split": "test"}
    )


# ----------------------------------------------------------------------------- scenes


def test_scenes_records_are_the_exact_targets_with_the_sky_invalid(scene_source):
    from pretrain.data.scenes import builder

    raw = builder.data_source("test", "tiny")
    assert len(scene_source) == len(raw) == 64 and scene_source.num_classes == 7
    for index in range(4):
        record, original = scene_source[index], raw[index]
        assert record["key"] == str(original["seed"])
        for name in ("image", *ALL_TARGETS):
            np.testing.assert_array_equal(record[name], original[name])
        assert set(np.unique(record["segmentation"])) <= set(range(7))
    # The embedded cameras never see the horizon: render one that does, to have some sky.
    scene = sampling.sample_scene(np.random.default_rng(5))
    level = geometry.Camera(eye=(0.0, 1.0, 8.0), target=(0.0, 1.0, 0.0), fov_degrees=40.0)
    rendered = render.render_scene(dataclasses.replace(scene, camera=level), 32)
    sky = rendered["depth"] == render.FAR_DEPTH
    assert 0 < sky.mean() < 1
    record = scenes.SceneRecords([{**rendered, "seed": 0}])[0]
    assert (record["depth"][sky] == 0).all() and (record["normals"][sky] == 0).all()
    np.testing.assert_array_equal(record["depth"][~sky], rendered["depth"][~sky])
    np.testing.assert_array_equal(record["normals"][~sky], rendered["normals"][~sky])
    np.testing.assert_array_equal(record["segmentation"], rendered["segmentation"])


def test_scenes_config_without_dense_targets_is_refused():
    with pytest.raises(ValueError, match="no dense targets"):
        dense.make_dense_source({"source": "synthetic_scenes", "scenes_config": "base"})


# ----------------------------------------------------------------------------- examples


def _example(record, *, train=True, seed=0, index=0, epoch=0, **augmentation):
    maker = DenseExampleMaker(
        train=train,
        targets=ALL_TARGETS,
        seed=seed,
        augmentation=dataclasses.replace(TINY, **augmentation),
    )
    return maker((epoch, index, record))


def test_flip_mirrors_everything_and_negates_normals_x(scene_source):
    mirrored = kept = 0
    for index in range(12):
        record = scene_source[index]
        plain = _example(record, index=index, horizontal_flip=False)
        flipped = _example(record, index=index, horizontal_flip=True)
        if all(np.array_equal(plain[n], flipped[n]) for n in ("image", *ALL_TARGETS)):
            kept += 1
            continue
        mirrored += 1
        for name in ("image", "segmentation", "depth"):
            np.testing.assert_array_equal(flipped[name], plain[name][:, ::-1])
        np.testing.assert_array_equal(flipped["normals"][..., 0], -plain["normals"][:, ::-1, 0])
        np.testing.assert_array_equal(flipped["normals"][..., 1:], plain["normals"][:, ::-1, 1:])
        assert np.abs(plain["normals"][..., 0]).max() > 0.1  # the negation is visible
        assert not np.signbit(flipped["normals"][(flipped["normals"] == 0).all(-1)]).any()
    assert mirrored and kept  # a fair coin over 12 examples


def test_scaled_crops_pad_with_ignore_and_invalid():
    record = _dense_record(32, 48, 0)
    example = _example(record, scale_range=(0.5, 0.5), horizontal_flip=False)  # 16 x 24
    assert example["image"].shape == (32, 32, 3)
    assert (example["segmentation"][16:] == 255).all() and (
        example["segmentation"][:, 24:] == 255
    ).all()
    for name in ("image", "depth", "normals"):
        assert not example[name][16:].any() and not example[name][:, 24:].any()
    inside = resize.resize_nearest(record["segmentation"], (16, 24))
    np.testing.assert_array_equal(example["segmentation"][:16, :24], inside)
    np.testing.assert_array_equal(
        example["image"][:16, :24],
        np.asarray(Image.fromarray(record["image"]).resize((24, 16), Image.Resampling.BILINEAR)),
    )


def test_targets_hold_only_values_of_their_source(scene_source):
    record = _dense_record(40, 30, 1)
    for index in range(6):
        example = _example(record, index=index, scale_range=(0.7, 1.9))
        assert set(np.unique(example["segmentation"])) <= set(np.unique(record["segmentation"]))
        assert np.isin(example["depth"], np.append(record["depth"], 0)).all()
        source_normals = {tuple(n) for n in record["normals"].reshape(-1, 3).tolist()}
        source_normals.add((0.0, 0.0, 0.0))
        for normal in example["normals"].reshape(-1, 3):
            x, y, z = normal.tolist()
            assert (x, y, z) in source_normals or (0.0 - x, y, z) in source_normals
    for index in range(4):  # the scenes' class maps, through random scales and crops
        source_record = scene_source[index]
        example = _example(source_record, index=index)
        present = set(np.unique(source_record["segmentation"])) | {255}
        assert set(np.unique(example["segmentation"])) <= present


def test_eval_examples_are_deterministic_resized_and_in_order(scene_source):
    augmentation = dataclasses.replace(TINY, eval_size=(24, 40))

    def run():
        dataset = dense.dense_dataset(
            scene_source,
            batch_size_per_process=10,
            seed=0,
            train=False,
            targets=ALL_TARGETS,
            augmentation=augmentation,
            drop_remainder=False,
        )
        return _batches(dataset)

    first, again = run(), run()
    assert _valid_indices(first) == list(range(64))
    assert [int(b["valid"].sum()) for b in first] == [10] * 6 + [4]
    for a, b in zip(first, again):
        for name in ("image", *ALL_TARGETS, "index", "valid"):
            np.testing.assert_array_equal(a[name], b[name])
    batch = first[0]
    assert batch["image"].shape == (10, 24, 40, 3) and batch["normals"].shape == (10, 24, 40, 3)
    assert batch["segmentation"].dtype == np.int32 and batch["depth"].dtype == np.float32
    record = scene_source[3]
    np.testing.assert_array_equal(
        batch["image"][3],
        np.asarray(Image.fromarray(record["image"]).resize((40, 24), Image.Resampling.BILINEAR)),
    )
    np.testing.assert_array_equal(
        batch["depth"][3], resize.resize_nearest(record["depth"], (24, 40))
    )
    # A different seed changes nothing in evaluation.
    other = dense.dense_dataset(
        scene_source,
        batch_size_per_process=10,
        seed=7,
        train=False,
        targets=ALL_TARGETS,
        augmentation=augmentation,
    )
    np.testing.assert_array_equal(next(iter(other))["image"], batch["image"])


# ----------------------------------------------------------------------------- folder layout


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _native_eval(source, targets=ALL_TARGETS, **options):
    """Every example at its own size (records of one size), in order."""
    record_hw = options.pop("size", (12, 16))
    augmentation = dataclasses.replace(TINY, eval_size=record_hw)
    dataset = dense.dense_dataset(
        source,
        batch_size_per_process=options.pop("batch_size", 2),
        seed=0,
        train=False,
        targets=targets,
        augmentation=augmentation,
        drop_remainder=False,
        **options,
    )
    return _batches(dataset)


def test_folder_layout_round_trip(tmp_path):
    records = [_dense_record(12, 16, seed) for seed in range(4)]
    records[1]["segmentation"] = records[1]["segmentation"].astype(np.int32) * 100  # 16-bit
    records[3]["depth"][0, 0] = 1e-5  # valid but below the PNG's resolution
    written = [
        dense.write_dense_example(tmp_path, "a", **records[0]),
        dense.write_dense_example(tmp_path / "x", "b", **records[1]),  # a subfolder: key x/b
        dense.write_dense_example(
            tmp_path, "c", **records[2], depth_format="png", normals_format="png"
        ),
        dense.write_dense_example(
            tmp_path,
            "d",
            **{**records[3], "image": _jpeg(records[3]["image"])},
            depth_format="png",
        ),
    ]
    assert written[0] == ["a.png", "a.seg.png", "a.depth.npy", "a.normals.npy"]
    assert written[3][0] == "d.jpg" and "d.depth.png" in written[3]
    flat = dense.make_dense_source({"source": "folder", "directory": str(tmp_path)})
    assert [flat.key(i) for i in range(len(flat))] == ["a", "c", "d"]  # not recursive
    source = dense.make_dense_source(
        {"source": "folder", "directory": str(tmp_path), "recursive": True}
    )
    assert [source.key(i) for i in range(len(source))] == ["a", "c", "d", "x/b"]
    order = [0, 2, 3, 1]  # the records in key order
    batches = _native_eval(source)
    examples = [
        {name: batch[name][row] for name in ("image", *ALL_TARGETS)}
        for batch in batches
        for row in range(2)
    ]
    for example, number in zip(examples, order):
        record = records[number]
        np.testing.assert_array_equal(example["segmentation"], record["segmentation"])
        if number != 3:
            np.testing.assert_array_equal(example["image"], record["image"])
        if number in (0, 1):  # npy: exact
            np.testing.assert_array_equal(example["depth"], record["depth"])
            np.testing.assert_array_equal(example["normals"], record["normals"])
    # depth.png: within half a step of its scale, invalid stays invalid, valid stays valid.
    scaled = tmp_path / "scaled"
    dense.write_dense_example(
        scaled,
        "e",
        records[3]["image"],
        depth=records[3]["depth"],
        depth_format="png",
        depth_scale=4000.0,
    )
    quarter_mm = _native_eval(
        dense.make_dense_source({"source": "folder", "directory": str(scaled), "depth_scale": 4e3}),
        targets=("depth",),
    )[0]["depth"][0]
    for got, number, scale in ((examples[1]["depth"], 2, 1e3), (quarter_mm, 3, 4e3)):
        want = records[number]["depth"]
        assert ((got == 0) == (want == 0)).all()
        valid = want > 1e-3
        assert np.abs(got[valid] - want[valid]).max() <= 0.5 / scale + 1e-6
    # A valid depth below half a step is stored as one step, never as the invalid 0.
    assert examples[2]["depth"][0, 0] == np.float32(1e-3)
    assert quarter_mm[0, 0] == np.float32(1 / 4e3)
    # normals.png: unit length, within a third of a degree, the invalid ones zero.
    got, want = examples[1]["normals"], records[2]["normals"]
    invalid = (want == 0).all(-1)
    assert (got[invalid] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(got[~invalid], axis=-1), 1, atol=1e-6)
    cosine = np.clip((got[~invalid] * want[~invalid]).sum(-1), -1, 1)
    assert np.degrees(np.arccos(cosine)).max() < 0.35


def test_writer_refuses_what_it_cannot_store(tmp_path):
    record = _dense_record(8, 8, 0)
    with pytest.raises(ValueError, match=r"use depth\.npy"):
        dense.dense_members(record["image"], depth=np.full((8, 8), 70.0), depth_format="png")
    with pytest.raises(ValueError, match="differs from the image"):
        dense.dense_members(record["image"], segmentation=np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match=r"without '\.'"):
        dense.write_dense_example(tmp_path, "a.b", record["image"])
    with pytest.raises(encoding.CorruptLabelError, match="not PNG"):
        encoding.decode_segmentation_png(_jpeg(record["image"]))


def test_webdataset_shards_read_the_same_layout(tmp_path):
    records = [_dense_record(12, 16, seed) for seed in range(5)]
    samples = [
        {
            "__key__": f"s{i}",
            **dense.dense_members(
                r["image"], segmentation=r["segmentation"], depth=r["depth"], normals=r["normals"]
            ),
        }
        for i, r in enumerate(records[:4])
    ]
    shards = webdataset.write_shards(samples, str(tmp_path / "shard-%02d.tar"), 3)
    extra = str(tmp_path / "shard-02.tar")
    with tarfile.open(extra, "w") as tar:  # written through the tar branch of the writer
        dense.write_dense_example(tar, "s4", **records[4])
    source = dense.make_dense_source(
        {"source": "webdataset", "shards": str(tmp_path / "shard-{00..02}.tar")}
    )
    source = pickle.loads(pickle.dumps(source))  # as grain worker processes get it
    assert len(shards) == 2 and len(source) == 5
    assert [source.key(i) for i in range(5)] == [f"s{i}" for i in range(5)]
    batches = _native_eval(source, batch_size=5)
    for row, record in enumerate(records):
        for name in ("image", *ALL_TARGETS):
            np.testing.assert_array_equal(batches[0][name][row], record[name])


# ----------------------------------------------------------------------------- skips


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
    good = _dense_record(12, 16, 0)
    for key in ("a", "b", "c", "d", "e", "f"):
        dense.write_dense_example(tmp_path, key, good["image"], good["segmentation"])
    os.remove(tmp_path / "b.seg.png")  # missing label
    (tmp_path / "c.seg.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt label
    (tmp_path / "d.seg.png").write_bytes(encoding.encode_segmentation_png(np.zeros((12, 15), int)))
    (tmp_path / "e.png").write_bytes(b"not an image")  # corrupt image
    source = dense.FolderSource(tmp_path)
    batches = _native_eval(source, targets=("segmentation",), batch_size=4)
    assert _valid_indices(batches) == [0, 5]
    assert sum(b["skipped"] for b in batches) == 4
    reasons: dict[str, int] = {}
    for batch in batches:
        for reason, count in batch["skipped_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    assert reasons == {
        "missing_label": 1,
        "corrupt_label": 1,
        "label_size_mismatch": 1,
        "corrupt_image": 1,
    }
    # A requested target the sample never had is a missing label too; the maker and the source
    # pickle (grain worker processes get them so).
    maker = DenseExampleMaker(train=False, targets=("depth",), seed=0, augmentation=TINY)
    maker, source = pickle.loads(pickle.dumps((maker, source)))
    assert maker((0, 0, source[0])) == SkippedRecord(index=0, reason="missing_label")


# ----------------------------------------------------------------------------- TFDS


def test_tfds_ade20k_labels_shift_and_other_is_ignored():
    annotation = np.array([[0, 1, 5], [150, 151, 2]], np.uint8)
    fake = [{"image": _picture(2, 3, 0), "annotation": np.repeat(annotation[..., None], 3, -1)}]
    features = {"image": None, "annotation": None}
    layout = tfds_sets.tfds_layout("scene_parse150")
    records = dense.TfdsDenseRecords(fake, features=features, layout=layout)
    assert records.num_classes == 150
    np.testing.assert_array_equal(records[0]["segmentation"], [[255, 0, 4], [149, 255, 1]])
    batch = _native_eval(records, targets=("segmentation",), size=(2, 3), batch_size=1)[0]
    np.testing.assert_array_equal(batch["segmentation"][0], [[255, 0, 4], [149, 255, 1]])
    # Feature names are overridable, and checked.
    renamed = [{"rgb": r["image"], "classes": r["annotation"]} for r in fake]
    layout = tfds_sets.tfds_layout(
        "scene_parse150", image_field="rgb", segmentation_field="classes"
    )
    records = dense.TfdsDenseRecords(renamed, features={"rgb": 0, "classes": 0}, layout=layout)
    assert records[0]["segmentation"][0, 0] == 255
    with pytest.raises(ValueError, match="not a feature"):
        dense.TfdsDenseRecords(
            fake, features={"image": 0}, layout=tfds_sets.tfds_layout("scene_parse150")
        )


def test_cityscapes_label_ids_become_the_19_train_ids():
    table = tfds_sets.cityscapes_table()
    assert len(table) == 34 and sorted(set(table.tolist()) - {255}) == list(range(19))
    named = {7: 0, 8: 1, 11: 2, 17: 5, 19: 6, 21: 8, 23: 10, 24: 11, 26: 13, 31: 16, 33: 18}
    assert {i: int(table[i]) for i in named} == named
    assert all(table[i] == 255 for i in (0, 1, 3, 6, 9, 10, 14, 15, 16, 18, 29, 30))
    ids = np.array([[7, 23, 0], [33, 40, 9]], np.uint8)[..., None]  # TFDS's (H, W, 1)
    fake = [{"image_left": _picture(2, 3, 1), "segmentation_label": ids}]
    layout = tfds_sets.tfds_layout("cityscapes/semantic_segmentation")
    records = dense.TfdsDenseRecords(
        fake, features={"image_left": 0, "segmentation_label": 0}, layout=layout
    )
    np.testing.assert_array_equal(records[0]["segmentation"], [[0, 10, 255], [18, 255, 255]])


def test_tfds_sets_must_be_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        dense.make_dense_source(
            {"source": "tfds", "tfds_name": "nyu_depth_v2", "data_dir": str(tmp_path)}
        )
    depth = {"image": _picture(4, 4, 0), "depth": np.full((4, 4), 2.5, np.float16)}
    records = dense.TfdsDenseRecords(
        [depth], features=depth, layout=tfds_sets.tfds_layout("nyu_depth_v2")
    )
    batch = _native_eval(records, targets=("depth",), size=(4, 4), batch_size=1)[0]
    assert batch["depth"].dtype == np.float32 and (batch["depth"] == 2.5).all()


# ----------------------------------------------------------------------------- the pipeline


def _memory_source(count: int = 12) -> list[dict[str, np.ndarray]]:
    return [_dense_record(20, 24, seed) for seed in range(count)]


def _train(source, **options):
    defaults = {
        "batch_size_per_process": 2,
        "seed": 3,
        "train": True,
        "targets": ALL_TARGETS,
        "augmentation": dataclasses.replace(TINY, image_size=20, crop_size=(16, 16)),
    }
    return dense.dense_dataset(source, **{**defaults, **options})


def test_processes_share_an_epoch_and_examples_do_not_depend_on_them():
    source = _memory_source()
    single = _batches(_train(source, num_epochs=1))
    by_index = {
        int(i): {name: b[name][row] for name in ("image", *ALL_TARGETS)}
        for b in single
        for row, i in enumerate(b["index"])
    }
    per_process = []
    for p in range(3):
        batches = _batches(_train(source, num_epochs=1, process_index=p, process_count=3))
        per_process.append(_valid_indices(batches))
        for b in batches:
            for row, i in enumerate(b["index"]):
                for name, want in by_index[int(i)].items():
                    np.testing.assert_array_equal(b[name][row], want)
    sets = [set(indices) for indices in per_process]
    assert sum(map(len, sets)) == 12 and set.union(*sets) == set(range(12))
    order = grain.MapDataset.range(12).shuffle(seed=pipeline.shuffle_seed(3))
    stream = [int(order[i]) for i in range(12)]
    assert _valid_indices(single) == stream
    assert per_process == [stream[p::3] for p in range(3)]
    evaluation = [
        _valid_indices(
            _batches(_train(source, train=False, process_index=p, process_count=3, num_epochs=1))
        )
        for p in range(3)
    ]
    assert evaluation == [list(range(0, 4)), list(range(4, 8)), list(range(8, 12))]


def test_iterator_state_restores_the_exact_position():
    source = _memory_source()
    source[5] = {"image": source[5]["image"]}  # no targets: skipped on the way
    dataset = _train(source, batch_size_per_process=3)
    iterator = iter(dataset)
    for _ in range(4):
        next(iterator)
    state = iterator.get_state()
    json.dumps(state)  # orbax stores iterator states as JSON
    expected = [next(iterator) for _ in range(6)]
    restored = iter(dataset)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert got["skipped"] == want["skipped"]
        assert got["skipped_reasons"] == want["skipped_reasons"]
        for name in ("image", *ALL_TARGETS, "index", "valid"):
            np.testing.assert_array_equal(got[name], want[name])
    assert sum(b["skipped"] for b in expected) >= 1
