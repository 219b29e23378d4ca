"""Reinforced (DataCompDR-style) training: synthetic captions, stored teacher embeddings and
augmentations in shards, the tool that makes them, and the CLIP task's reinforced loss."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_clip_towers
import test_distill_loss
import tiny_reinforced_config
from PIL import Image
from tree_compare import assert_close_at_one_scale

from configs import clip_reinforced
from losses.distill import ReinforcedLossWeights
from models.two_tower import TwoTowerModel
from pretrain import gradients, reinforce, sharding, trainer
from pretrain.components.reinforcements import ReinforcementFields
from pretrain.components.runs import restore_run_variables
from pretrain.components.teachers import build_teacher
from pretrain.data import image_text, scenes, transforms, webdataset
from pretrain.data.examples import Augmentation, Plugins
from pretrain.data.pipeline import image_text_dataset
from pretrain.data.scenes import builder
from pretrain.data.tokenizer import ClipTokenizer
from pretrain.data.transforms import CLIP_MEAN, CLIP_STD
from pretrain.data.webdataset import datacompdr
from pretrain.tasks.clip import Task as ClipTask

# ------------------------------------------------------------------- the embedded scenes ----


def test_scene_synthetic_captions_describe_the_primary_object():
    for seed in range(60):
        example = scenes.make_example(seed, 32)
        primary = example["primary"]
        colour = scenes.COLOURS[primary["colour"]]
        nouns = scenes.SHAPE_NOUNS[scenes.SHAPES[primary["shape"]]]
        synthetic = example["synthetic_captions"]
        assert len(synthetic) == scenes.SYNTHETIC_CAPTIONS_PER_IMAGE
        assert len(set(synthetic)) == len(synthetic)
        assert not set(synthetic) & set(example["captions"])
        for caption in synthetic:
            assert colour in caption.split(), caption
            assert any(noun in caption.replace(",", "").split() for noun in nouns), caption
    assert (
        scenes.make_example(3, 32)["synthetic_captions"]
        == (scenes.make_example(3, 32)["synthetic_captions"])
    )


def test_tfds_scenes_records_carry_synthetic_captions():
    source = image_text.make_source(
        {"source": "synthetic_scenes", "scenes_config": "tiny", "split": "train"}
    )
    record = source[5]
    seed = int(builder.data_source("train", "tiny")[5]["seed"])
    expected = scenes.make_example(seed, 32)
    decoded = [c.decode() if isinstance(c, bytes) else c for c in record["synthetic_captions"]]
    assert decoded == expected["synthetic_captions"]


# ----------------------------------------------------------------- DataCompDR shard members ----


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_webdataset_reads_datacompdr_members(tmp_path):
    rng = np.random.default_rng(0)
    image_emb, text_emb = rng.normal(size=(3, 8)), rng.normal(size=(6, 8))
    boxes = [[1, 2, 10, 12], [0, 0, 16, 16], [3, 4, 5, 6]]
    # DataCompDR stores param_aug as the JSON text of a list of [box, RandAugment ops].
    param_aug = json.dumps([[box, [[2, -0.09]]] for box in boxes])
    samples = [
        {
            "png": _png(np.zeros((16, 16, 3), np.uint8)),
            "txt": "a real caption",
            "syn.json": {"syn_text": [f"synthetic {i}" for i in range(5)]},
            "paug.json": {"param_aug": param_aug},
            "npz": _npz(image_emb=image_emb.astype(np.float16), text_emb=text_emb),
        },
        {"png": _png(np.zeros((16, 16, 3), np.uint8)), "txt": "plain sample"},
        {"png": _png(np.zeros((16, 16, 3), np.uint8)), "txt": "broken", "npz": b"not an npz"},
    ]
    paths = webdataset.write_shards(samples, str(tmp_path / "dr-%d.tar"), 3)
    plain = webdataset.WebDatasetSource(paths)  # plain training reads none of them
    assert set(plain[0]) == set(plain[2]) == {"key", "image_bytes", "captions", "metadata"}
    source = webdataset.WebDatasetSource(paths, read_reinforcements=True)
    record = source[0]
    assert record["captions"] == ["a real caption"]
    assert record["synthetic_captions"] == [f"synthetic {i}" for i in range(5)]
    np.testing.assert_allclose(
        record["teacher_image_embeddings"], image_emb.astype(np.float16), rtol=0
    )
    np.testing.assert_allclose(record["teacher_text_embeddings"], text_emb, rtol=0)
    np.testing.assert_array_equal(record["augmentation_boxes"], boxes)
    assert set(source[1]) == {"key", "image_bytes", "captions", "metadata"}
    assert "npz" in source[2]["malformed_reinforcement"]


def test_teacher_embeddings_parse_in_many_threads_at_once():
    # grain reads records in threads; NumPy's header parsing is not thread-safe on CPython 3.11.
    rng = np.random.default_rng(2)
    payloads = [
        _npz(image_emb=rng.normal(size=(2, 4)), text_emb=rng.normal(size=(3, 4))) for _ in range(64)
    ]
    expected = [datacompdr.parse_teacher_embeddings(p) for p in payloads]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        parsed = list(pool.map(datacompdr.parse_teacher_embeddings, payloads * 40))
    for number, fields in enumerate(parsed):
        reference = expected[number % len(payloads)]
        np.testing.assert_array_equal(
            fields["teacher_text_embeddings"], reference["teacher_text_embeddings"]
        )


# ----------------------------------------------------------------------------- the pipeline ----

SIZE, CAPTIONS, SYNTHETIC, VIEWS = 24, 3, 4, 5


def _row_code(row: int, dim: int = 16) -> np.ndarray:
    """A distinct embedding per stored row, so an example's row can be read back."""
    return np.eye(dim, dtype=np.float32)[row]


