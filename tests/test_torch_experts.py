"""The PyTorch pseudo-label experts (CLIPTeX) and their client: the instance -> semantic rule, the
depth and normals conventions (NumPy, no torch needed), NLL-AngMF's layout against its release,
and one server session on random weights written to disk (Mask R-CNN, a tiny DPT, NLL-AngMF on
a small EfficientNet) whose outputs are checked against the libraries' own."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from unittest import mock

import numpy as np
import pytest
from torch_env import REPO_ROOT, require_torch_packages, run_torch_script, torch_python
from torch_side.parity_files import read_results, write_inputs

from pretrain.pseudo_labels.torch_client import TorchExperts, segmentation_class_names

EXPERTS_DIR = REPO_ROOT / "pretrain" / "pseudo_labels" / "torch_experts"


def _load(name: str):
    """A NumPy-only module of the torch-side folder, imported by path (that folder is no
    package: its scripts run in the torch environment)."""
    spec = importlib.util.spec_from_file_location(
        f"torch_experts_{name}", EXPERTS_DIR / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


instances = _load("instances")
conventions = _load("conventions")


# --- the instance -> semantic rule -------------------------------------------------------------


def _box(top: int, left: int, bottom: int, right: int, probability: float = 0.9) -> np.ndarray:
    mask = np.zeros((6, 8), np.float32)
    mask[top:bottom, left:right] = probability
    return mask


def test_instance_rule_overlaps_thresholds_and_classes():
    # A big "dog" (id 18 -> class 17) under a small, lower-scoring "cup" (id 47 -> class 42);
    # a "person" (id 1) below the score threshold; an unused id (12) with a high score; a
    # "toothbrush" (id 90 -> class 80) whose mask is partly below the mask threshold.
    masks = np.stack(
        [
            _box(0, 0, 6, 5),
            _box(2, 2, 4, 4),
            _box(0, 6, 2, 8),
            _box(4, 6, 6, 8),
            np.concatenate([_box(0, 5, 6, 8)[:3], _box(0, 5, 6, 8, 0.4)[3:]]),
        ]
    )
    ids = np.array([18, 47, 1, 12, 90])
    scores = np.array([0.9, 0.6, 0.3, 0.99, 0.7])
    by_score = instances.semantic_from_instances(masks, ids, scores, overlap="score")
    expected = np.zeros((6, 8), np.int32)
    expected[:, :5] = 17  # the dog everywhere it is, the cup hidden under it
    expected[:3, 5:8] = 80  # the toothbrush where its mask is >= 0.5 (the person is dropped)
    np.testing.assert_array_equal(by_score, expected)
    assert by_score.dtype == np.int32

    by_size = instances.semantic_from_instances(masks, ids, scores, overlap="smaller")
    expected[2:4, 2:4] = 42  # the smaller cup drawn over the dog
    np.testing.assert_array_equal(by_size, expected)

    # Thresholds move with the config: the person at 0.25, nothing of the toothbrush at 0.95.
    loose = instances.semantic_from_instances(
        masks, ids, scores, score_threshold=0.25, mask_threshold=0.95
    )
    assert set(np.unique(loose)) == {0}
    loose = instances.semantic_from_instances(masks, ids, scores, score_threshold=0.25)
    assert (loose[:2, 6:8] == 80).all()  # the toothbrush (0.7) beats the person (0.3)
    assert (loose[:2, 5] == 80).all()


def test_instance_rule_ties_empty_and_errors():
    # Equal scores: the earlier instance wins; no instance: all background.
    masks = np.stack([_box(0, 0, 4, 4), _box(2, 2, 6, 6)])
    result = instances.semantic_from_instances(masks, np.array([1, 2]), np.array([0.8, 0.8]))
    assert result[3, 3] == 1 and result[5, 5] == 2
    empty = instances.semantic_from_instances(np.zeros((0, 5, 7)), np.zeros(0), np.zeros(0))
    assert empty.shape == (5, 7) and not empty.any()
    with pytest.raises(ValueError, match="overlap"):
        instances.semantic_from_instances(masks, np.array([1, 2]), np.ones(2), overlap="area")
    with pytest.raises(ValueError, match="differ"):
        instances.semantic_from_instances(masks, np.array([1]), np.ones(2))


def test_coco_classes_are_the_80_thing_categories_in_id_order():
    classes = instances.coco_category_to_class(np.array([0, 1, 11, 12, 13, 90, 91, -1]))
    np.testing.assert_array_equal(classes, [0, 1, 11, 0, 12, 80, 0, 0])
    assert len(instances.COCO_THING_NAMES) == 80 == instances.NUM_CLASSES - 1
    assert instances.COCO_THING_NAMES[11] == "stop sign"  # class 12 = COCO id 13
    names = segmentation_class_names()
    assert names[:3] == ("background", "person", "bicycle") and names[80] == "toothbrush"


# --- depth and normals conventions -------------------------------------------------------------


def test_relative_depth_has_median_one_and_marks_far_pixels_invalid():
    inverse = np.array([[4.0, 2.0, 1.0], [0.5, 0.004, -1.0], [np.nan, 8.0, 2.0]])
    depth = conventions.relative_depth(inverse, min_inverse_fraction=0.01)
    # Positive inverse depths: median 2 -> valid above 0.02 (0.004, -1 and NaN are invalid).
    valid = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 1]], bool)
    np.testing.assert_array_equal(depth > 0, valid)
    raw = 1.0 / inverse[valid]
    np.testing.assert_allclose(depth[valid], raw / np.median(raw), rtol=1e-6)
    assert np.median(depth[valid]) == pytest.approx(1.0)
    assert depth.dtype == np.float32
    assert not conventions.relative_depth(np.zeros((2, 2))).any()


def test_normals_convention_bae_to_camera_frame():
    # Bae et al.'s frame has x pointing left: a wall on the image's left seen from inside the
    # room faces right, (-1, 0, 0) for them, (1, 0, 0) for us; the floor (up) and a wall facing
    # the camera keep their y and z; a low-kappa pixel and a zero vector become invalid.
    bae = np.array(
        [[[-1.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0]], [[0.6, 0, 0.8], [1, 0, 0], [0, 0, 0]]]
    )
    kappa = np.array([[5.0, 5.0, 5.0], [5.0, 0.5, 5.0]])
    ours = conventions.camera_normals(bae, kappa, min_kappa=1.0)
    expected = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[-0.6, 0, 0.8], [0, 0, 0], [0, 0, 0]]])
    np.testing.assert_allclose(ours, expected, atol=1e-7)
    assert ours.dtype == np.float32


# --- the client without a torch environment ----------------------------------------------------


def test_missing_torch_interpreter_is_a_clear_error(tmp_path):
    config = {"depth": {"kind": "dpt", "weights": str(tmp_path)}}
    with pytest.raises(FileNotFoundError, match=r"bash launch/setup.sh --torch"):
        TorchExperts(config, python=str(tmp_path / "no-python"))
    with (
        mock.patch.dict(os.environ, {"TORCH_PYTHON": str(tmp_path / "none")}),
        pytest.raises(FileNotFoundError, match="none"),
    ):
        TorchExperts(config)
    with pytest.raises(ValueError, match="unknown experts config entries"):
        TorchExperts({"edges": {}}, python=str(tmp_path / "no-python"))


# --- NLL-AngMF against its release -------------------------------------------------------------


def _release_decoder_shapes(norm: str) -> dict[str, tuple[int, ...]]:
    """The released decoder's parameters (surface_normal_uncertainty, models/submodules/
    decoder.py, for the B5 encoder): conv2 2048 -> 2048; up1..up4 with skip inputs 2048 + 176,
    1024 + 64, 512 + 40, 256 + 24 -> 1024, 512, 256, 128; out_conv_res8 3x3 512 -> 4; the three
    MLPs (512 + 4, 256 + 4, 128 + 4) -> 128 -> 128 -> 128 -> 4 as Conv1d."""
    shapes: dict[str, tuple[int, ...]] = {"conv2.weight": (2048, 2048, 1, 1), "conv2.bias": (2048,)}
    ups = {"up1": (2224, 1024), "up2": (1088, 512), "up3": (552, 256), "up4": (280, 128)}
    for name, (inputs, outputs) in ups.items():
        for conv, norm_layer, conv_in in (("0", "1", inputs), ("3", "4", outputs)):
            shapes[f"{name}._net.{conv}.weight"] = (outputs, conv_in, 3, 3)
            shapes[f"{name}._net.{conv}.bias"] = (outputs,)
            shapes[f"{name}._net.{norm_layer}.weight"] = (outputs,)
            shapes[f"{name}._net.{norm_layer}.bias"] = (outputs,)
            if norm == "BN":
                shapes[f"{name}._net.{norm_layer}.running_mean"] = (outputs,)
                shapes[f"{name}._net.{norm_layer}.running_var"] = (outputs,)
                shapes[f"{name}._net.{norm_layer}.num_batches_tracked"] = ()
    shapes["out_conv_res8.weight"] = (4, 512, 3, 3)
    shapes["out_conv_res8.bias"] = (4,)
    for name, inputs in (("res4", 516), ("res2", 260), ("res1", 132)):
        for layer, (o, i) in zip("0246", ((128, inputs), (128, 128), (128, 128), (4, 128))):
            shapes[f"out_conv_{name}.{layer}.weight"] = (o, i, 1)
            shapes[f"out_conv_{name}.{layer}.bias"] = (o,)
    return shapes


# --- one server session on random weights ------------------------------------------------------

MASK_RCNN = {"min_size": 64, "max_size": 96, "max_instances": 8, "score_threshold": 0.0}


@pytest.fixture(scope="module")
def expert_files(tmp_path_factory):
    """Random weights for the three experts, the libraries' reference outputs on the test
    images, and NLL-AngMF's layout report (one torch-side process)."""
    require_torch_packages("torch", "torchvision", "timm", "transformers", "geffnet")
    folder = tmp_path_factory.mktemp("experts")
    rng = np.random.default_rng(0)
    # Three sizes: landscape, odd, portrait (each expert must answer at each image's own size).
    sizes = ((48, 64), (37, 51), (64, 40))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    write_inputs(folder, {f"image_{i}": image for i, image in enumerate(images)})
    (folder / "spec.json").write_text(json.dumps({"mask_rcnn": MASK_RCNN}))
    run_torch_script("make_experts.py", "weights", folder, "inspect", folder, timeout=600)
    report, reference = read_results(folder)
    return folder, images, report, reference


