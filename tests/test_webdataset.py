"""Tests of the tar-shard source: config plumbing, memory-mapped index, damaged shards."""

from __future__ import annotations

import gc
import logging
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from ml_collections import ConfigDict

from pretrain.data import image_text, webdataset
from pretrain.data.webdataset import combined_index, shard_index
from pretrain.data.webdataset.tar import CorruptShardError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _samples(count: int, first: int = 0) -> list[dict]:
    return [
        {
            "__key__": f"{first + i:09d}",
            "jpg": bytes([i % 256]) * (10 + i),
            "txt": f"caption {first + i}",
            "json": {"uid": first + i},
        }
        for i in range(count)
    ]


def _records(source: webdataset.WebDatasetSource) -> list[dict]:
    return [source[i] for i in range(len(source))]


def _expected_record(sample: dict) -> dict:
    return {
        "key": sample["__key__"],
        "image_bytes": sample["jpg"],
        "captions": [sample["txt"]],
        "metadata": sample["json"],
    }


# ----------------------------------------------------------------------------- config plumbing


@pytest.fixture
def caption_shard(tmp_path):
    sample = {"txt": "line one\nline two", "json": {"recap": "long caption", "caption": "short"}}
    return webdataset.write_shards([sample], str(tmp_path / "m-%d.tar"), 1)[0]


def test_make_source_passes_webdataset_options(caption_shard, tmp_path):
    default = image_text.make_source(ConfigDict({"source": "webdataset", "shards": caption_shard}))
    assert default[0]["captions"] == ["line one", "line two", "short"]
    assert not default.strict

    cache = tmp_path / "cache"
    config = ConfigDict(
        {
            "source": "webdataset",
            "shards": caption_shard,
            "txt_captions": "single",
            "json_caption_fields": ("recap",),
            "index_cache_dir": str(cache),
            "strict": True,
        }
    )
    configured = image_text.make_source(config)
    assert configured[0]["captions"] == ["line one\nline two", "long caption"]
    assert configured.strict
    assert os.path.dirname(configured.index_dir) == str(cache)

    # A string names comma-separated fields; () takes no caption from the JSON.
    as_string = dict(config.to_dict(), json_caption_fields="caption, recap")
    assert image_text.make_source(as_string)[0]["captions"] == [
        "line one\nline two",
        "short",
        "long caption",
    ]
    config.json_caption_fields = ()
    assert image_text.make_source(config)[0]["captions"] == ["line one\nline two"]

    config.index_cache_dir = ""  # no cache: a private temporary index outside it
    assert not image_text.make_source(config).index_dir.startswith(str(cache))
    with pytest.raises(ValueError, match="txt_captions"):
        image_text.make_source(
            {"source": "webdataset", "shards": caption_shard, "txt_captions": "x"}
        )


def test_extra_members_are_read_when_asked_and_indexed_apart(tmp_path):
    samples = _samples(6)
    for number, sample in enumerate(samples):
        if number % 3:  # some samples lack the member
            sample["seg.png"] = f"labels {number}".encode()
    paths = webdataset.write_shards(samples, str(tmp_path / "x-%d.tar"), 3)
    cache = str(tmp_path / "cache")
    plain = webdataset.WebDatasetSource(paths, index_cache_dir=cache)
    assert _records(plain) == [_expected_record(s) for s in samples]  # not indexed, not read
    source = image_text.make_source(
        {"source": "webdataset", "shards": paths, "index_cache_dir": cache},
        read_members=("seg.png",),
    )
    records = _records(source)
    assert [r.pop("seg.png") for r in records] == [s.get("seg.png") for s in samples]
    assert records == _records(plain)
    assert source.index_dir != plain.index_dir  # two layouts, two cached indexes
    assert len(list((tmp_path / "cache").glob("*.index.npz"))) == 4
    # Reopened from the caches (per shard and combined), both layouts read the same again.
    again = webdataset.WebDatasetSource(paths, index_cache_dir=cache, read_members=("seg.png",))
    assert again.index_dir == source.index_dir and again[1]["seg.png"] == b"labels 1"
    with pytest.raises(ValueError, match="extra members"):
        webdataset.WebDatasetSource(paths, read_members=("txt",))


