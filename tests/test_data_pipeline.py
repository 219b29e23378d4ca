"""Tests of the image-text data pipeline: tar-shard source, image transforms, grain pipeline."""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import tarfile
from concurrent import futures

import numpy as np
import pytest
from PIL import Image

from pretrain.data import pipeline, transforms, webdataset
from pretrain.data.examples import Augmentation
from pretrain.data.webdataset import shard_index
from pretrain.data.webdataset.shards import expand_braces, resolve_shards
from pretrain.data.webdataset.tar import CorruptShardError, iter_tar_members

IMAGE_SIZE = 16
CONTEXT = 77


class ByteTokenizer:
    """Stand-in tokenizer with the ClipTokenizer contract: UTF-8 bytes + 1, zero padded."""

    def __init__(self, context_length: int = CONTEXT):
        self.context_length = context_length

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = np.zeros((len(texts), self.context_length), np.int32)
        for row, text in enumerate(texts):
            ids = np.frombuffer(text.encode("utf-8"), np.uint8)[: self.context_length] + 1
            tokens[row, : len(ids)] = ids
        return tokens


def _decoded(data, **options) -> np.ndarray:
    """The RGB array the pipeline decodes ``data`` to."""
    return np.asarray(transforms.decode_to_pil(data, **options))


def _detokenize(tokens: np.ndarray) -> str:
    return bytes((tokens[tokens > 0] - 1).astype(np.uint8)).decode("utf-8")