@pytest.fixture(scope="module")
def session(expert_files):
    """The server on those weights, with one predict() of the three images. The DPT path is
    relative: it resolves against the working directory of the process that starts the server."""
    folder, images, _, _ = expert_files
    config = {
        "segmentation": {
            "kind": "mask_rcnn",
            "weights": str(folder / "mask_rcnn.pth"),
            "overlap": "smaller",
            **MASK_RCNN,
        },
        "depth": {"kind": "dpt", "weights": "dpt"},
        "normals": {
            "kind": "nll_angmf",
            "weights": str(folder / "nll_angmf.pt"),
            "encoder": "tf_efficientnet_b0",
            "decoder_width": 64,
            "input_size": [64, 64],
        },
        "device": "cpu",
    }
    # One torch thread: tests share 2 cores, where torch's thread pool spins.
    experts = TorchExperts(config, python=str(torch_python()))
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}), contextlib.chdir(folder):
        experts.__enter__()
    try:
        yield experts, experts.predict(images)
    finally:
        experts.close()


@pytest.mark.torch
def test_nll_angmf_matches_the_released_layout(expert_files):
    _, _, report, _ = expert_files
    for norm in ("BN", "GN"):
        ours = {k: tuple(v) for k, v in report[norm]["decoder_shapes"].items()}
        assert ours == _release_decoder_shapes(norm), norm
    # The encoder: timm's tf_efficientnet_b5_ap has gen-efficientnet's keys and shapes (the
    # release's encoder came from gen-efficientnet; it drops the classifier).
    assert report["encoder_shapes"] == report["geffnet_shapes"]
    assert len(report["encoder_shapes"]) > 800
    # The skips are the release's features 4, 5, 6, 8, 11 of gen-efficientnet, exactly.
    assert report["skip_parity_max_abs"] < 1e-6
    assert report["BN"]["encoder_parameters"] == 28_340_784
    assert report["gn_output_shape"] == [1, 4, 64, 64]
    assert report["gn_normal_length_error"] < 1e-5 and report["gn_min_kappa"] > 0.01
    # The DPT loader is strict but for the unreachable weights Intel's checkpoints lack (the
    # test's DPT lacks them too and loads in the server session).
    assert "missing_keys" in report["dpt_broken_error"]
    assert "head.head.0.weight" in report["dpt_broken_error"]
    # The 80 classes against torchvision's 91 COCO categories ("N/A" = an unused id).
    unused = ("__background__", "N/A")
    things = [(i, n) for i, n in enumerate(report["coco_categories"]) if n not in unused]
    assert tuple(i for i, _ in things) == instances.COCO_THING_IDS
    assert tuple(n for _, n in things) == instances.COCO_THING_NAMES


