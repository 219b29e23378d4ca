"""Image-only streams and per-example extra fields (e.g. UTA's token masks) in the pipeline."""

import functools

import numpy as np
import pytest

from pretrain.data import transforms
from pretrain.data.examples import (
    MAP_SIZE_MISMATCH,
    Augmentation,
    PixelMap,
    Plugins,
    RecordFields,
)
from pretrain.data.pipeline import image_text_dataset


class ImagesOnly:
    """Decoded records without captions (an image-classification-style source)."""

    def __init__(self, count=20, size=24):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index]}


def draw_three(rng: np.random.Generator) -> dict:
    return {"draws": rng.integers(0, 1000, 3).astype(np.int32)}


def batches(seed=0, extras=None, count=3):
    stream = image_text_dataset(
        ImagesOnly(),
        batch_size_per_process=4,
        seed=seed,
        train=True,
        image_size=16,
        tokenizer=None,
        plugins=Plugins(example_extras=extras),
    )
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def test_image_only_stream_has_no_text_and_needs_no_captions():
    for batch in batches():
        assert "text" not in batch
        assert batch["image"].shape == (4, 16, 16, 3)
        assert batch["skipped"] == 0


def test_extras_draw_from_their_own_stream():
    # Recomputed from the stream alone: [seed, 2, epoch, record index].
    for batch in batches(seed=4, extras=draw_three):
        for draws, index in zip(batch["draws"], batch["index"]):
            expected = draw_three(np.random.default_rng([4, 2, 0, int(index)]))["draws"]
            np.testing.assert_array_equal(draws, expected)


def test_extras_are_deterministic_and_leave_the_crops_unchanged():
    first, again = batches(extras=draw_three), batches(extras=draw_three)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["draws"], b["draws"])
    # Each record has its own draws (a per-record stream, not one shared generator).
    assert len({tuple(row) for batch in first for row in batch["draws"]}) == 12
    # A different seed gives different extras.
    other = batches(seed=1, extras=draw_three)
    assert not np.array_equal(first[0]["draws"], other[0]["draws"])
    # The crops are those of the stream without extras.
    for with_extras, without in zip(first, batches()):
        np.testing.assert_array_equal(with_extras["image"], without["image"])
        np.testing.assert_array_equal(with_extras["index"], without["index"])


# ----------------------------------------------------------------------------- maps that follow


class HalvesWithMaps:
    """Images red on the left of a random column and blue on its right (``halves_plugin`` gives
    that split as maps)."""

    def __init__(self, count=16, height=40, width=56, map_scale=1.0, bad_index=None):
        rng = np.random.default_rng(1)
        self.splits = rng.integers(12, width - 12, count)
        self.height, self.width, self.map_scale, self.bad_index = (
            height,
            width,
            map_scale,
            bad_index,
        )

    def __len__(self):
        return len(self.splits)

    def __getitem__(self, index):
        image = np.zeros((self.height, self.width, 3), np.uint8)
        image[:, : self.splits[index], 0] = 255
        image[:, self.splits[index] :, 2] = 255
        return {"image": image, "split": self.splits[index] / self.width}


def halves_plugin(record, captions, caption_index, rng, map_scale=1.0, bad=False):
    """The split as a class map (at ``map_scale`` times the image's resolution; ``bad``: 3
    columns too wide) and as normals (x = +1 left, -1 right) of stride 2."""
    height = round(record["image"].shape[0] * map_scale)
    width = round(record["image"].shape[1] * map_scale) + (3 if bad else 0)
    right = np.arange(width)[None, :] >= record["split"] * width
    classes = np.broadcast_to(right, (height, width)).astype(np.int32)
    normals = np.zeros((height, width, 3), np.float32)
    normals[..., 0] = np.where(classes == 0, 1.0, -1.0)
    return RecordFields(
        maps={
            "classes": PixelMap(classes),
            "normals": PixelMap(normals, stride=2, negate_x_on_flip=True),
        }
    )