# ----------------------------------------------------------------------------- test data


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    return np.clip(base + rng.integers(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _jpeg(height: int, width: int, seed: int) -> bytes:
    return _encode(Image.fromarray(_picture(height, width, seed)), "JPEG", quality=90)


def _png(height: int, width: int, seed: int, mode: str = "RGB") -> bytes:
    return _encode(Image.fromarray(_picture(height, width, seed)).convert(mode), "PNG")


CORRUPT_JPEG, EMPTY_CAPTION, MISSING_IMAGE, GARBAGE_PNG = 4, 9, 13, 17
BAD = (CORRUPT_JPEG, EMPTY_CAPTION, MISSING_IMAGE, GARBAGE_PNG)
NUM_SAMPLES = 24
GOOD = [i for i in range(NUM_SAMPLES) if i not in BAD]


def _samples() -> list[dict]:
    """24 samples in the layouts the source supports, four of them bad."""
    samples = []
    for i in range(NUM_SAMPLES):
        height, width = 40 + 4 * (i % 5), 56 - 3 * (i % 4)
        sample: dict = {"json": {"uid": f"u{i}", "width": width}}
        if i % 3 == 0:
            sample["png"] = _png(height, width, i, mode=("L", "RGBA", "P", "RGB")[i % 4])
        else:
            sample["jpg"] = _jpeg(height, width, i)
        if i % 4 == 0:  # several captions, one per line
            sample["txt"] = f"first caption {i}\n\nsecond caption {i}\nthird caption {i}\n"
        elif i % 4 == 1:  # img2dataset: the same caption in txt and json
            sample["txt"] = f"only caption {i}"
            sample["json"]["caption"] = f"only caption {i}"
        elif i % 4 == 2:  # captions only in a JSON list
            sample["json"]["captions"] = [f"json caption {i}", f"other json caption {i}"]
        else:
            sample["txt"] = f"  padded caption {i}  "
        samples.append(sample)
    samples[CORRUPT_JPEG]["jpg"] = samples[CORRUPT_JPEG]["jpg"][:300]  # truncated
    samples[EMPTY_CAPTION]["txt"] = "   \n \t \n"
    samples[EMPTY_CAPTION]["json"].pop("caption", None)
    del samples[MISSING_IMAGE]["jpg"]
    samples[GARBAGE_PNG] = {"png": b"this is not an image", "txt": "garbage"}
    return samples


EXPECTED_CAPTIONS = {
    0: ["first caption 0", "second caption 0", "third caption 0"],
    1: ["only caption 1"],
    2: ["json caption 2", "other json caption 2"],
    3: ["padded caption 3"],
}


def _expected_captions(i: int) -> list[str]:
    if i == EMPTY_CAPTION:
        return []
    if i == GARBAGE_PNG:
        return ["garbage"]
    return [c.replace(str(i % 4), str(i)) for c in EXPECTED_CAPTIONS[i % 4]]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    paths = webdataset.write_shards(_samples(), str(directory / "shard-%05d.tar"), 5)
    assert [os.path.basename(p) for p in paths] == [f"shard-{n:05d}.tar" for n in range(5)]
    return directory


@pytest.fixture(scope="module")
def source(shard_dir):
    return webdataset.WebDatasetSource(str(shard_dir / "shard-{00000..00004}.tar"))


def _all_batches(dataset, limit: int = 1000) -> list[dict]:
    iterator = iter(dataset)
    batches = [batch for _, batch in zip(range(limit), iterator)]
    return batches


def _valid_indices(batches) -> list[int]:
    return [int(i) for b in batches for i in b["index"][b["valid"]]]


def _dataset(source, **overrides):
    arguments = dict(
        batch_size_per_process=4,
        seed=0,
        train=True,
        image_size=IMAGE_SIZE,
        tokenizer=ByteTokenizer(),
    )
    arguments.update(overrides)
    return pipeline.image_text_dataset(source, **arguments)


# ----------------------------------------------------------------------------- webdataset


def test_resolve_shards_expands_braces_globs_and_lists(shard_dir):
    expected = [str(shard_dir / f"shard-{n:05d}.tar") for n in range(5)]
    assert resolve_shards(str(shard_dir / "shard-{00000..00004}.tar")) == expected
    assert resolve_shards(str(shard_dir / "shard-*.tar")) == expected
    assert resolve_shards([expected[1], expected[0]]) == [expected[1], expected[0]]
    assert expand_braces("a{1..3}{x,y}") == ["a1x", "a1y", "a2x", "a2y", "a3x", "a3y"]
    assert expand_braces("s{08..10}.tar") == ["s08.tar", "s09.tar", "s10.tar"]
    with pytest.raises(FileNotFoundError):
        resolve_shards(str(shard_dir / "nothing-*.tar"))


def test_header_scan_matches_python_tarfile(tmp_path):
    long_key = "deep/" + "k" * 130  # longer than the 100-byte ustar name field
    webdataset.write_shards(
        [{"__key__": long_key, "txt": "x" * 700, "jpg": b"\xff" * 3}], str(tmp_path / "p-%d.tar"), 1
    )
    gnu_path = tmp_path / "gnu.tar"
    with tarfile.open(gnu_path, "w", format=tarfile.GNU_FORMAT) as tar:
        directory = tarfile.TarInfo("folder")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, payload in [("folder/" + "n" * 150 + ".txt", b"hello"), ("a.json", b"{}" * 400)]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    for path in (tmp_path / "p-0.tar", gnu_path):
        with tarfile.open(path) as tar:
            reference = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        assert list(iter_tar_members(str(path))) == reference
    source = webdataset.WebDatasetSource(str(tmp_path / "p-0.tar"))
    assert source[0]["key"] == long_key
    assert source[0]["image_bytes"] == b"\xff" * 3
    with pytest.raises(CorruptShardError):
        (tmp_path / "not.tar").write_bytes(b"x" * 2048)
        list(iter_tar_members(str(tmp_path / "not.tar")))


def test_source_reads_back_what_was_written(source):
    samples = _samples()
    assert len(source) == NUM_SAMPLES
    for i, sample in enumerate(samples):
        record = source[i]
        assert set(record) == {"key", "image_bytes", "captions", "metadata"}
        assert record["key"] == f"{i:09d}"
        assert record["image_bytes"] == sample.get("jpg", sample.get("png"))
        assert record["captions"] == _expected_captions(i)
        assert record["metadata"] == sample.get("json", {})
    assert source[-1]["key"] == source[NUM_SAMPLES - 1]["key"]
    with pytest.raises(IndexError):
        source[NUM_SAMPLES]


def test_txt_single_mode_and_json_fields(tmp_path):
    webdataset.write_shards(
        [{"txt": "line one\nline two", "json": {"recap": ["long caption"], "caption": "c"}}],
        str(tmp_path / "m-%d.tar"),
        1,
    )
    single = webdataset.WebDatasetSource(
        str(tmp_path / "m-0.tar"), txt_captions="single", json_caption_fields=("recap",)
    )
    assert single[0]["captions"] == ["line one\nline two", "long caption"]
    assert single[0]["image_bytes"] is None


def test_index_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    samples = _samples()
    paths = webdataset.write_shards(samples[:6], str(tmp_path / "c-%d.tar"), 3)
    cache = tmp_path / "cache"
    first = webdataset.WebDatasetSource(paths, index_cache_dir=str(cache))
    assert len(list(cache.glob("*.index.npz"))) == 2

    scanned = []
    real_index_shard = shard_index.index_shard
    monkeypatch.setattr(
        shard_index,
        "index_shard",
        lambda path, **kw: scanned.append(path) or real_index_shard(path, **kw),
    )
    cached = webdataset.WebDatasetSource(paths, index_cache_dir=str(cache))
    assert scanned == []
    assert [cached[i] for i in range(6)] == [first[i] for i in range(6)]

    # Replacing a shard (new size and mtime) invalidates its cached index, and only its.
    replacement = webdataset.write_shards(samples[7:9], str(tmp_path / "new-%d.tar"), 2)
    os.replace(replacement[0], paths[0])
    rebuilt = webdataset.WebDatasetSource(paths, index_cache_dir=str(cache))
    assert scanned == [paths[0]]
    assert len(rebuilt) == 5
    assert rebuilt[0]["image_bytes"] == samples[7]["jpg"]

    webdataset.WebDatasetSource(paths, cache_index_next_to_shards=True)
    assert all(os.path.exists(f"{path}.index.npz") for path in paths)


def test_source_pickles_and_reads_concurrently(source):
    # Two open files at most: descriptors are evicted while other threads read.
    small = webdataset.WebDatasetSource(source.shards, max_open_files=2)
    small[0]  # opens a descriptor, which must not travel with the pickle
    clone = pickle.loads(pickle.dumps(small))
    expected = [source[i]["image_bytes"] for i in range(NUM_SAMPLES)]
    order = list(range(NUM_SAMPLES)) * 8
    with futures.ThreadPoolExecutor(8) as pool:
        read = list(pool.map(lambda i: clone[i]["image_bytes"], order))
    assert read == [expected[i] for i in order]
    clone.close()


# ----------------------------------------------------------------------------- transforms


def test_decode_image_colour_modes_match_pil_rgb():
    picture = _picture(20, 30, 0)
    rgb = Image.fromarray(picture)
    grey = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    cmyk_jpeg = _encode(rgb.convert("CMYK"), "JPEG", quality=95)
    for encoded, reference in [
        (_encode(grey, "PNG"), np.repeat(np.asarray(grey)[..., None], 3, 2)),
        (_encode(rgba, "PNG"), picture),  # alpha dropped, like PIL's convert('RGB')
        (_encode(palette, "PNG"), np.asarray(palette.convert("RGBA"))[..., :3]),
        (cmyk_jpeg, np.asarray(Image.open(io.BytesIO(cmyk_jpeg)).convert("RGB"))),
        (_encode(rgb, "WEBP", lossless=True), picture),
    ]:
        decoded = _decoded(encoded)
        assert decoded.dtype == np.uint8 and decoded.shape == (20, 30, 3)
        np.testing.assert_array_equal(decoded, reference)

    sixteen_bit = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    decoded = _decoded(_encode(Image.fromarray(sixteen_bit), "PNG"))
    np.testing.assert_array_equal(decoded[..., 0], np.rint(sixteen_bit / 257.0).astype(np.uint8))

    np.testing.assert_array_equal(_decoded(picture), picture)
    np.testing.assert_array_equal(_decoded(picture[..., 0]), np.repeat(picture[..., :1], 3, 2))
    with_alpha = np.concatenate([picture, np.zeros((20, 30, 1), np.uint8)], -1)
    np.testing.assert_array_equal(_decoded(with_alpha), picture)


@pytest.mark.parametrize(
    "data",
    [
        _jpeg(64, 64, 0)[:200],
        b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
        b"garbage bytes",
        b"",
        np.zeros((0, 5, 3), np.uint8),
    ],
    ids=["truncated_jpeg", "broken_png", "garbage", "empty", "empty_array"],
)
def test_decode_image_raises_corrupt_image_error(data):
    with pytest.raises(transforms.CorruptImageError):
        _decoded(data)


def test_reduced_scale_jpeg_decoding_keeps_min_side():
    encoded = _jpeg(600, 800, 1)
    assert _decoded(encoded).shape == (600, 800, 3)
    # min(800 // 100, 600 // 100) = 6: the largest DCT scale not above it is 1/4.
    assert _decoded(encoded, min_side=100).shape == (150, 200, 3)
    assert _decoded(encoded, min_side=400).shape == (600, 800, 3)
    assert _decoded(_png(600, 800, 1), min_side=100).shape == (600, 800, 3)
    # The bound used in training: every crop keeps at least `size` pixels per side.
    size, scale, ratio = 64, (0.9, 1.0), (0.75, 4 / 3)
    side = transforms.crop_min_side(size, scale, ratio)
    assert side == math.ceil(64 / math.sqrt(0.9 * 0.75))
    rng = np.random.default_rng(0)
    for height, width in [(side, side), (side, 3 * side), (4 * side, side)]:
        for _ in range(300):
            _, _, crop_height, crop_width = transforms.sample_crop_box(
                height, width, rng, scale, ratio
            )
            assert min(crop_height, crop_width) >= size - 1  # -1: rounding of the box sides


@pytest.mark.parametrize(
    "height,width,scale,ratio",
    [
        (300, 400, (0.9, 1.0), (0.75, 4 / 3)),
        (400, 300, (0.9, 1.0), (0.75, 4 / 3)),
        (500, 500, (0.08, 1.0), (0.75, 4 / 3)),
        (480, 640, (0.3, 0.6), (0.5, 2.0)),
    ],
)
def test_crop_boxes_respect_scale_and_ratio(height, width, scale, ratio):
    rng = np.random.default_rng(0)
    boxes = np.array(
        [transforms.sample_crop_box(height, width, rng, scale, ratio) for _ in range(3000)]
    )
    top, left, crop_height, crop_width = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_height <= height).all() and (left + crop_width <= width).all()
    fallback = (crop_height == height) & (crop_width == width) & (top == 0) & (left == 0)
    sampled = ~fallback
    area_fraction = crop_height * crop_width / (height * width)
    aspect = crop_width / crop_height
    # Sides are rounded to whole pixels: allow one pixel of slack on each side.
    slack = 1.0 / crop_height + 1.0 / crop_width
    assert (area_fraction[sampled] >= scale[0] * (1 - slack[sampled]) - 1e-9).all()
    assert (area_fraction[sampled] <= scale[1] * (1 + slack[sampled]) + 1e-9).all()
    assert (aspect[sampled] >= ratio[0] * (1 - slack[sampled])).all()
    assert (aspect[sampled] <= ratio[1] * (1 + slack[sampled])).all()
    assert sampled.mean() > 0.5


def _ks_distance_to_uniform(values: np.ndarray, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between the sample and U(low, high)."""
    ordered = np.sort((values - low) / (high - low))
    n = len(ordered)
    return float(max(np.max(np.arange(1, n + 1) / n - ordered), np.max(ordered - np.arange(n) / n)))


def test_crop_box_distribution_area_uniform_ratio_log_uniform():
    # On a 1000x1000 image every box with area fraction <= 0.5 and ratio in [1/2, 2] fits, so the
    # first try is always accepted and the draws follow the sampling laws exactly (up to rounding).
    rng = np.random.default_rng(1)
    boxes = np.array(
        [transforms.sample_crop_box(1000, 1000, rng, (0.1, 0.5), (0.5, 2.0)) for _ in range(4000)]
    )
    top, left, crop_height, crop_width = boxes.T.astype(float)
    limit = 1.63 / math.sqrt(len(boxes)) + 0.01  # KS at the 1% level, plus pixel rounding
    area_fraction = crop_height * crop_width / 1e6
    assert _ks_distance_to_uniform(area_fraction, 0.1, 0.5) < limit
    log_aspect = np.log(crop_width / crop_height)
    assert _ks_distance_to_uniform(log_aspect, math.log(0.5), math.log(2.0)) < limit
    # Positions are uniform over the free range.
    assert _ks_distance_to_uniform(top / (1000 - crop_height), 0.0, 1.0) < limit + 0.01
    assert _ks_distance_to_uniform(left / (1000 - crop_width), 0.0, 1.0) < limit + 0.01


def test_crop_box_fallback_is_the_clipped_centre_crop():
    rng = np.random.default_rng(0)
    # A 10x1000 strip: no box of ratio <= 4/3 and area >= 90% fits in ten tries.
    assert transforms.sample_crop_box(10, 1000, rng) == (0, (1000 - 13) // 2, 10, 13)
    assert transforms.sample_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)


def test_random_resized_crop_output_and_identity_case():
    picture = _picture(50, 70, 3)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    out = transforms.random_resized_crop(picture, 24, rng_a)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    box = transforms.sample_crop_box(50, 70, rng_b)
    np.testing.assert_array_equal(out, transforms.crop_and_resize(picture, box, 24))
    assert transforms.random_resized_crop(picture, (12, 20), rng_a).shape == (12, 20, 3)
    # Whole-image box at the image's own size: the image itself.
    square = _picture(32, 32, 4)
    same = transforms.random_resized_crop(square, 32, rng_a, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(same, square)


def test_resize_center_crop_hand_computed():
    # No resize needed (shorter side == size): a pure centre crop, columns 2..7 of 10.
    picture = _picture(6, 10, 5)
    np.testing.assert_array_equal(transforms.resize_center_crop(picture, 6), picture[:, 2:8])
    # torchvision's rounding: a 6x11 image -> left = round(2.5) = 2 (Python rounds half to even).
    picture = _picture(6, 11, 6)
    np.testing.assert_array_equal(transforms.resize_center_crop(picture, 6), picture[:, 2:8])
    # A horizontal ramp 2*x on a 64x128 image, halved to 32x64: output column j samples source
    # x = 2j + 0.5, i.e. value 4j + 1 (bicubic reproduces linear ramps away from the borders);
    # the centre crop starts at column round((64 - 32) / 2) = 16: value 4 * (c + 16) + 1.
    ramp = np.broadcast_to((2 * np.arange(128, dtype=np.uint8))[None, :, None], (64, 128, 3))
    out = transforms.resize_center_crop(np.ascontiguousarray(ramp), 32)
    assert out.shape == (32, 32, 3)
    expected = 4 * (np.arange(32) + 16) + 1
    assert np.abs(out.astype(int) - expected[None, :, None]).max() <= 1
    # Odd sizes: 5x9 -> shorter side 3, longer int(3 * 9 / 5) = 5, crop left = round(1.0) = 1.
    assert transforms.resize_shorter_side(_picture(5, 9, 7), 3).size == (5, 3)
    assert transforms.center_crop_box(3, 5, 3) == (0, 1, 3, 3)


def test_normalize_numpy_and_jax():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    expected = (images / 255.0 - np.array(transforms.CLIP_MEAN)) / np.array(transforms.CLIP_STD)
    out = transforms.normalize(images)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    import jax
    import jax.numpy as jnp

    jax_out = jax.jit(transforms.normalize)(jnp.asarray(images))
    assert jax_out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jax_out), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- pipeline


def test_eval_is_one_ordered_pass_with_bad_records_skipped_and_counted(source):
    batches = _all_batches(_dataset(source, train=False, drop_remainder=False, num_eval_captions=2))
    assert _valid_indices(batches) == GOOD
    assert sum(b["skipped"] for b in batches) == len(BAD)
    # Rows 0-3 | 5-8 (4 skipped) | 10-12, 14 (9, 13 skipped) | 15, 16, 18, 19 (17) | 20-23.
    assert [b["skipped"] for b in batches] == [0, 1, 2, 1, 0]
    assert [int(b["valid"].sum()) for b in batches] == [4, 4, 4, 4, 4]
    tokenizer = ByteTokenizer()
    for batch in batches:
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 16, 16, 3)
        assert batch["text"].dtype == np.int32 and batch["text"].shape == (4, CONTEXT)
        for row, index in enumerate(batch["index"]):
            record = source[int(index)]
            expected_image = transforms.resize_center_crop(
                _decoded(record["image_bytes"]), IMAGE_SIZE
            )
            np.testing.assert_array_equal(batch["image"][row], expected_image)
            np.testing.assert_array_equal(batch["text"][row], tokenizer(record["captions"][0])[0])
            kept = record["captions"][:2]
            np.testing.assert_array_equal(batch["all_text"][row][: len(kept)], tokenizer(kept))
            assert batch["all_text_valid"][row].tolist() == [True] * len(kept) + [False] * (
                2 - len(kept)
            )


def test_eval_last_batch_padded_or_dropped(source):
    padded = _all_batches(
        _dataset(source, train=False, drop_remainder=False, batch_size_per_process=6)
    )
    assert [int(b["valid"].sum()) for b in padded] == [6, 6, 6, 2]
    last = padded[-1]
    assert last["index"].tolist()[2:] == [-1] * 4 and not last["image"][2:].any()
    assert sum(b["skipped"] for b in padded) == len(BAD)
    dropped = _all_batches(_dataset(source, train=False, batch_size_per_process=6))
    assert _valid_indices(dropped) == GOOD[:18]


def test_trailing_skips_reported_in_an_all_padding_batch():
    good = {"image": _picture(20, 20, 0), "captions": ["a cat"]}
    bad = {"image": None, "captions": ["no image"]}
    batches = _all_batches(
        _dataset(
            [good, good, bad, bad], train=False, batch_size_per_process=2, drop_remainder=False
        )
    )
    assert [b["skipped"] for b in batches] == [0, 2]
    assert batches[1]["valid"].tolist() == [False, False]


def test_train_epochs_skip_and_count_every_bad_record(source):
    batches = _all_batches(
        _dataset(source, num_epochs=2, batch_size_per_process=3, drop_remainder=False)
    )
    indices = _valid_indices(batches)
    assert sorted(indices) == sorted(GOOD * 2)
    assert sum(b["skipped"] for b in batches) == 2 * len(BAD)
    first_epoch, second_epoch = indices[: len(GOOD)], indices[len(GOOD) :]
    assert sorted(first_epoch) == GOOD and sorted(second_epoch) == GOOD
    assert first_epoch != GOOD and first_epoch != second_epoch  # shuffled, reshuffled


def test_train_is_deterministic_and_keyed_by_seed_epoch_index(source):
    def take(seed, count=8):
        return _all_batches(_dataset(source, seed=seed), limit=count)

    first, again, other = take(3), take(3), take(4)
    for a, b in zip(first, again):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert _valid_indices(first) != _valid_indices(other)
    # The same record in the same epoch gets a different crop under another seed.
    crops = {}
    for seed, batches in ((3, first), (4, other)):
        for batch in batches[:5]:  # the first epoch: 20 good records in 5 batches
            for index, image in zip(batch["index"], batch["image"]):
                crops.setdefault(int(index), {})[seed] = image
    differing = [i for i, by_seed in crops.items() if not np.array_equal(by_seed[3], by_seed[4])]
    # (Images whose aspect ratio is outside [3/4, 4/3] often get the deterministic fallback box.)
    assert len(differing) >= len(GOOD) // 2
    # The crop and caption of record i in epoch e come from an RNG seeded by (seed, epoch, i):
    # recompute one with the transforms alone.
    for epoch, batch in ((0, first[0]), (1, first[6])):  # epoch 1 starts at good example 20
        index = int(batch["index"][0])
        record = source[index]
        rng = np.random.default_rng([3, 1, epoch, index])
        caption = record["captions"][int(rng.integers(len(record["captions"])))]
        image = transforms.decode_to_pil(
            record["image_bytes"], min_side=transforms.crop_min_side(IMAGE_SIZE)
        )
        np.testing.assert_array_equal(
            batch["image"][0], transforms.random_resized_crop(image, IMAGE_SIZE, rng)
        )
        np.testing.assert_array_equal(batch["text"][0], ByteTokenizer()(caption)[0])


def test_flips_and_crops_follow_the_seed_stream():
    # Recomputed with the transforms alone: caption, crop, then the flip from [seed, 1, epoch, i].
    records = [{"image": _picture(30, 40, i), "captions": [f"a {i}", f"b {i}"]} for i in range(8)]
    augmentation = Augmentation(crop_scale=(0.5, 1.0), horizontal_flip=True)
    batch = _all_batches(
        _dataset(records, seed=2, batch_size_per_process=8, augmentation=augmentation), limit=1
    )[0]
    flipped = 0
    for row, index in enumerate(batch["index"]):
        rng = np.random.default_rng([2, 1, 0, int(index)])
        caption = records[index]["captions"][int(rng.integers(2))]
        crop = transforms.random_resized_crop(records[index]["image"], IMAGE_SIZE, rng, (0.5, 1.0))
        if rng.random() < 0.5:
            crop, flipped = crop[:, ::-1], flipped + 1
        np.testing.assert_array_equal(batch["image"][row], crop)
        np.testing.assert_array_equal(batch["text"][row], ByteTokenizer()(caption)[0])
    assert 0 < flipped < 8


def test_caption_choice_random_is_uniform_and_first_is_first():
    record = {
        "image": _picture(8, 8, 0),
        "captions": np.array([b"zero", b"one", b"two"], dtype=object),
    }
    batches = _all_batches(
        _dataset([record], batch_size_per_process=1, num_epochs=300, image_size=8)
    )
    counts = collections.Counter(_detokenize(batch["text"][0]) for batch in batches)
    assert set(counts) == {"zero", "one", "two"}
    assert all(70 <= count <= 130 for count in counts.values()), counts  # 100 +- 3.5 sigma
    first = _all_batches(
        _dataset(
            [record],
            batch_size_per_process=1,
            num_epochs=20,
            image_size=8,
            augmentation=Augmentation(caption_choice="first"),
        )
    )
    assert {_detokenize(batch["text"][0]) for batch in first} == {"zero"}


def test_processes_read_disjoint_covering_slices(source):
    for train in (True, False):
        per_process = [
            _valid_indices(
                _all_batches(
                    _dataset(
                        source,
                        train=train,
                        num_epochs=1,
                        process_index=p,
                        process_count=3,
                        batch_size_per_process=2,
                        drop_remainder=False,
                    )
                )
            )
            for p in range(3)
        ]
        sets = [set(indices) for indices in per_process]
        assert sum(len(s) for s in sets) == len(GOOD) and set.union(*sets) == set(GOOD)
        if not train:  # contiguous blocks [0, 8), [8, 16), [16, 24), in order
            assert per_process == [[i for i in GOOD if lo <= i < lo + 8] for lo in (0, 8, 16)]
    # Training: process p of 3 takes every third element of the one global shuffled stream.
    single = _valid_indices(_all_batches(_dataset(source, num_epochs=1, drop_remainder=False)))
    train_parts = [
        _valid_indices(
            _all_batches(
                _dataset(
                    source, num_epochs=1, process_index=p, process_count=3, drop_remainder=False
                )
            )
        )
        for p in range(3)
    ]
    stream = [i for i in _shuffled_stream(source, seed=0) if i not in BAD]
    assert single == stream
    for p in range(3):
        assert train_parts[p] == [i for i in _shuffled_stream(source, seed=0)[p::3] if i not in BAD]


def _shuffled_stream(source, seed):
    """The first epoch's global order, from grain's shuffle alone (the pipeline's contract)."""
    import grain

    order = grain.MapDataset.range(len(source)).shuffle(seed=pipeline.shuffle_seed(seed))
    return [int(order[i]) for i in range(len(source))]


def test_checkpoint_restores_the_exact_position(source):
    dataset = _dataset(source, batch_size_per_process=3)
    iterator = iter(dataset)
    for _ in range(5):
        next(iterator)
    state = iterator.get_state()
    json.dumps(state)  # orbax stores iterator states as JSON
    expected = [next(iterator) for _ in range(3)]
    restored = iter(dataset)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert got["skipped"] == want["skipped"]
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_decoded_tfds_style_records_with_labels():
    records = [
        {
            "image": _picture(30, 20, i),
            "captions": np.array([f"cap {i}".encode()], dtype=object),
            "label": np.int64(i % 3),
        }
        for i in range(5)
    ]
    records[2]["image"] = _picture(30, 20, 2)[..., 0]  # greyscale
    records[4]["captions"] = np.array([b"   "], dtype=object)
    batches = _all_batches(
        _dataset(records, train=False, batch_size_per_process=2, drop_remainder=False)
    )
    assert _valid_indices(batches) == [0, 1, 2, 3]
    assert [b["label"].tolist() for b in batches[:2]] == [[0, 1], [2, 0]]
    # The blank-captioned last record is reported in a final all-padding batch.
    assert [b["skipped"] for b in batches] == [0, 0, 1] and not batches[2]["valid"].any()
    assert batches[0]["label"].dtype == np.int32


def test_errors_not_caused_by_data_propagate():
    with pytest.raises(KeyError, match="image"):
        _all_batches(_dataset([{"pixels": 1, "captions": ["x"]}] * 4, train=False))

    class BrokenTokenizer:
        def __call__(self, texts):
            raise RuntimeError("tokenizer bug")

    record = {"image": _picture(8, 8, 0), "captions": ["x"]}
    with pytest.raises(RuntimeError, match="tokenizer bug"):
        _all_batches(_dataset([record] * 4, tokenizer=BrokenTokenizer()))


def test_all_bad_data_stops_instead_of_spinning():
    records = [{"image": b"broken", "captions": ["x"]}] * 10
    with pytest.raises(RuntimeError, match="in a row were skipped"):
        _all_batches(_dataset(records, max_consecutive_skips=25))


def test_worker_processes_checkpoint_and_cover(source):
    dataset = _dataset(
        source,
        batch_size_per_process=3,
        workers=pipeline.Workers(count=2),
        num_epochs=2,
        drop_remainder=False,
    )
    iterator = iter(dataset)
    try:
        head = [next(iterator) for _ in range(3)]
        state = iterator.get_state()
        tail = list(iterator)
    finally:
        iterator.close()
    everything = head + tail
    assert sorted(_valid_indices(everything)) == sorted(GOOD * 2)
    assert sum(b["skipped"] for b in everything) == 2 * len(BAD)
    restored = iter(dataset)
    try:
        restored.set_state(state)
        again = list(restored)
    finally:
        restored.close()
    assert len(again) == len(tail)
    for got, want in zip(again, tail):
        assert got["skipped"] == want["skipped"]
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