@pytest.mark.torch
def test_server_outputs_at_each_image_size(expert_files, session):
    _, images, _, reference = expert_files
    experts, labels = session
    assert experts.targets == ("segmentation", "depth", "normals")
    assert len(labels) == len(images)
    for index, (image, label) in enumerate(zip(images, labels)):
        size = image.shape[:2]
        assert set(label) == set(experts.targets)
        segmentation, depth, normals = label["segmentation"], label["depth"], label["normals"]
        assert segmentation.shape == size and segmentation.dtype == np.int32
        assert depth.shape == size and depth.dtype == np.float32
        assert normals.shape == (*size, 3) and normals.dtype == np.float32

        # Segmentation: the rule applied to torchvision's own detections of the same batch.
        expected = instances.semantic_from_instances(
            reference[f"mask_rcnn_masks_{index}"],
            reference[f"mask_rcnn_labels_{index}"],
            reference[f"mask_rcnn_scores_{index}"],
            score_threshold=0.0,
            overlap="smaller",
        )
        np.testing.assert_array_equal(segmentation, expected)
        assert segmentation.min() >= 0 and segmentation.max() <= 80
        assert segmentation.any()  # random detections kept at score threshold 0

        # Depth: transformers' processor + post-processing, then the relative-depth rule.
        expected = conventions.relative_depth(reference[f"dpt_inverse_{index}"])
        np.testing.assert_allclose(depth, expected, rtol=1e-4, atol=1e-5)
        valid = depth > 0
        assert valid.mean() > 0.5 and (depth >= 0).all()
        assert np.median(depth[valid]) == pytest.approx(1.0, abs=1e-5)

        # Normals: unit vectors everywhere (min_kappa 0).
        np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)


