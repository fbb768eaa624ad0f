"""The activation store: exact round trips, manifest bookkeeping, resume, and refusals."""

from __future__ import annotations

import dataclasses
import json
import pickle

import ml_dtypes
import numpy as np
import pytest

from jaxsae.store import (
    STORE_VERSION,
    StoreError,
    StoreMeta,
    create_store,
    finite_rows,
    open_store,
)

D = 8


def meta(dtype: str = "float32", **kw) -> StoreMeta:
    base = dict(
        encoder="whisper-tiny.en",
        revision="abc123",
        layer=2,
        hook="encoder.layers.1",
        sample_rate=16000,
        frame_rate=50.0,
        dtype=dtype,
        d=D,
    )
    return StoreMeta(**{**base, **kw})


def rows(n: int, dtype, seed: int = 0, d: int = D) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((n, d), dtype=np.float32).astype(dtype)
    clip = rng.integers(0, 50, n).astype(np.int32)
    frame = rng.integers(0, 1500, n).astype(np.int32)
    return acts, clip, frame


def record(i: int) -> dict:
    return {"path": f"clips/{i}.wav", "labels": {"domain": "speech"}, "n_frames": 10 + i}


def fill(store, sizes, dtype, seed=0):
    """Appends pieces of the given sizes; returns the concatenated (acts, clip, frame) written."""
    pieces = [rows(n, dtype, seed + i) for i, n in enumerate(sizes)]
    for p in pieces:
        store.append(*p)
    return tuple(np.concatenate(a) for a in zip(*pieces, strict=True))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_uneven_appends_read_back_exactly(tmp_path, dtype):
    store = create_store(tmp_path / "s", meta(dtype))
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    acts, clip, frame = fill(store, [1, 700, 1500, 0, 333], np_dtype)
    assert store.num_rows == len(acts) == 2534
    got = store.read_rows(0, store.num_rows)
    assert got.dtype == np.dtype(np_dtype)
    np.testing.assert_array_equal(got.view(np.uint8), acts.view(np.uint8))
    np.testing.assert_array_equal(store.read_rows(1000, 1100), acts[1000:1100])
    c, f = store.read_clip_frame(5, 2534)
    assert c.dtype == f.dtype == np.int32
    np.testing.assert_array_equal(c, clip[5:])
    np.testing.assert_array_equal(f, frame[5:])
    # a fresh handle (another process) sees the same
    again = open_store(tmp_path / "s", read_only=True)
    np.testing.assert_array_equal(again.read_rows(0, 2534).view(np.uint8), acts.view(np.uint8))


