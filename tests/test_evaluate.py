"""Tests of pretrain/evaluate: zero-shot classification, image<->text retrieval, prompt data.

References are independent of the code under test: brute-force Python loops over sorted lists
(ties broken by lower index, the documented rule), hand-worked cases with known ranks, per-prompt
NumPy computations, and (in the torch environment) open_clip's own classifier builder and metadata.
Several cases use embeddings with entries +-1 in 16 dimensions: after L2 normalisation every entry
is +-1/4 and every cosine a multiple of 1/16, so all arithmetic is exact and ties are frequent and
identical in float32 and float64.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from torch_env import require_torch_env, run_torch_script

from pretrain.evaluate.imagenet_prompts import (
    IMAGENET_CLASSNAMES,
    KNOWN_DUPLICATE_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
)
from pretrain.evaluate.retrieval import (
    StreamingEmbedder,
    caption_tokens,
    evaluate_image_text,
    retrieval_metrics,
)
from pretrain.evaluate.zeroshot import (
    embed_in_batches,
    zero_shot_accuracy,
    zero_shot_classifier,
    zero_shot_logits,
)

CONTEXT_LENGTH = 77
EMBED_DIM = 16


# ----------------------------------------------------------------------------- stand-ins


def fake_tokenizer(texts: list[str]) -> np.ndarray:
    """Deterministic stand-in for ClipTokenizer: character codes, zero padded to 77."""
    tokens = np.zeros((len(texts), CONTEXT_LENGTH), np.int32)
    for row, text in enumerate(texts):
        codes = [ord(ch) % 997 + 1 for ch in text[:CONTEXT_LENGTH]]
        tokens[row, : len(codes)] = codes
    return tokens


class RecordingEncoder:
    """A row-wise nonlinear encoder that records the shape of every batch it is called with."""

    def __init__(self, weights: np.ndarray, scale: float):
        self.weights = weights
        self.scale = scale
        self.call_shapes: list[tuple[int, ...]] = []
        self.call_inputs: list[np.ndarray] = []

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        self.call_shapes.append(inputs.shape)
        self.call_inputs.append(np.array(inputs))
        flat = inputs.reshape(inputs.shape[0], -1).astype(np.float64) / self.scale
        return np.tanh(flat @ self.weights).astype(np.float32)


def text_encoder(seed: int = 0) -> RecordingEncoder:
    weights = np.random.default_rng(seed).normal(size=(CONTEXT_LENGTH, EMBED_DIM))
    return RecordingEncoder(weights, scale=500.0)


def image_encoder(pixels: int, seed: int = 1) -> RecordingEncoder:
    weights = np.random.default_rng(seed).normal(size=(pixels, EMBED_DIM)) / np.sqrt(pixels)
    return RecordingEncoder(weights, scale=255.0)


def plus_minus_one(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], size=(rows, EMBED_DIM)).astype(np.float32)


# ----------------------------------------------------------------------------- references


def stable_descending_order(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda index: (-scores[index], index))


def unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, np.float64)
    return vector / np.linalg.norm(vector)


def reference_topk_accuracy(image_embeds, labels, classifier, k: int) -> float:
    hits = 0
    for image, label in zip(image_embeds, labels):
        image = unit(image)
        scores = [100.0 * float(np.dot(image, row)) for row in np.asarray(classifier, np.float64)]
        hits += stable_descending_order(scores).index(int(label)) < k
    return hits / len(labels)


def reference_recalls(image_embeds, text_embeds, text_to_image, ks) -> dict[str, float]:
    images = [unit(v) for v in image_embeds]
    texts = [unit(v) for v in text_embeds]
    image_ranks = []
    for i, image in enumerate(images):
        order = stable_descending_order([float(np.dot(image, t)) for t in texts])
        image_ranks.append(min(order.index(j) for j in range(len(texts)) if text_to_image[j] == i))
    text_ranks = []
    for j, text in enumerate(texts):
        order = stable_descending_order([float(np.dot(image, text)) for image in images])
        text_ranks.append(order.index(int(text_to_image[j])))
    result = {}
    for k in ks:
        result[f"image_to_text_R@{k}"] = sum(r < k for r in image_ranks) / len(image_ranks)
        result[f"text_to_image_R@{k}"] = sum(r < k for r in text_ranks) / len(text_ranks)
    return result


def reference_classifier(encode_text, classnames, templates) -> np.ndarray:
    """open_clip's formula, one prompt at a time, no batching or padding."""
    rows = []
    for classname in classnames:
        per_template = []
        for template in templates:
            prompt = (
                template.format(classname) if isinstance(template, str) else template(classname)
            )
            embedding = np.asarray(encode_text(fake_tokenizer([prompt])), np.float64)[0]
            per_template.append(unit(embedding))
        rows.append(unit(np.mean(per_template, axis=0)))
    return np.stack(rows)