class ReinforcedRecords:
    """Decoded records with synthetic captions, coded teacher rows and stored views."""

    def __init__(self, count: int = 12, boxes: bool = True):
        rng = np.random.default_rng(1)
        self.images = rng.integers(0, 256, (count, 40, 48, 3), dtype=np.uint8)
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        record = {
            "image": self.images[index],
            "captions": [f"real {index} {k}" for k in range(CAPTIONS)],
            "synthetic_captions": [f"synthetic {index} {k}" for k in range(SYNTHETIC)],
            "teacher_image_embeddings": np.stack([_row_code(v) for v in range(VIEWS)]),
            "teacher_text_embeddings": np.stack(
                [_row_code(VIEWS + r) for r in range(CAPTIONS + SYNTHETIC)]
            ),
        }
        if self.boxes:
            record["augmentation_boxes"] = np.array(
                [[v, 2 * v, 20 + v, 30 - v] for v in range(VIEWS)]
            )
        return record


def _stream(source, reinforcement, seed=0):
    return image_text_dataset(
        source,
        batch_size_per_process=4,
        seed=seed,
        train=True,
        image_size=SIZE,
        tokenizer=ClipTokenizer(16),
        plugins=Plugins(record_fields=reinforcement),
        augmentation=Augmentation(horizontal_flip=True),
    )


def test_pipeline_pairs_the_stored_view_and_caption_rows_with_what_the_example_shows():
    source = ReinforcedRecords()
    tokenizer = ClipTokenizer(16)
    iterator = iter(
        _stream(source, ReinforcementFields(synthetic_captions=True, teacher_embeddings=True))
    )
    views_seen = set()
    for _ in range(6):
        batch = next(iterator)
        for row in range(4):
            index = int(batch["index"][row])
            record = source[index]
            view = int(np.argmax(batch["teacher_image"][row]))
            views_seen.add(view)
            expected_image = transforms.crop_and_resize(
                record["image"], tuple(record["augmentation_boxes"][view]), SIZE
            )
            np.testing.assert_array_equal(batch["image"][row], expected_image)  # never flipped
            real_row = int(np.argmax(batch["teacher_text"][row])) - VIEWS
            synthetic_row = int(np.argmax(batch["teacher_synthetic_text"][row])) - VIEWS
            assert 0 <= real_row < CAPTIONS <= synthetic_row < CAPTIONS + SYNTHETIC
            np.testing.assert_array_equal(
                batch["text"][row], tokenizer([record["captions"][real_row]])[0]
            )
            synthetic = record["synthetic_captions"][synthetic_row - CAPTIONS]
            np.testing.assert_array_equal(batch["synthetic_text"][row], tokenizer([synthetic])[0])
    assert len(views_seen) > 2


