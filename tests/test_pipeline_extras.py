"""Image-only streams and per-example extra fields (e.g. UTA's token masks) in the pipeline."""

import numpy as np

from pretrain.data.examples import Plugins
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