# ----------------------------------------------------------------------------- prompt data


def test_openai_templates_are_80_distinct_format_strings_with_one_slot():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    for template in OPENAI_IMAGENET_TEMPLATES:
        assert template.count("{}") == 1, template
        assert template.count("{") == 1 and template.count("}") == 1, template
        assert "tench" in template.format("tench")
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert OPENAI_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert set(SIMPLE_IMAGENET_TEMPLATES) <= set(OPENAI_IMAGENET_TEMPLATES)
    assert len(SIMPLE_IMAGENET_TEMPLATES) == 7


def test_imagenet_classnames_are_1000_with_only_the_known_openai_duplicates():
    assert len(IMAGENET_CLASSNAMES) == 1000
    assert all(name and name == name.strip() for name in IMAGENET_CLASSNAMES)
    assert IMAGENET_CLASSNAMES[0] == "tench"
    assert IMAGENET_CLASSNAMES[1] == "goldfish"
    assert IMAGENET_CLASSNAMES[999] == "toilet paper"
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(IMAGENET_CLASSNAMES):
        positions.setdefault(name, []).append(index)
    duplicates = {name: tuple(ids) for name, ids in positions.items() if len(ids) > 1}
    assert (
        duplicates
        == KNOWN_DUPLICATE_CLASSNAMES
        == {
            "missile": (657, 744),
            "sunglasses": (836, 837),
        }
    )
    assert len(set(IMAGENET_CLASSNAMES)) == 998


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    ("num_rows", "batch_size", "num_calls"), [(10, 4, 3), (3, 8, 1), (8, 4, 2)]
)
def test_embed_in_batches_uses_constant_batch_shape_and_drops_padding(
    num_rows, batch_size, num_calls
):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num_rows, 2, 2, 3), dtype=np.uint8)
    encoder = image_encoder(pixels=12)
    embeddings = embed_in_batches(encoder, images, batch_size)

    assert encoder.call_shapes == [(batch_size, 2, 2, 3)] * num_calls
    expected = np.stack([encoder(image[None])[0] for image in images])
    np.testing.assert_allclose(embeddings, expected, rtol=1e-6)
    assert embeddings.shape == (num_rows, EMBED_DIM) and embeddings.dtype == np.float32
    # The padding rows of the last call repeat the last real row.
    last_call = encoder.call_inputs[num_calls - 1]
    real_in_last = num_rows - (num_calls - 1) * batch_size
    for padding_row in last_call[real_in_last:]:
        np.testing.assert_array_equal(padding_row, images[-1])


def test_embed_in_batches_rejects_empty_inputs_and_wrong_encoder_output():
    with pytest.raises(ValueError, match="no inputs"):
        embed_in_batches(text_encoder(), np.zeros((0, CONTEXT_LENGTH), np.int32), 4)
    with pytest.raises(ValueError, match="encoder must map"):
        embed_in_batches(lambda x: np.zeros((2, 3)), np.zeros((5, 3)), 4)


def test_streaming_embedder_rebatches_uneven_batches():
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 999, size=(10, CONTEXT_LENGTH)).astype(np.int32)
    encoder = text_encoder()
    streaming = StreamingEmbedder(encoder, batch_size=4)
    for start, stop in [(0, 3), (3, 3), (3, 9), (9, 10)]:
        streaming.add(tokens[start:stop])
    embeddings = streaming.finish()
    assert encoder.call_shapes == [(4, CONTEXT_LENGTH)] * 3
    np.testing.assert_allclose(
        embeddings, np.stack([encoder(t[None])[0] for t in tokens]), rtol=1e-6
    )


# ----------------------------------------------------------------------------- zero-shot


