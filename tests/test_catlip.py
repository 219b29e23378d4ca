"""CatLIP end to end on the tiny scenes: multi-hot labels from the data workers, a sharded BCE
step, a tiny run with Transfer-Init evaluation and timm export, and the transfer task (linear
probe with a frozen tower and a Transfer-Init head; fine-tuning)."""

import csv
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_catlip_config
import tiny_transfer_config
from wordnet_env import require_wordnet

from pretrain import modes, sharding, trainer
from pretrain.components import transfer_init
from pretrain.data import pipeline
from pretrain.data.examples import Plugins
from pretrain.data.scenes import builder
from pretrain.data.synsets.labels import CaptionLabeler
from pretrain.tasks import catlip, classify


@pytest.fixture(scope="module", autouse=True)
def wordnet_present():
    require_wordnet()


def read_metrics(path):
    values = {}
    with path.open() as file:
        for row in csv.DictReader(file):
            values.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    return values


@pytest.fixture(scope="module")
def catlip_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("catlip")
    vocab = workdir / "vocab.tsv"
    config = tiny_catlip_config.get_config(str(vocab))
    trainer.train_and_evaluate(config, str(workdir))
    return workdir


def test_label_metrics_by_hand():
    logits = jnp.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    labels = jnp.array([[1, 0, 1], [1, 0, 0], [0, 0, 0]], jnp.uint8)
    metrics = catlip.label_metrics(logits, labels)
    np.testing.assert_allclose(metrics["labels_per_image"], 1.0)
    np.testing.assert_allclose(metrics["images_without_labels"], 1 / 3)
    # Image 0's top class (0) is a positive, image 1's (1) is not; image 2 has no labels.
    np.testing.assert_allclose(metrics["precision_at_1"], 0.5)


def test_multi_hot_labels_come_from_one_of_the_records_captions():
    vocabulary = ["n14514039", "n2084071", "n4962784"]  # sphere.n.01, dog.n.01, red.n.01
    labeler = CaptionLabeler(vocabulary)
    fields = pickle.loads(pickle.dumps(catlip.MultiHotLabels(vocabulary)))
    source = builder.data_source("train", "tiny")
    dataset = pipeline.image_text_dataset(
        source,
        batch_size_per_process=8,
        seed=3,
        train=True,
        image_size=32,
        tokenizer=None,
        plugins=Plugins(caption_fields=fields),
    )
    batch = next(iter(dataset))
    assert batch["labels"].shape == (8, 3) and batch["labels"].dtype == np.uint8
    for row, index in zip(batch["labels"], batch["index"]):
        captions = [c.decode() if isinstance(c, bytes) else c for c in source[index]["captions"]]
        candidates = [labeler.multi_hot(caption) for caption in captions]
        assert any(np.array_equal(row, c) for c in candidates)


def test_tiny_catlip_run_trains_evaluates_and_exports(catlip_workdir):
    metrics = read_metrics(catlip_workdir / "metrics.csv")
    losses = metrics["train/loss"]
    assert losses[8] < losses[2], losses  # BCE falls
    assert "eval/scenes/transfer_init_top1" in metrics
    assert metrics["train/labels_per_image"][8] > 1  # the captions' nouns are in the vocabulary
    config = tiny_catlip_config.get_config(str(catlip_workdir / "vocab.tsv"))
    out = catlip_workdir / "export"
    modes.export_checkpoint(config, str(catlip_workdir), str(out))
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "vocabulary.tsv",
    ]


def test_catlip_step_compiles_with_the_classifier_split_over_the_model_axis(catlip_workdir):
    config = tiny_catlip_config.get_config(str(catlip_workdir / "vocab.tsv"))
    config.mesh.update({"data": 2, "fsdp": 2, "model": 2})
    report = modes.compile_train_step(config)
    assert report["gflop_per_step"] > 0


def test_linear_probe_freezes_the_tower_and_starts_from_transfer_init(catlip_workdir, tmp_path):
    config = tiny_transfer_config.get_config(f"{catlip_workdir},mode=linear_probe")
    trainer.train_and_evaluate(config, str(tmp_path))
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert 0 in metrics["eval/scenes/top1"] and 6 in metrics["eval/scenes/top1"]

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    catlip_config = tiny_catlip_config.get_config(str(catlip_workdir / "vocab.tsv"))
    catlip_task, catlip_state = modes.restore_trained(catlip_config, str(catlip_workdir))
    _, state = modes.restore_trained(config, str(tmp_path), "latest")
    # The frozen tower is the CatLIP run's (EMA off in the tiny run: its parameters).
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(state["frozen"]["image_encoder"]),
        jax.device_get(catlip_state["params"]["image_encoder"]),
    )
    # The initial head: "red sphere" is composed of the vocabulary's red and sphere columns.
    task = classify.Task(config, mesh)
    head = task.transfer_head()
    vocabulary = catlip_task.synset_ids
    matches = transfer_init.match_classes(task.classnames, vocabulary)
    kernel = np.asarray(jax.device_get(catlip_state["params"]["classifier"]["kernel"]))
    red_sphere = task.classnames.index("red sphere")
    match = matches[red_sphere]
    assert match.kind in ("composed", "exact", "similar"), match
    expected = sum(w * kernel[:, r] for r, w in zip(match.rows, match.weights))
    np.testing.assert_allclose(head["kernel"][:, red_sphere], expected, rtol=1e-6)


def test_fine_tuning_trains_the_tower_and_exports_to_timm(catlip_workdir, tmp_path):
    config = tiny_transfer_config.get_config(f"{catlip_workdir},mode=finetune,head_init=random")
    trainer.train_and_evaluate(config, str(tmp_path))
    catlip_config = tiny_catlip_config.get_config(str(catlip_workdir / "vocab.tsv"))
    _, catlip_state = modes.restore_trained(catlip_config, str(catlip_workdir))
    _, state = modes.restore_trained(config, str(tmp_path), "latest")
    before = jax.device_get(catlip_state["params"]["image_encoder"])
    after = jax.device_get(state["params"]["image_encoder"])
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
    assert any(changed)
    out = tmp_path / "timm"
    modes.export_checkpoint(config, str(tmp_path), str(out))
    assert (out / "model.safetensors").exists() and (out / "classnames.txt").exists()


def test_full_catlip_recipe_compiles_one_sharded_step_on_8_devices(tmp_path):
    """`--mode=compile` of configs/catlip_vitb16.py (ViT-B/16, the paper's 24,320-synset
    classifier) with a reduced batch on a fsdp=4 x model=2 mesh: no data or weights needed."""
    from compile_recipe import compile_recipe

    from pretrain.data.synsets import vocabulary

    vocab = tmp_path / "vocab.tsv"
    entries = [vocabulary.VocabEntry(f"n{i + 1}", f"s{i}", 600) for i in range(24_320)]
    vocabulary.write_vocabulary(vocab, entries)
    log = compile_recipe(
        "configs/catlip_vitb16.py",
        tmp_path / "run",
        f"--config.vocab.path={vocab}",
        "--config.batch_size=8",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=4",
        "--config.mesh.model=2",
    )
    # ViT-B/16 without projection (85.8M) + the 768 x 24,320 classifier with its bias (18.7M).
    assert "compile: parameters = 1.04" in log, log[-2000:]