def test_float32_input_is_cast_to_stored_dtype(tmp_path):
    store = create_store(tmp_path / "s", meta("bfloat16"))
    acts, clip, frame = rows(10, np.float32)
    store.append(acts, clip, frame)
    np.testing.assert_array_equal(store.read_rows(0, 10), acts.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("block_rows", [1024, 2048, 500])
def test_block_reads_equal_slices(tmp_path, block_rows):
    store = create_store(tmp_path / "s", meta())
    acts, clip, frame = fill(store, [3000, 2100], np.float32)
    n = len(acts)
    assert store.num_blocks(block_rows) == -(-n // block_rows)
    for i in range(store.num_blocks(block_rows)):
        a, c, f = store.read_block(i, block_rows)
        sl = slice(i * block_rows, min((i + 1) * block_rows, n))
        np.testing.assert_array_equal(a, acts[sl])
        np.testing.assert_array_equal(c, clip[sl])
        np.testing.assert_array_equal(f, frame[sl])
    with pytest.raises(IndexError):
        store.read_block(store.num_blocks(block_rows), block_rows)
    with pytest.raises(IndexError):
        store.read_rows(0, n + 1)


def test_manifest_after_appends(tmp_path):
    m = meta("float16")
    store = create_store(tmp_path / "s", m, compression="zstd")
    store.append(*rows(5, np.float16), clips_done=[], clip_records={0: record(0), 1: record(1)})
    store.append(*rows(7, np.float16, 1), clips_done=[0, 1, 2], clip_records={2: record(2)})
    store.record_failure("clips/9.wav", "decode error: truncated file")
    store.set_extra("shuffle_buffer_rows", 65536)
    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert on_disk == store.manifest
    assert on_disk["format_version"] == STORE_VERSION
    assert {k: on_disk[k] for k in dataclasses.asdict(m)} == dataclasses.asdict(m)
    assert on_disk["rows_written"] == 12 == store.num_rows
    assert on_disk["clips_done"] == [0, 1, 2]
    assert store.clips_done == {0, 1, 2}
    assert on_disk["clips"]["2"] == record(2)
    assert on_disk["failures"] == [{"path": "clips/9.wav", "reason": "decode error: truncated file"}]
    assert on_disk["extra"] == {"shuffle_buffer_rows": 65536}
    assert on_disk["compression"] == "zstd"
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]


def test_chunks_are_plain_row_blocks(tmp_path):
    """Explicit codecs: no sharding codec (tensorstore's default would make one-row inner chunks)."""
    create_store(tmp_path / "s", meta("bfloat16"))
    z = json.loads((tmp_path / "s" / "acts" / "zarr.json").read_text())
    assert z["chunk_grid"]["configuration"]["chunk_shape"] == [1024, D]
    assert [c["name"] for c in z["codecs"]] == ["bytes"]
    assert z["data_type"] == "bfloat16"


def test_clip_bookkeeping_refusals(tmp_path):
    store = create_store(tmp_path / "s", meta())
    with pytest.raises(StoreError, match="without a clip record"):
        store.append(*rows(3, np.float32), clips_done=[4])
    store.append(*rows(3, np.float32), clips_done=[4], clip_records={4: record(4)})
    with pytest.raises(StoreError, match="clip 4 is already done"):
        store.append(*rows(3, np.float32), clips_done=[4])
    with pytest.raises(StoreError, match="n_frames"):
        store.append(*rows(3, np.float32), clip_records={5: {"path": "x.wav"}})
    assert store.num_rows == 3


def test_reopen_resumes_and_overwrites_uncommitted_rows(tmp_path, monkeypatch):
    path = tmp_path / "s"
    store = create_store(path, meta())
    acts, clip, frame = fill(store, [1500], np.float32)
    store.append(*rows(0, np.float32), clips_done=[7], clip_records={7: record(7)})

    # crash after the data is written but before the manifest is replaced
    def crash(manifest):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        store.append(*rows(1200, np.float32, seed=9), clips_done=[8], clip_records={8: record(8)})
    monkeypatch.undo()

    resumed = create_store(path, meta())  # same meta: opens the existing store
    assert resumed.num_rows == 1500
    assert resumed.clips_done == {7}
    assert resumed._arrays["acts"].shape[0] == 1500  # the uncommitted rows were trimmed
    new = rows(600, np.float32, seed=3)
    resumed.append(*new)
    assert resumed.num_rows == 2100
    np.testing.assert_array_equal(resumed.read_rows(0, 1500), acts)
    np.testing.assert_array_equal(resumed.read_rows(1500, 2100), new[0])
    c, f = resumed.read_clip_frame(1500, 2100)
    np.testing.assert_array_equal(c, new[1])
    np.testing.assert_array_equal(f, new[2])
    assert open_store(path, meta=meta()).num_rows == 2100


@pytest.mark.parametrize(
    "change, named",
    [
        ({"layer": 3}, "layer 2 != 3"),
        ({"encoder": "hubert-base"}, "encoder 'whisper-tiny.en' != 'hubert-base'"),
        ({"d": 16}, "d 8 != 16"),
        ({"dtype": "bfloat16"}, "dtype 'float32' != 'bfloat16'"),
    ],
)
def test_refuses_other_meta(tmp_path, change, named):
    path = tmp_path / "s"
    create_store(path, meta()).append(*rows(4, np.float32))
    other = dataclasses.replace(meta(), **change)
    for fn in (lambda: create_store(path, other), lambda: open_store(path, meta=other)):
        with pytest.raises(StoreError) as e:
            fn()
        assert str(path) in str(e.value) and named in str(e.value)
    assert open_store(path).num_rows == 4  # untouched


def test_refuses_other_version(tmp_path):
    path = tmp_path / "s"
    create_store(path, meta())
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = STORE_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(m))
    for fn in (lambda: create_store(path, meta()), lambda: open_store(path)):
        with pytest.raises(StoreError, match=f"format version {STORE_VERSION + 1}") as e:
            fn()
        assert str(path / "manifest.json") in str(e.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"format_version": 1}'])