def test_zero_shot_classifier_matches_per_prompt_numpy_average():
    classnames = ["cat", "dog", "sea otter", "tiger shark", "x"]
    templates = ["a photo of a {}.", "{}", "a blurry drawing of the {} at night."]
    encoder = text_encoder(seed=3)
    classifier = zero_shot_classifier(encoder, fake_tokenizer, classnames, templates, batch_size=7)

    # 15 prompts in batches of 7: two full calls and one padded call, always 7 rows.
    assert encoder.call_shapes == [(7, CONTEXT_LENGTH)] * 3
    expected = reference_classifier(text_encoder(seed=3), classnames, templates)
    assert classifier.shape == (5, EMBED_DIM) and classifier.dtype == np.float32
    np.testing.assert_allclose(classifier, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(classifier, axis=1), 1.0, rtol=1e-6)
    # Averaging normalised embeddings differs from normalising the plain average (a real check).
    plain = np.stack(
        [
            unit(np.mean([text_encoder(3)(fake_tokenizer([t.format(c)]))[0] for t in templates], 0))
            for c in classnames
        ]
    )
    assert np.abs(plain - expected).max() > 1e-4

    callable_templates = [lambda c, t=t: t.format(c) for t in templates]
    from_callables = zero_shot_classifier(
        encoder, fake_tokenizer, classnames, callable_templates, 4
    )
    np.testing.assert_allclose(from_callables, classifier, rtol=1e-5, atol=1e-6)


def test_zero_shot_accuracy_matches_brute_force_on_noisy_orthogonal_classes():
    rng = np.random.default_rng(2)
    num_classes, num_images = 12, 300
    class_vectors = np.linalg.qr(rng.normal(size=(EMBED_DIM, num_classes)))[0].T  # orthonormal rows
    labels = rng.integers(0, num_classes, size=num_images)
    images = 2.0 * class_vectors[labels] + rng.normal(scale=0.6, size=(num_images, EMBED_DIM))
    accuracy = zero_shot_accuracy(images, labels, class_vectors, topk=(1, 3, 5))
    for k in (1, 3, 5):
        assert accuracy[f"top{k}"] == reference_topk_accuracy(images, labels, class_vectors, k)
    assert 0.2 < accuracy["top1"] < 0.95 < accuracy["top5"]  # noisy enough to test ranking

    clean = zero_shot_accuracy(class_vectors[labels] * 3.0, labels, class_vectors)
    assert clean == {"top1": 1.0, "top5": 1.0}


def test_zero_shot_accuracy_ties_go_to_the_lower_class_id():
    classifier = np.eye(4, EMBED_DIM, dtype=np.float32)  # one-hot classes: exact cosines
    image = np.zeros(EMBED_DIM, np.float32)
    image[1] = image[3] = 1.0  # equally close to classes 1 and 3
    images = np.stack([image, image])
    accuracy = zero_shot_accuracy(images, np.array([1, 3]), classifier, topk=(1, 2))
    assert accuracy == {"top1": 0.5, "top2": 1.0}


def test_zero_shot_accuracy_matches_brute_force_with_many_exact_ties():
    rng = np.random.default_rng(3)
    classifier = plus_minus_one(rng, 9) / 4.0
    images = plus_minus_one(rng, 200)
    labels = rng.integers(0, 9, size=200)
    accuracy = zero_shot_accuracy(images, labels, classifier, topk=(1, 2, 5))
    for k in (1, 2, 5):
        assert accuracy[f"top{k}"] == reference_topk_accuracy(images, labels, classifier, k)


def test_zero_shot_logits_are_100_times_cosines():
    rng = np.random.default_rng(4)
    images = rng.normal(size=(5, EMBED_DIM))
    classifier = np.stack([unit(v) for v in rng.normal(size=(3, EMBED_DIM))])
    expected = 100.0 * np.stack([unit(v) for v in images]) @ classifier.T
    np.testing.assert_allclose(zero_shot_logits(images, classifier), expected, rtol=1e-5)


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_hand_worked_case_with_several_captions_and_a_tie():
    images = np.eye(3, dtype=np.float32)
    texts = np.array(
        [
            [1.0, 0.0, 0.0],  # caption of image 0: best image 0 (rank 0)
            [0.8, 0.6, 0.0],  # caption of image 1: image 0 scores 0.8 > 0.6 (rank 1)
            [0.6, 0.8, 0.0],  # caption of image 2: scores 0.6, 0.8, 0 (rank 2)
            [0.0, 0.6, 0.8],  # caption of image 2: best image 2 (rank 0)
        ],
        np.float32,
    )
    text_to_image = np.array([0, 1, 2, 2])
    # Image ranks: image 0 -> text 0 first (0). Image 1 scores texts (0, .6, .8, .6): text 2 is
    # above, text 3 ties with its caption text 1 but has the higher index (rank 1). Image 2 scores
    # (0, 0, 0, .8): its caption text 3 is first (rank 0).
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(1, 2, 3))
    assert metrics == {
        "image_to_text_R@1": 2 / 3,
        "image_to_text_R@2": 1.0,
        "image_to_text_R@3": 1.0,
        "text_to_image_R@1": 2 / 4,
        "text_to_image_R@2": 3 / 4,
        "text_to_image_R@3": 1.0,
    }
    assert metrics == reference_recalls(images, texts, text_to_image, ks=(1, 2, 3))