@pytest.mark.torch
def test_bad_requests_keep_the_server_alive(expert_files, session):
    _, images, _, _ = expert_files
    experts, _ = session
    process = experts._process
    for line in (b"not json\n", b'{"input": "/nonexistent.npz", "output": "/tmp/x.npz"}\n'):
        process.stdin.write(line)
        process.stdin.flush()
        reply = experts._reply(60, "answering a bad request")
        assert reply["ok"] is False and reply["error"]
    with pytest.raises(ValueError, match="uint8"):
        experts.predict([images[0].astype(np.float32)])
    again = experts.predict(images[:1])
    np.testing.assert_array_equal(again[0]["segmentation"].shape, images[0].shape[:2])
    assert process.poll() is None


def test_server_crash_carries_its_stderr():
    # The JAX environment's interpreter has no torch: the server dies on its imports, and the
    # client's error says so in the server's own words.
    config = {"normals": {"kind": "nll_angmf", "weights": "unused.pt"}}
    experts = TorchExperts(config, python=sys.executable)
    with pytest.raises(RuntimeError, match="exited with status 1 while starting") as failure:
        experts.__enter__()
    assert "No module named 'torch'" in str(failure.value)
    assert experts._process is None  # cleaned up


@pytest.mark.torch
def test_pseudo_label_tool_with_the_torch_experts(expert_files, tmp_path):
    """The pseudo-label tool drives the torch experts end to end: 4 tiny scenes labelled by the
    three random-weight experts, stored and read back as CLIPTeX's training reads them."""
    import tiny_cliptex_config
    from ml_collections import ConfigDict

    from pretrain import pseudo_label
    from pretrain.data import image_text
    from pretrain.data.dense import layout
    from pretrain.data.dense import targets as dense_targets

    folder, _, _, _ = expert_files
    config = tiny_cliptex_config.get_config(f",{tmp_path / 'labelled'}")
    config.pseudo_label.source.split = "train[:4]"
    config.pseudo_label.samples_per_shard = 2
    config.pseudo_label.torch_python = str(torch_python())
    config.pseudo_label.experts = ConfigDict(
        {
            "segmentation": {
                "kind": "mask_rcnn",
                "weights": str(folder / "mask_rcnn.pth"),
                **MASK_RCNN,
            },
            "depth": {"kind": "dpt", "weights": str(folder / "dpt")},
            "normals": {
                "kind": "nll_angmf",
                "weights": str(folder / "nll_angmf.pt"),
                "encoder": "tf_efficientnet_b0",
                "decoder_width": 64,
                "input_size": [64, 64],
            },
        }
    )
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
        manifest = pseudo_label.pseudo_label(config)
    assert manifest["written"] == 4 and manifest["num_shards"] == 2
    assert set(manifest["labelled"]) == {"segmentation", "depth", "normals"}
    source = image_text.make_source(
        {"source": "webdataset", "shards": str(tmp_path / "labelled" / "pseudo-*.tar")},
        read_members=layout.LABEL_MEMBERS,
    )
    for index in range(len(source)):
        record = source[index]
        for target, count in manifest["labelled"].items():
            if count == 4:  # every sample has this target's member
                label = dense_targets.read_target(record, target)
                assert label.shape[:2] == (32, 32)