# ----------------------------------------------------------------------------- memory-mapped index


def _synthetic_shard_index(count: int, first: int) -> dict[str, np.ndarray]:
    """A per-shard index as index_shard returns it, without a tar behind it."""
    index = {"keys": np.array([f"{first + i:09d}".encode() for i in range(count)], dtype=bytes)}
    positions = np.arange(count, dtype=np.int64) * 3000
    for number, slot in enumerate(("image", "text", "metadata")):
        index[f"{slot}_offset"] = positions + 512 + 1024 * number
        index[f"{slot}_size"] = np.full(count, 100 + number, np.int64)
    for slot in ("synthetic", "teacher", "augmentation"):  # no DataCompDR members
        index[f"{slot}_offset"] = index[f"{slot}_size"] = np.full(count, -1, np.int64)
    index["text_offset"][::7] = -1  # some samples lack a caption file
    index["damage"], index["corrupt"] = np.array(""), np.array(False)
    return index


SYNTHETIC_PER_SHARD = 25_000


@pytest.fixture
def synthetic_shards(tmp_path, monkeypatch) -> list[str]:
    """Four real (tiny) shard files whose indexes claim 25k samples each: 100k samples."""
    paths = [str(tmp_path / f"s-{n}.tar") for n in range(4)]
    for path in paths:
        with open(path, "wb") as file:
            file.write(b"\0" * 1024)
    starts = {path: n * SYNTHETIC_PER_SHARD for n, path in enumerate(paths)}
    monkeypatch.setattr(
        shard_index,
        "index_shard",
        lambda path, **_: _synthetic_shard_index(SYNTHETIC_PER_SHARD, starts[path]),
    )
    return paths


def test_index_is_memory_mapped_and_pickles_as_paths(synthetic_shards):
    source = webdataset.WebDatasetSource(synthetic_shards)
    count = 4 * SYNTHETIC_PER_SHARD
    assert len(source) == count
    names = sorted(os.listdir(source.index_dir))
    arrays = [name for name in names if name.endswith(".npy")]
    assert len(arrays) == 15 and "index.json" in names
    # Disk = 12 int32 offsets/sizes + int64 key offsets (n + 1) + 9 key bytes per sample, plus
    # the 5 shard starts and fifteen 128-byte .npy headers: ~65 bytes per sample.
    disk = sum(os.path.getsize(os.path.join(source.index_dir, name)) for name in arrays)
    assert disk == count * (12 * 4 + 9) + 8 * (count + 1) + 8 * 5 + 15 * 128

    # The old in-heap index pickled ~60 bytes per sample (6 MB here); now only paths travel.
    pickled = pickle.dumps(source)
    assert len(pickled) < 4_000
    clone = pickle.loads(pickled)
    for name, array in clone._index.items():
        assert isinstance(array.base, np.memmap), name
        assert array.base.filename.startswith(source.index_dir), name
        assert not array.flags.writeable
    reference = _synthetic_shard_index(SYNTHETIC_PER_SHARD, 2 * SYNTHETIC_PER_SHARD)
    for position in (0, 7, 12_345, SYNTHETIC_PER_SHARD - 1):
        index = 2 * SYNTHETIC_PER_SHARD + position
        assert clone.key(index) == source.key(index) == f"{index:09d}"
        assert clone._shard_of(index) == 2
        for name in combined_index.per_sample_arrays():
            assert clone._index[name][index] == reference[name][position], name
    assert clone.key(count - 1) == f"{count - 1:09d}"
    assert (source._index["image_offset"].dtype, clone._index["key_offsets"].dtype) == (
        np.int32,
        np.int64,
    )


def test_private_index_is_removed_by_its_owner_only(synthetic_shards):
    source = webdataset.WebDatasetSource(synthetic_shards)
    directory = source.index_dir
    clone = pickle.loads(pickle.dumps(source))
    del clone
    gc.collect()
    assert os.path.isdir(directory)  # a copy (a grain worker) does not own the files
    combined_index._remove_if_owner(directory, os.getpid() + 1)  # a forked child's finalizer
    assert os.path.isdir(directory)
    del source
    gc.collect()
    assert not os.path.exists(directory)