def test_retrieval_ties_between_identical_images_go_to_the_lower_index():
    images = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)  # images 0 and 1 equal
    texts = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    metrics = retrieval_metrics(images, texts, np.array([0, 1, 2]), ks=(1, 2))
    # Text 1 ties images 0 and 1 and loses to image 0; image 1 ties texts 0 and 1, loses to text 0.
    assert metrics["text_to_image_R@1"] == 2 / 3
    assert metrics["image_to_text_R@1"] == 2 / 3
    assert metrics["text_to_image_R@2"] == metrics["image_to_text_R@2"] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_quadratic_reference_with_many_exact_ties(seed):
    rng = np.random.default_rng(seed)
    num_images = 40
    captions_per_image = rng.integers(1, 5, size=num_images)
    text_to_image = np.repeat(np.arange(num_images), captions_per_image)
    text_to_image = text_to_image[rng.permutation(text_to_image.size)]  # captions in any order
    images = plus_minus_one(rng, num_images)
    # Captions are noisy copies of their image (3 flipped signs), so recall is neither 0 nor 1.
    texts = images[text_to_image].copy()
    for row in texts:
        row[rng.choice(EMBED_DIM, size=3, replace=False)] *= -1.0
    metrics = retrieval_metrics(images, texts, text_to_image)
    assert metrics == reference_recalls(images, texts, text_to_image, ks=(1, 5, 10))
    assert 0.0 < metrics["text_to_image_R@1"] < 1.0


def test_retrieval_matches_reference_on_gaussian_embeddings():
    rng = np.random.default_rng(5)
    images = rng.normal(size=(30, EMBED_DIM))
    text_to_image = np.concatenate([np.arange(30), rng.integers(0, 30, size=50)])
    texts = images[text_to_image] + rng.normal(scale=1.0, size=(80, EMBED_DIM))
    metrics = retrieval_metrics(images, texts, text_to_image)
    assert metrics == reference_recalls(images, texts, text_to_image, ks=(1, 5, 10))


def test_retrieval_rejects_images_without_captions():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(np.eye(3), np.eye(3)[:2], np.array([0, 0]))


# ----------------------------------------------------------------------------- one-pass evaluator


def caption_batches(rng: np.random.Generator):
    """Three batches (5, 3, 5 images) exercising every caption form of the input contract."""

    def images(n):
        return rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)

    def captions(n, i0):
        return [[f"image {i0 + i} caption {c}" for c in range(1 + (i0 + i) % 3)] for i in range(n)]

    first = {"image": images(5), "label": rng.integers(0, 6, size=5), "captions": captions(5, 0)}
    second_strings = captions(3, 5)
    second = {
        "image": images(3),
        "label": rng.integers(0, 6, size=3),
        "captions": [fake_tokenizer(strings) for strings in second_strings],  # token arrays
    }
    third = {
        "image": images(5),
        "label": rng.integers(0, 6, size=5),
        "captions": [f"only caption of image {8 + i}" for i in range(5)],  # one str per image
    }
    all_strings = [s for entry in first["captions"] + second_strings for s in entry]
    all_strings += third["captions"]
    counts = [len(entry) for entry in first["captions"] + second_strings] + [1] * 5
    return [first, second, third], all_strings, np.repeat(np.arange(13), counts)


def test_evaluate_image_text_equals_the_lower_level_functions_on_the_whole_set():
    rng = np.random.default_rng(6)
    batches, all_captions, text_to_image = caption_batches(rng)
    classnames = ["apple", "boat", "cloud", "dog", "eagle", "fern"]
    templates = ["a photo of a {}.", "the {}.", "art of the {}."]
    encode_image, encode_text = image_encoder(pixels=48), text_encoder()
    results = evaluate_image_text(
        encode_image, encode_text, fake_tokenizer, batches, classnames, templates, batch_size=4
    )

    # Every encoder call had exactly 4 rows: 13 images -> 4 calls; 18 + 5 captions and 18 prompts.
    assert set(encode_image.call_shapes) == {(4, 4, 4, 3)} and len(encode_image.call_shapes) == 4
    assert {shape[0] for shape in encode_text.call_shapes} == {4}

    direct_image, direct_text = image_encoder(pixels=48), text_encoder()
    image_embeds = direct_image(np.concatenate([b["image"] for b in batches]))
    text_embeds = direct_text(fake_tokenizer(all_captions))
    labels = np.concatenate([b["label"] for b in batches])
    classifier = reference_classifier(direct_text, classnames, templates)
    expected = {"num_images": 13.0, "num_texts": float(len(all_captions))}
    expected |= {
        "zeroshot_top1": reference_topk_accuracy(image_embeds, labels, classifier, 1),
        "zeroshot_top5": reference_topk_accuracy(image_embeds, labels, classifier, 5),
    }
    expected |= reference_recalls(image_embeds, text_embeds, text_to_image, ks=(1, 5, 10))
    assert results == pytest.approx(expected)
    assert sorted(results) == sorted(expected)