def test_reinforced_examples_follow_the_seed_streams():
    # Recomputed from the streams alone: the caption from [seed, 1, epoch, index], then the
    # synthetic caption and the view, in that order, from [seed, 3, epoch, index].
    source, seed = ReinforcedRecords(), 5
    tokenizer = ClipTokenizer(16)
    batch = next(iter(_stream(source, ReinforcementFields(True, True), seed=seed)))
    for row, index in enumerate(batch["index"]):
        record = source[int(index)]
        caption = int(np.random.default_rng([seed, 1, 0, int(index)]).integers(CAPTIONS))
        draws = np.random.default_rng([seed, 3, 0, int(index)])
        synthetic, view = int(draws.integers(SYNTHETIC)), int(draws.integers(VIEWS))
        box = tuple(record["augmentation_boxes"][view])
        np.testing.assert_array_equal(
            batch["image"][row], transforms.crop_and_resize(record["image"], box, SIZE)
        )
        np.testing.assert_array_equal(
            batch["text"][row], tokenizer([record["captions"][caption]])[0]
        )
        np.testing.assert_array_equal(
            batch["synthetic_text"][row], tokenizer([record["synthetic_captions"][synthetic]])[0]
        )
        np.testing.assert_array_equal(batch["teacher_image"][row], _row_code(view))
        np.testing.assert_array_equal(batch["teacher_text"][row], _row_code(VIEWS + caption))
        np.testing.assert_array_equal(
            batch["teacher_synthetic_text"][row], _row_code(VIEWS + CAPTIONS + synthetic)
        )


def test_reinforcement_changes_no_crop_or_caption_without_stored_views():
    source = ReinforcedRecords(boxes=False)
    plain = next(iter(_stream(source, None)))
    reinforced = next(iter(_stream(source, ReinforcementFields(True, True))))
    for name in ("image", "text", "index"):
        np.testing.assert_array_equal(plain[name], reinforced[name])
    assert "synthetic_text" not in plain


class FaultyRecords(ReinforcedRecords):
    """Every record but the good ones is wrong in one way."""

    faults = ("no_synthetic", "row_count", "box_outside", "malformed", "box_count")

    def __getitem__(self, index: int) -> dict:
        record = super().__getitem__(index)
        fault = self.faults[index % 6] if index % 6 < len(self.faults) else ""
        if fault == "no_synthetic":
            record["synthetic_captions"] = ["  "]
        elif fault == "row_count":
            record["teacher_text_embeddings"] = record["teacher_text_embeddings"][:-1]
        elif fault == "box_outside":
            record["augmentation_boxes"] = record["augmentation_boxes"] + 30
        elif fault == "malformed":
            record["malformed_reinforcement"] = "npz member unreadable"
        elif fault == "box_count":
            record["augmentation_boxes"] = record["augmentation_boxes"][:2]
        return record


def test_bad_reinforcements_are_skipped_and_counted():
    source = FaultyRecords(count=24)  # 4 good records (index % 6 == 5)
    stream = image_text_dataset(
        source,
        batch_size_per_process=4,
        seed=0,
        train=True,
        image_size=SIZE,
        tokenizer=ClipTokenizer(16),
        plugins=Plugins(record_fields=ReinforcementFields(True, True)),
        num_epochs=1,
    )
    batches = list(stream)
    assert len(batches) == 1
    assert sorted(int(i) % 6 for i in batches[0]["index"]) == [5, 5, 5, 5]
    assert batches[0]["skipped"] == 20


# ------------------------------------------------------------------------------ the tool ----


@pytest.fixture(scope="module")
def reinforced(teacher_workdir, tmp_path_factory):
    """(config, directory) of the tiny scenes reinforced by the tiny teacher."""
    directory = str(tmp_path_factory.mktemp("reinforced"))
    config = tiny_reinforced_config.get_config(f"{teacher_workdir},{directory}")
    reinforce.reinforce(config)
    return config, directory