def test_private_index_is_removed_at_exit(tmp_path):
    shard = webdataset.write_shards(_samples(3), str(tmp_path / "x-%d.tar"), 3)[0]
    program = (
        "import sys; from pretrain.data import webdataset; "
        "source = webdataset.WebDatasetSource(sys.argv[1]); print(source.index_dir); "
        "assert len(source) == 3"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, shard], cwd=REPO, capture_output=True, text=True, check=True
    )
    directory = result.stdout.strip()
    assert directory and not os.path.exists(directory)


def test_combined_index_cache_is_reused_rebuilt_and_atomic(tmp_path, monkeypatch, caplog):
    samples = _samples(9)
    paths = webdataset.write_shards(samples, str(tmp_path / "c-%d.tar"), 3)
    cache = tmp_path / "cache"
    first = webdataset.WebDatasetSource(paths, index_cache_dir=str(cache))
    assert _records(first) == [_expected_record(s) for s in samples]
    name = combined_index.combined_index_name(combined_index.shard_fingerprints(paths))
    assert first.index_dir == str(cache / name)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [name]  # no build leftovers

    real_write = combined_index.write_combined_index
    writes = []
    monkeypatch.setattr(
        combined_index,
        "write_combined_index",
        lambda *args: writes.append(args[0]) or real_write(*args),
    )
    again = webdataset.WebDatasetSource(paths, index_cache_dir=str(cache))
    assert writes == [] and again.index_dir == first.index_dir
    assert _records(again) == _records(first)

    # A damaged cached index is rebuilt in place (from the per-shard caches).
    os.remove(os.path.join(first.index_dir, "key_bytes.npy"))
    with caplog.at_level(logging.WARNING, logger=webdataset.__name__):
        rebuilt = webdataset.WebDatasetSource(paths, index_cache_dir=str(cache))
    assert len(writes) == 1 and "Ignoring unreadable combined index" in caplog.text
    assert rebuilt.index_dir == first.index_dir and _records(rebuilt) == _records(first)

    # Another shard list (or a changed shard) is another index.
    two = webdataset.WebDatasetSource(paths[:2], index_cache_dir=str(cache))
    assert two.index_dir != first.index_dir and len(two) == 6
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_concurrent_builder_keeps_the_published_index(tmp_path):
    paths = webdataset.write_shards(_samples(4), str(tmp_path / "r-%d.tar"), 2)
    fingerprints = combined_index.shard_fingerprints(paths)
    indexes = [shard_index.index_shard(path) for path in paths]
    final = tmp_path / "final"
    for attempt in ("winner", "loser"):
        building = tmp_path / attempt
        building.mkdir()
        combined_index.write_combined_index(str(building), paths, indexes, fingerprints)
        combined_index._publish(str(building), str(final), fingerprints)
    assert os.path.isdir(tmp_path / "loser")  # left for its builder to remove
    assert not os.path.exists(tmp_path / "winner")
    meta, arrays = combined_index.open_combined_index(str(final))
    assert meta["num_samples"] == 4 and arrays["key_bytes"].tobytes() == b"".join(
        f"{i:09d}".encode() for i in range(4)
    )


def test_offsets_widen_for_large_shards_and_never_overflow(tmp_path):
    index = _synthetic_shard_index(5, 0)
    big = tmp_path / "big"
    big.mkdir()
    combined_index.write_combined_index(str(big), ["a.tar"], [index], [["/a.tar", 3 * 2**30, 0]])
    _, arrays = combined_index.open_combined_index(str(big))
    assert arrays["image_offset"].dtype == np.int64
    np.testing.assert_array_equal(arrays["text_offset"], index["text_offset"])

    index["image_offset"][-1] = 2**31  # a shard that grew past its fingerprint: no silent wrap
    small = tmp_path / "small"
    small.mkdir()
    with pytest.raises(OverflowError):
        combined_index.write_combined_index(str(small), ["a.tar"], [index], [["/a.tar", 4096, 0]])


