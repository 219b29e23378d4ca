"""Variable-resolution batches (pretrain/data/variable_batches.py): sizes and rows, pixels per
batch, the examples of the fixed-size pipeline at each size, skips, and exact resumption."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from pretrain.data.examples import Augmentation
from pretrain.data.pipeline import Workers, image_text_dataset
from pretrain.data.variable_batches import resolution_schedule


def test_schedule_sizes_rows_and_pixels_per_batch():
    schedule = resolution_schedule(
        512, 32, min_scale=0.5, max_scale=1.5, num_sizes=5, multiple=32, batch_multiple=4, seed=0
    )
    assert schedule.sizes == (256, 384, 512, 640, 768)
    # floor(32 * (512 / s)^2) rounded down to a multiple of 4, at least 4 (NumPy recomputation).
    expected = [max(4, int(32 * (512 / s) ** 2) // 4 * 4) for s in schedule.sizes]
    assert list(schedule.batch_sizes) == expected == [128, 56, 32, 20, 12]
    base_pixels = 32 * 512**2
    for size, rows in zip(schedule.sizes, schedule.batch_sizes):
        pixels = rows * size**2
        # Never more pixels than the base batch; less by at most one multiple of rows.
        assert base_pixels - 4 * size**2 < pixels <= base_pixels
    picks = [schedule.pick(n) for n in range(500)]
    assert picks == [schedule.pick(n) for n in range(500)]  # a pure function of (seed, n)
    counts = np.bincount([schedule.sizes.index(size) for size, _ in picks])
    assert len(counts) == 5 and counts.min() > 70  # every size is used, about uniformly
    other = resolution_schedule(
        512, 32, min_scale=0.5, max_scale=1.5, num_sizes=5, multiple=32, batch_multiple=4, seed=1
    )
    assert [other.pick(n) for n in range(20)] != picks[:20]
    with pytest.raises(ValueError, match="min_scale"):
        resolution_schedule(
            64, 8, min_scale=2, max_scale=1, num_sizes=3, multiple=8, batch_multiple=1, seed=0
        )


class Pictures:
    """Records with PNG images of several sizes and a caption; record 5 is corrupt."""

    def __init__(self, count: int = 40):
        rng = np.random.default_rng(0)
        self.records = []
        for index in range(count):
            height, width = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            payload = b"not an image" if index == 5 else buffer.getvalue()
            self.records.append({"image_bytes": payload, "captions": [f"picture {index}"]})

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]


def _stream(source, *, resolutions=None, image_size=32, batch_size=8, workers=0):
    return image_text_dataset(
        source,
        batch_size_per_process=batch_size,
        seed=3,
        train=True,
        image_size=image_size,
        tokenizer=None,
        augmentation=Augmentation(crop_scale=(0.5, 1.0), horizontal_flip=True),
        resolutions=resolutions,
        workers=Workers(count=workers),
    )


SCHEDULE = resolution_schedule(
    32, 8, min_scale=0.5, max_scale=1.5, num_sizes=3, multiple=8, batch_multiple=2, seed=3
)


def test_batches_take_the_scheduled_sizes_and_the_fixed_pipelines_examples():
    source = Pictures()
    batches = list(itertools.islice(_stream(source, resolutions=SCHEDULE), 12))
    assert SCHEDULE.sizes == (16, 32, 48)
    assert {b["image"].shape[1] for b in batches} == set(SCHEDULE.sizes)
    for number, batch in enumerate(batches):
        size, rows = SCHEDULE.pick(number)
        assert batch["image"].shape == (rows, size, size, 3)
        assert batch["valid"].all() and len(batch["index"]) == rows
    # The records in order are the fixed-size pipeline's (skips included), and each example is
    # the one that pipeline makes for that record at the batch's size.
    indices = np.concatenate([b["index"] for b in batches])
    assert 5 not in indices
    fixed, fixed_skipped = {}, 0
    for size in SCHEDULE.sizes:
        examples = {}
        for batch in itertools.islice(_stream(source, image_size=size, batch_size=1), len(indices)):
            examples[int(batch["index"][0]), len(examples) // 39] = batch["image"][0]
            fixed_skipped += batch["skipped"]
        fixed[size] = examples
    # Record 5 was skipped once per pass over the source, as the fixed-size pipeline skips it.
    assert sum(b["skipped"] for b in batches) == fixed_skipped // 3 > 1
    position = 0
    for batch in batches:
        size = batch["image"].shape[1]
        for row, index in enumerate(batch["index"]):
            epoch = position // 39
            np.testing.assert_array_equal(batch["image"][row], fixed[size][int(index), epoch])
            position += 1


def test_resuming_continues_the_same_batches():
    source = Pictures()
    straight = list(itertools.islice(_stream(source, resolutions=SCHEDULE), 10))
    iterator = iter(_stream(source, resolutions=SCHEDULE))
    for _ in range(4):
        next(iterator)
    state = iterator.get_state()
    resumed = iter(_stream(source, resolutions=SCHEDULE))
    resumed.set_state(state)
    for expected in straight[4:]:
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["index"], expected["index"])


def test_worker_processes_give_sized_batches_in_schedule_order():
    batches = list(itertools.islice(_stream(Pictures(), resolutions=SCHEDULE, workers=2), 6))
    for number, batch in enumerate(batches):
        # Worker w's n-th batch is step n * 2 + w: every worker draws its n-th size alike.
        size, rows = SCHEDULE.pick(number // 2)
        assert batch["image"].shape == (rows, size, size, 3)