def _teacher_encoders(config):
    spec = config.reinforce.teachers.clip_runlocal
    teacher = build_teacher(spec)
    params = teacher.load()
    variables = {"params": params}

    def images(batch):
        unit = (batch.astype(np.float32) / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
        return teacher.model.apply(variables, unit, method=TwoTowerModel.encode_image)[0]

    def texts(captions):
        tokens = ClipTokenizer(teacher.context_length)(captions)
        return teacher.model.apply(variables, tokens, method=TwoTowerModel.encode_text)[0]

    return teacher, images, texts


def test_reinforce_stores_the_teacher_embeddings_of_each_view_and_caption(reinforced):
    config, directory = reinforced
    manifest = json.loads(Path(directory, reinforce.MANIFEST).read_text())
    assert manifest["written"] == 256 and manifest["num_shards"] == 3
    assert manifest["embed_dim"] == 32 and manifest["num_augmentations"] == 4
    shards = webdataset.WebDatasetSource(
        clip_reinforced.shards_glob(directory), read_reinforcements=True
    )
    originals = image_text.make_source(config.reinforce.source)
    teacher, encode_images, encode_texts = _teacher_encoders(config)
    for index in (0, 101, 255):
        record, original = shards[index], originals[index]
        np.testing.assert_array_equal(
            np.asarray(transforms.decode_to_pil(record["image_bytes"])), original["image"]
        )
        boxes = record["augmentation_boxes"]
        assert boxes.shape == (4, 4)
        assert all(transforms.box_inside(box, 32, 32) for box in boxes)
        views = np.stack(
            [
                transforms.crop_and_resize(original["image"], tuple(b), teacher.image_size)
                for b in boxes
            ]
        )
        np.testing.assert_allclose(
            record["teacher_image_embeddings"], encode_images(views), atol=2e-3
        )
        real = [c.decode() for c in original["captions"]]
        synthetic = [c.decode() for c in original["synthetic_captions"]]
        assert record["captions"] == real and record["synthetic_captions"] == synthetic
        np.testing.assert_allclose(
            record["teacher_text_embeddings"], encode_texts(real + synthetic), atol=2e-3
        )
        assert record["metadata"]["label"] == original["label"]


def test_reinforce_resumes_and_rewrites_a_lost_shard_identically(reinforced):
    config, directory = reinforced
    lost = os.path.join(directory, reinforce.SHARD_PATTERN % 1)
    kept = os.path.join(directory, reinforce.SHARD_PATTERN % 0)
    original_bytes, kept_mtime = Path(lost).read_bytes(), os.stat(kept).st_mtime_ns
    os.remove(lost)
    os.remove(f"{lost}.counts.json")
    os.remove(os.path.join(directory, reinforce.MANIFEST))
    assert not reinforce.is_complete(directory)
    manifest = reinforce.reinforce(config)
    assert manifest["written"] == 256
    assert Path(lost).read_bytes() == original_bytes
    assert os.stat(kept).st_mtime_ns == kept_mtime
    other = config.copy_and_resolve_references()
    other.reinforce.num_augmentations = 2
    with pytest.raises(ValueError, match="num_augmentations"):
        reinforce.reinforce(other)


# ------------------------------------------------------------------------ the task's loss ----


def _random_batch(task, batch_size, rng):
    spec = task.batch_spec(batch_size)
    batch = {}
    for name, shape in spec.items():
        if name == "image":
            batch[name] = rng.integers(0, 256, shape.shape, dtype=np.uint8)
        elif name.endswith("text") and shape.dtype == jnp.int32:
            batch[name] = rng.integers(1, 400, shape.shape).astype(np.int32)
        else:
            batch[name] = rng.normal(size=shape.shape).astype(np.float32)
    return batch


def _normalised(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("num_teachers", [1, 2])
def test_task_loss_is_the_weighted_reinforced_loss(num_teachers, teacher_workdir):
    config = tiny_reinforced_config.get_config(f"{teacher_workdir},unused")
    config.reinforced.update(
        {"num_teachers": num_teachers, "real_clip_weight": 0.3, "synthetic_clip_weight": 0.5}
    )
    config.reinforced.distill_weight = 0.7
    config.range_augment.enabled = False
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    task = ClipTask(config, mesh)
    assert task.batch_fields == (
        "image",
        "text",
        "synthetic_text",
        "teacher_image",
        "teacher_text",
        "teacher_synthetic_text",
    )
    params, _ = task.init_variables(jax.random.key(0))
    batch = _random_batch(task, 8, np.random.default_rng(3))
    loss, metrics, _ = jax.jit(task.loss_fn)(params, batch, jax.random.key(1), jnp.int32(0))
    embeddings = jax.jit(task.embed)(params, batch, jax.random.key(1))
    student = [np.asarray(embeddings[k], np.float64) for k in ("image", "text", "synthetic_text")]
    teacher = [
        _normalised(np.asarray(batch[k], np.float64).reshape(8, num_teachers, -1))
        for k in ("teacher_image", "teacher_text", "teacher_synthetic_text")
    ]
    scale = float(np.exp(params["logit_scale"]))
    weights = ReinforcedLossWeights(0.3, 0.5, 0.7)
    expected, parts, _ = test_distill_loss.reinforced_reference(
        student, teacher, scale, 100.0, weights
    )
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    for name, value in parts.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=2e-5)


def test_sharded_and_accumulated_reinforced_gradients_equal_the_single_device_ones(
    teacher_workdir,
):
    config = tiny_reinforced_config.get_config(f"{teacher_workdir},unused")
    config.range_augment.enabled = False
    single = ClipTask(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    params, _ = single.init_variables(jax.random.key(0))
    batch = _random_batch(single, 16, np.random.default_rng(4))
    rng, step = jax.random.key(1), jnp.int32(0)
    output, grads = jax.jit(lambda p, b: gradients.loss_and_gradients(single, p, b, rng, step))(
        params, batch
    )

    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    sharded = ClipTask(config, mesh)
    placed = jax.device_put(batch, sharding.batch_sharding(mesh))
    sharded_output, sharded_grads = jax.jit(
        lambda p, b: gradients.accumulated_gradients(sharded, p, b, rng, step, 2, mesh)
    )(params, placed)
    np.testing.assert_allclose(float(sharded_output.loss), float(output.loss), rtol=1e-5)
    assert_close_at_one_scale(sharded_grads, grads, rtol=0, scale_atol=2e-6)


# --------------------------------------------------------------------------- the trainer ----


def test_tiny_reinforced_run_trains_on_the_shards(reinforced, tmp_path):
    config, _ = reinforced
    config = config.copy_and_resolve_references()
    config.mesh = {"data": 4, "fsdp": 2}
    config.total_steps = 4  # one evaluation, at the end
    trainer.train_and_evaluate(config, str(tmp_path))
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    names = {row.split(",")[1] for row in rows}
    for name in ("clip_real", "clip_synthetic", "distill_real", "distill_synthetic"):
        assert f"train/{name}" in names
    assert any(name.endswith("zeroshot_top1") for name in names)
    losses = [float(r.split(",")[2]) for r in rows if r.split(",")[1] == "train/loss"]
    assert losses and all(np.isfinite(losses))


def test_reinforced_recipe_values():
    full = clip_reinforced.get_config()
    assert full.reinforced.real_clip_weight == 0.25 and full.reinforced.distill_weight == 0.75
    assert full.reinforced.teacher_embed_dim == 1536 and full.reinforced.num_teachers == 2
    assert full.reinforce.num_augmentations == 30
    assert full.reinforce.ensemble_order == ("openai", "datacomp")
    assert sorted(full.reinforce.teachers) == ["datacomp", "openai"]
    mobile = clip_reinforced.get_config("tower=mci1")
    assert mobile.reinforced.distill_weight == 1.0 and mobile.reinforced.real_clip_weight == 0.0
    assert mobile.model.image.module == "models.mobileclip.MobileClipImageTower"
    captions = clip_reinforced.get_config("weights=captions")
    assert captions.reinforced.distill_weight == 0.0
    with pytest.raises(ValueError, match="tower"):
        clip_reinforced.get_config("tower=vitl14")
    sigmoid = clip_reinforced.get_config()
    sigmoid.loss.name = "sigmoid"
    with pytest.raises(ValueError, match="'clip'"):
        ClipTask(sigmoid, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))


@pytest.mark.slow  # trains a tiny ResNet CLIP first (~1 min on 2 cores)
def test_a_batchnorm_clip_run_can_be_the_teacher(teacher_workdir, tmp_path):
    resnet_run = tmp_path / "resnet"
    trainer.train_and_evaluate(test_clip_towers.tiny_config("resnet"), str(resnet_run))
    config = tiny_reinforced_config.get_config(f"{teacher_workdir},{tmp_path / 'shards'}")
    config.reinforce.teachers.clip_runlocal.update(
        {"config": "", "workdir": str(resnet_run), "step": "latest"}
    )
    config.reinforce.samples_per_shard = 256
    manifest = reinforce.reinforce(config)
    assert manifest["written"] == 256 and manifest["embed_dim"] == 32
    task, params, model_state = restore_run_variables("", str(resnet_run), "latest")
    assert model_state is not None  # the running statistics are used, not fresh ones
    shards = clip_reinforced.shards_glob(str(tmp_path / "shards"))
    record = webdataset.WebDatasetSource(shards, read_reinforcements=True)[3]
    image = np.asarray(transforms.decode_to_pil(record["image_bytes"]))
    views = np.stack(
        [
            transforms.crop_and_resize(image, b, task.image_size)
            for b in record["augmentation_boxes"]
        ]
    )
    variables = {"params": params, "model_state": model_state}
    np.testing.assert_allclose(
        record["teacher_image_embeddings"], task.encode_images(variables, views), atol=2e-3
    )