# ----------------------------------------------------------------------------- damaged shards


def _damage_header(path: str, member_number: int) -> int:
    """Overwrites the name field of a member's header (checksum now wrong); returns its offset."""
    with tarfile.open(path) as tar:
        header_offset = tar.getmembers()[member_number].offset
    with open(path, "r+b") as file:
        file.seek(header_offset)
        file.write(b"garbage!")
    return header_offset


@pytest.fixture
def damaged_set(tmp_path):
    """Three shards of 4 samples (3 members each); shard 1 is damaged at its 3rd sample."""
    samples = _samples(12)
    paths = webdataset.write_shards(samples, str(tmp_path / "d-%d.tar"), 4)
    with tarfile.open(paths[1]) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    assert names[6].startswith("000000006.")  # write_shards puts a sample's members together
    _damage_header(paths[1], 6)
    kept = samples[:4] + samples[4:6] + samples[8:]
    return paths, kept


def test_damaged_header_keeps_earlier_samples_and_is_counted(damaged_set, tmp_path, caplog):
    paths, kept = damaged_set
    for cache in ("", str(tmp_path / "cache"), str(tmp_path / "cache")):  # build, then reuse
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=webdataset.__name__):
            source = webdataset.WebDatasetSource(paths, index_cache_dir=cache or None)
        assert _records(source) == [_expected_record(s) for s in kept]
        assert source.damaged_shards == [paths[1]]
        assert f"Damaged shard {paths[1]}" in caplog.text
        assert paths[0] not in caplog.text and paths[2] not in caplog.text
        assert "1 damaged" in repr(source)


def test_strict_raises_on_damaged_header(damaged_set, tmp_path):
    paths, _ = damaged_set
    with pytest.raises(CorruptShardError, match=r"d-1\.tar: bad tar header"):
        webdataset.WebDatasetSource(paths, strict=True)
    cache = str(tmp_path / "cache")
    webdataset.WebDatasetSource(paths, index_cache_dir=cache)  # caches the damaged index
    with pytest.raises(CorruptShardError, match=r"d-1\.tar"):
        webdataset.WebDatasetSource(paths, index_cache_dir=cache, strict=True)
    name = combined_index.combined_index_name(combined_index.shard_fingerprints(paths))
    os.remove(os.path.join(cache, name, "index.json"))
    with pytest.raises(CorruptShardError, match=r"d-1\.tar"):  # from the per-shard cache
        webdataset.WebDatasetSource(paths, index_cache_dir=cache, strict=True)


def test_truncated_and_unreadable_shards(tmp_path):
    samples = _samples(8)
    paths = webdataset.write_shards(samples, str(tmp_path / "t-%d.tar"), 4)
    with tarfile.open(paths[0]) as tar:
        jpg_of_sample_2 = tar.getmembers()[6]
    with open(paths[0], "r+b") as file:  # cut inside sample 2's image
        file.truncate(jpg_of_sample_2.offset_data + 5)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar file at all" * 100)
    everything = [paths[0], str(garbage), paths[1]]
    for strict in (False, True):  # a shard cut short is kept even in strict mode
        source = webdataset.WebDatasetSource(paths, strict=strict)
        assert _records(source) == [_expected_record(s) for s in samples[:2] + samples[4:]]
        assert source.damaged_shards == [paths[0]]
    source = webdataset.WebDatasetSource(everything)
    assert source.damaged_shards == [paths[0], str(garbage)] and len(source) == 6
    assert source.key(2) == "000000004"  # the empty shard in between is skipped
    with pytest.raises(ValueError, match=r"No samples in 1 shards \(1 damaged\)"):
        webdataset.WebDatasetSource(str(garbage))
    with pytest.raises(FileNotFoundError, match=r"missing\.tar.*cannot be opened"):
        webdataset.WebDatasetSource([paths[1], str(tmp_path / "missing.tar")])