def test_evaluate_image_text_runs_only_the_evaluations_its_inputs_allow():
    rng = np.random.default_rng(7)
    batches, _, _ = caption_batches(rng)
    labels_only = [{"image": b["image"], "label": b["label"]} for b in batches]
    classnames = ["a", "b", "c", "d", "e", "f"]
    results = evaluate_image_text(
        image_encoder(48), text_encoder(), fake_tokenizer, labels_only, classnames, ["{}"], 4
    )
    assert sorted(results) == ["num_images", "zeroshot_top1", "zeroshot_top5"]

    # Retrieval only, captions already tokenised: no tokenizer needed.
    def one_caption_each(batch):
        tokens = fake_tokenizer([f"caption {i}" for i in range(len(batch["image"]))])
        return {"image": batch["image"], "captions": tokens[:, None]}  # (n, 1, 77)

    tokenised = [one_caption_each(b) for b in batches]
    results = evaluate_image_text(image_encoder(48), text_encoder(), None, tokenised, batch_size=4)
    assert results["num_texts"] == 13.0 and "zeroshot_top1" not in results
    assert "image_to_text_R@10" in results

    with pytest.raises(ValueError, match="every batch has 'captions' or none"):
        evaluate_image_text(
            image_encoder(48), text_encoder(), fake_tokenizer, [batches[0], labels_only[1]]
        )


def test_caption_tokens_keeps_image_order_across_caption_forms():
    entries = [["a", "b"], fake_tokenizer(["c"]), "d", np.array([b"e", b"f"], dtype=object)]
    tokens, counts = caption_tokens(entries, lambda texts: fake_tokenizer([str(t) for t in texts]))
    np.testing.assert_array_equal(counts, [2, 1, 1, 2])
    expected = fake_tokenizer(["a", "b", "c", "d", str(b"e"), str(b"f")])
    np.testing.assert_array_equal(tokens, expected)


# ----------------------------------------------------------------------------- open_clip parity

OPEN_CLIP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    out_dir = sys.argv[1]
    weights = torch.from_numpy(np.load(out_dir + "/weights.npy"))
    spec = json.load(open(out_dir + "/spec.json"))

    def tokenizer(texts):
        tokens = torch.zeros((len(texts), 77), dtype=torch.int64)
        for row, text in enumerate(texts):
            codes = [ord(ch) % 997 + 1 for ch in text[:77]]
            tokens[row, : len(codes)] = torch.tensor(codes)
        return tokens

    class FakeModel:
        def encode_text(self, tokens, normalize=False):
            features = torch.tanh(tokens.double() / 500.0 @ weights)
            return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    classifier = build_zero_shot_classifier(
        FakeModel(), tokenizer, spec["classnames"], spec["templates"], num_classes_per_batch=3
    )
    np.save(out_dir + "/classifier.npy", classifier.T.numpy())
    json.dump(
        {"templates": [t("{}") for t in OPENAI_IMAGENET_TEMPLATES],
         "classnames": list(IMAGENET_CLASSNAMES)},
        open(out_dir + "/metadata.json", "w"),
    )
    """
)


@pytest.mark.torch
def test_matches_open_clip_classifier_and_metadata(tmp_path):
    require_torch_env()
    classnames = list(IMAGENET_CLASSNAMES[:7])
    templates = list(OPENAI_IMAGENET_TEMPLATES[:5])
    encoder = text_encoder(seed=8)
    np.save(tmp_path / "weights.npy", encoder.weights)
    (tmp_path / "spec.json").write_text(
        json.dumps({"classnames": classnames, "templates": templates})
    )
    script = tmp_path / "open_clip_zero_shot.py"
    script.write_text(OPEN_CLIP_SCRIPT)
    run_torch_script(script, tmp_path)

    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert tuple(metadata["templates"]) == OPENAI_IMAGENET_TEMPLATES
    assert tuple(metadata["classnames"]) == IMAGENET_CLASSNAMES
    ours = zero_shot_classifier(encoder, fake_tokenizer, classnames, templates, batch_size=8)
    np.testing.assert_allclose(ours, np.load(tmp_path / "classifier.npy"), rtol=1e-5, atol=1e-6)