def map_batches(plugin, flip=True, count=2):
    stream = image_text_dataset(
        HalvesWithMaps(),
        batch_size_per_process=4,
        seed=3,
        train=True,
        image_size=24,
        tokenizer=None,
        augmentation=Augmentation(crop_scale=(0.3, 1.0), horizontal_flip=flip),
        plugins=Plugins(record_fields=plugin),
    )
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def test_maps_follow_the_crop_and_flip_of_their_image():
    for map_scale in (1.0, 0.5):
        plugin = functools.partial(halves_plugin, map_scale=map_scale)
        for batch in map_batches(plugin):
            assert batch["classes"].shape == (4, 24, 24) and batch["normals"].shape == (
                4,
                12,
                12,
                3,
            )
            red = batch["image"][..., 0] > 200
            blue = batch["image"][..., 2] > 200
            classes = batch["classes"]
            # Away from the edge (bicubic blends 2 pixels each side; a half-resolution map moves
            # the edge by up to one map pixel), red pixels are class 0 and blue ones class 1.
            settled = ndimage_erode(red, 3) | ndimage_erode(blue, 3)
            assert settled.mean() > 0.5
            np.testing.assert_array_equal(classes[settled], blue[settled].astype(np.int32))
            # The normals' x says the same, at half the size, negated where mirrored (the flip
            # recomputed from the example's stream: [seed, 1, epoch, index], box then flip).
            coarse = classes[:, 1::2, 1::2]
            x = batch["normals"][..., 0]
            for row, index in enumerate(batch["index"]):
                rng = np.random.default_rng([3, 1, 0, int(index)])
                transforms.sample_crop_box(40, 56, rng, (0.3, 1.0), (0.75, 4 / 3))
                sign = -1.0 if rng.random() < 0.5 else 1.0
                agree = (x[row] == sign * np.where(coarse[row] == 0, 1.0, -1.0)).mean()
                assert agree > 0.8, (map_scale, row, agree)
    # Flipping on or off changes no crop: unflipped examples are identical.
    plugin = functools.partial(halves_plugin, map_scale=1.0)
    for flipped, plain in zip(map_batches(plugin), map_batches(plugin, flip=False)):
        same = (flipped["image"] == plain["image"]).all(axis=(1, 2, 3))
        assert same.any() and not same.all()
        np.testing.assert_array_equal(flipped["classes"][same], plain["classes"][same])


def test_a_full_crop_of_a_map_samples_pixel_centres():
    from pretrain.data import pixel_maps

    array = np.arange(32 * 48).reshape(32, 48)
    out = pixel_maps.crop_resize_nearest(array, (0, 0, 32, 48), (32, 48), (16, 24))
    np.testing.assert_array_equal(out, array[1::2, 1::2])
    half = pixel_maps.crop_resize_nearest(array[::2, ::2], (0, 0, 64, 96), (64, 96), (16, 24))
    np.testing.assert_array_equal(half, array[::2, ::2])
    window = pixel_maps.crop_resize_nearest(array, (8, 12, 8, 12), (32, 48), (8, 12))
    np.testing.assert_array_equal(window, array[8:16, 12:24])


def test_maps_without_the_image_aspect_are_skipped_and_counted():
    plugin = functools.partial(halves_plugin, bad=True)
    stream = image_text_dataset(
        HalvesWithMaps(),
        batch_size_per_process=4,
        seed=3,
        train=True,
        image_size=24,
        tokenizer=None,
        plugins=Plugins(record_fields=plugin),
        max_consecutive_skips=100,
    )
    with pytest.raises(RuntimeError, match=MAP_SIZE_MISMATCH):
        next(iter(stream))


def ndimage_erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose (2 radius + 1)-wide row neighbourhood is all in ``mask`` (per image)."""
    padded = np.pad(mask, ((0, 0), (0, 0), (radius, radius)), constant_values=False)
    width = mask.shape[2]
    return np.all([padded[:, :, k : k + width] for k in range(2 * radius + 1)], axis=0)