def test_corrupt_manifest_names_the_file(tmp_path, text):
    path = tmp_path / "s"
    create_store(path, meta())
    (path / "manifest.json").write_text(text)
    with pytest.raises(StoreError, match="corrupt manifest") as e:
        open_store(path)
    assert str(path / "manifest.json") in str(e.value)


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(StoreError) as e:
        open_store(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "manifest.json") in str(e.value)


def test_wrong_shapes_refused(tmp_path):
    store = create_store(tmp_path / "s", meta())
    acts, clip, frame = rows(5, np.float32, d=D + 1)
    with pytest.raises(StoreError, match=r"expected acts of shape \(n, 8\), got \(5, 9\)"):
        store.append(acts, clip, frame)
    acts, clip, frame = rows(5, np.float32)
    with pytest.raises(StoreError, match=r"expected acts of shape \(n, 8\), got \(40,\)"):
        store.append(acts.reshape(-1), clip, frame)
    with pytest.raises(StoreError, match=r"expected clip of shape \(5,\), got \(4,\)"):
        store.append(acts, clip[:4], frame)
    with pytest.raises(StoreError, match="integer frame"):
        store.append(acts, clip, frame.astype(np.float32))
    assert store.num_rows == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_non_finite_rows_refused(tmp_path, dtype):
    store = create_store(tmp_path / "s", meta(np.dtype(dtype).name))
    acts, clip, frame = rows(6, dtype)
    acts[2, 3] = np.nan
    acts[4, 0] = -np.inf
    assert finite_rows(acts).tolist() == [True, True, False, True, False, True]
    with pytest.raises(StoreError, match="2 non-finite rows"):
        store.append(acts, clip, frame)
    assert store.num_rows == 0
    keep = finite_rows(acts)
    store.append(acts[keep], clip[keep], frame[keep])
    assert store.num_rows == 4


def test_overflow_on_cast_is_non_finite(tmp_path):
    store = create_store(tmp_path / "s", meta("float16"))
    acts, clip, frame = rows(3, np.float32)
    acts[1, 1] = 1e6  # beyond float16
    with pytest.raises(StoreError, match="non-finite rows as float16"):
        store.append(acts, clip, frame)


def test_read_only_and_pickle(tmp_path):
    store = create_store(tmp_path / "s", meta())
    acts, _, _ = fill(store, [50], np.float32)
    reader = pickle.loads(pickle.dumps(store))
    assert reader.read_only and reader.num_rows == 50
    np.testing.assert_array_equal(reader.read_rows(0, 50), acts)
    with pytest.raises(StoreError, match="read-only"):
        reader.append(*rows(1, np.float32))
    store.append(*rows(10, np.float32))
    reader.refresh()
    assert reader.num_rows == 60


def test_bad_meta_refused(tmp_path):
    with pytest.raises(StoreError, match="dtype"):
        meta("int8")
    with pytest.raises(StoreError, match="compression"):
        create_store(tmp_path / "s", meta(), compression="gzip")
    assert not (tmp_path / "s").exists()


def test_read_blocks_equals_the_slices(tmp_path):
    from jaxsae.store import StoreMeta, create_store

    meta = StoreMeta("e", "r", 1, "h", 16000, 50.0, "float32", 4)
    store = create_store(tmp_path / "s", meta, durable=False)
    acts = np.random.default_rng(0).standard_normal((3000, 4)).astype(np.float32)
    ids = np.arange(3000, dtype=np.int32)
    store.append(acts, ids, ids)
    got = store.read_blocks([2, 0, 1])
    np.testing.assert_array_equal(got, np.concatenate([acts[2048:], acts[:1024], acts[1024:2048]]))
