"""The activation store: one directory per (model, layer), written only through this module.

Layout of a store directory:
    acts/          zarr v3 array [N, d], bfloat16 | float16 | float32, chunks [1024, d]
    clip/          zarr v3 array [N] int32, the clip id of each row (chunks [1024])
    frame/         zarr v3 array [N] int32, the frame index of each row inside its clip
    manifest.json  what the arrays hold; `rows_written` is the truth about N

Rows are appended at the end; the manifest is replaced atomically only after the rows are on disk, so a
crash leaves a manifest that describes complete data. Rows past `rows_written` (from an append that
never committed) are ignored and overwritten. One writer per store, enforced by a lock file (`.lock`,
see jaxsae.lock) held while a writable handle is open; any number of readers. A failed write (a full
disk) raises StoreError naming the store and leaves the committed rows as they were.
numpy, ml_dtypes, tensorstore and the standard library only (no torch, no jax).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from jaxsae import lock

STORE_VERSION = 1
CHUNK_ROWS = 1024
MANIFEST = "manifest.json"
DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
_ARRAYS = ("acts", "clip", "frame")
_INT32 = np.iinfo(np.int32)
_EXPONENT_BITS = {DTYPES["bfloat16"]: 0x7F80, DTYPES["float16"]: 0x7C00}
_WRITER = "store writer"  # names the lock holder in LockError messages


class StoreError(ValueError):
    """An unusable store or a bad write; the message names the path and what is wrong."""


@dataclass(frozen=True)
class StoreMeta:
    """The fixed description of a store; two stores with different meta never mix.

    `layer` is 1-based (the output of block `layer`); `dtype` is one of bfloat16, float16, float32;
    `d` is the width of a row; `frame_rate` is frames per second of audio.
    """

    encoder: str
    revision: str
    layer: int
    hook: str
    sample_rate: int
    frame_rate: float
    dtype: str
    d: int

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreError(f"dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if int(self.d) <= 0:
            raise StoreError(f"d must be positive, got {self.d}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> StoreMeta:
        return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})


def finite_rows(acts: np.ndarray) -> np.ndarray:
    """Bool [n]: True where every value of row i of `acts` [n, d] is finite (any float dtype)."""
    a = np.asarray(acts)
    axes = tuple(range(1, a.ndim))
    exponent = _EXPONENT_BITS.get(a.dtype)
    if exponent is None:
        return np.isfinite(a).all(axis=axes)
    return ~((a.view(np.uint16) & exponent) == exponent).any(axis=axes)  # all-ones exponent: inf or nan


def meta_differences(stored: StoreMeta, given: StoreMeta) -> list[str]:
    """'field stored != given' for each field where the two metas differ."""
    out = []
    for f in dataclasses.fields(StoreMeta):
        a, b = getattr(stored, f.name), getattr(given, f.name)
        if a != b:
            out.append(f"{f.name} {a!r} != {b!r}")
    return out


# --- files -------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj: dict[str, Any], durable: bool) -> None:
    """Writes `obj` to a temp file beside `path`, fsyncs it, renames it over `path`, fsyncs the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file behind
        raise
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the store at `path`; StoreError naming the file if it is missing or corrupt."""
    file = path / MANIFEST
    try:
        m = json.loads(file.read_text())
    except FileNotFoundError:
        raise StoreError(f"{file}: no store manifest here") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{file}: corrupt manifest ({e})") from None
    if not isinstance(m, dict):
        raise StoreError(f"{file}: corrupt manifest (not a JSON object)")
    if m.get("format_version") != STORE_VERSION:
        raise StoreError(
            f"{file}: format version {m.get('format_version')!r}, this code reads version {STORE_VERSION}"
        )
    missing = [k for k in _new_manifest_keys() if k not in m]
    if missing:
        raise StoreError(f"{file}: corrupt manifest (missing {', '.join(missing)})")
    try:
        StoreMeta.from_json(m)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{file}: corrupt manifest ({e})") from None
    return m


def _new_manifest(meta: StoreMeta, compression: str | None) -> dict[str, Any]:
    return {
        "format_version": STORE_VERSION,
        **meta.to_json(),
        "chunk_rows": CHUNK_ROWS,
        "compression": compression,
        "rows_written": 0,
        "clips_done": [],
        "clips": {},
        "failures": [],
        "extra": {},
    }


def _new_manifest_keys() -> list[str]:
    return list(_new_manifest(StoreMeta("", "", 0, "", 0, 0.0, "float32", 1), None))


# --- tensorstore arrays ------------------------------------------------------------------------------


def _codecs(compression: str | None) -> list[dict[str, Any]]:
    """Zarr v3 codecs, given explicitly: without them tensorstore 0.1.86 picks a sharded layout with
    one-row inner chunks (a per-row index and checksum) that reads far slower."""
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 3, "checksum": False}})
    elif compression is not None:
        raise StoreError(f"compression {compression!r} is not None or 'zstd'")
    return codecs


def _array_spec(path: Path, name: str, meta: StoreMeta, compression: str | None) -> dict[str, Any]:
    shape, chunks, dtype = [0], [CHUNK_ROWS], "int32"
    if name == "acts":
        shape, chunks, dtype = [0, meta.d], [CHUNK_ROWS, meta.d], meta.dtype
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path / name)},
        "metadata": {
            "shape": shape,
            "data_type": dtype,
            "codecs": _codecs(compression),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
        },
    }


def _context(durable: bool) -> ts.Context:
    return ts.Context({"file_io_sync": durable})


def _open_array(path: Path, name: str, ctx: ts.Context, read_only: bool) -> ts.TensorStore:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
    try:
        return ts.open(spec, open=True, read=True, write=not read_only, context=ctx).result()
    except ValueError as e:
        raise StoreError(f"{path / name}: cannot open array ({e})") from None


# --- the store ---------------------------------------------------------------------------------------


class ActivationStore:
    """A store directory opened for reading, and for appending unless `read_only`.

    Get one from `create_store` or `open_store`. Reads return the stored dtype (ml_dtypes.bfloat16
    numpy arrays for bfloat16 stores); the caller casts.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], *, read_only: bool, durable: bool) -> None:
        self.path = path
        self.read_only = read_only
        self.durable = durable
        self._m = manifest
        self.meta = StoreMeta.from_json(manifest)
        self._lease = None if read_only else lock.acquire(path, _WRITER)
        self._ctx = _context(durable)
        self._arrays = {n: _open_array(path, n, self._ctx, read_only) for n in _ARRAYS}
        self._check_arrays()

    def _check_arrays(self) -> None:
        acts = self._arrays["acts"]
        if acts.shape[1] != self.d or acts.dtype.numpy_dtype != self.dtype:
            raise StoreError(
                f"{self.path / 'acts'}: array is {acts.dtype.name} {acts.shape}, "
                f"manifest says {self.meta.dtype} [N, {self.d}]"
            )
        for n, a in self._arrays.items():
            if a.shape[0] < self.num_rows:
                raise StoreError(f"{self.path / n}: {a.shape[0]} rows, manifest says {self.num_rows}")

    def __getstate__(self) -> dict[str, Any]:
        """Pickles as a path: the copy re-opens the store read-only (for loader worker processes)."""
        return {"path": str(self.path), "durable": self.durable}

    def __setstate__(self, state: dict[str, Any]) -> None:
        path = Path(state["path"])
        self.__init__(path, _read_manifest(path), read_only=True, durable=state["durable"])

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"ActivationStore({str(self.path)!r}, {m.encoder} layer {m.layer}, {self.num_rows} rows "
            f"x {m.d} {m.dtype})"
        )

    # --- what is there

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as a dict (clip record keys are strings of the clip ids)."""
        return json.loads(json.dumps(self._m))

    @property
    def num_rows(self) -> int:
        """Rows committed (the manifest's rows_written)."""
        return int(self._m["rows_written"])

    @property
    def d(self) -> int:
        return int(self.meta.d)

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of stored rows (ml_dtypes.bfloat16 for bfloat16 stores)."""
        return DTYPES[self.meta.dtype]

    @property
    def clips_done(self) -> frozenset[int]:
        """Ids of the clips whose rows are all committed."""
        return frozenset(self._m["clips_done"])

    def num_blocks(self, block_rows: int = CHUNK_ROWS) -> int:
        """Blocks of `block_rows` rows covering num_rows (the last one may be short)."""
        return math.ceil(self.num_rows / block_rows)

    def close(self) -> None:
        """Gives back the writer's lock (reads still work; further writes are refused)."""
        if self._lease is not None:
            self._lease.release()
        self.read_only = True

    def refresh(self) -> None:
        """Re-reads the manifest and re-opens the arrays (a reader following a live writer)."""
        self.__init__(self.path, _read_manifest(self.path), read_only=self.read_only, durable=self.durable)

    # --- reading

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"{self.path}: rows [{start}, {stop}) outside [0, {self.num_rows})")

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Acts [stop - start, d] in the stored dtype."""
        self._check_range(start, stop)
        return self._arrays["acts"][start:stop].read().result()

    def read_blocks(self, blocks, block_rows: int = CHUNK_ROWS) -> np.ndarray:
        """Acts of the aligned blocks with ids `blocks`, concatenated in that order: [≤ len·block_rows, d]
        in the stored dtype. The reads are issued together and run concurrently."""
        futures = []
        for b in blocks:
            start = int(b) * block_rows
            stop = min(start + block_rows, self.num_rows)
            self._check_range(start, stop)
            futures.append(self._arrays["acts"][start:stop].read())
        return np.concatenate([f.result() for f in futures])

    def read_clip_frame(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(clip, frame), each int32 [stop - start]."""
        self._check_range(start, stop)
        futs = [self._arrays[n][start:stop].read() for n in ("clip", "frame")]
        return futs[0].result(), futs[1].result()

    def read_block(self, i: int, block_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block i: rows [i * block_rows, min((i + 1) * block_rows, num_rows)) as (acts [b, d] stored
        dtype, clip [b] int32, frame [b] int32). Chunk-aligned, hence fast, when block_rows is a
        multiple of 1024."""
        if not 0 <= i < self.num_blocks(block_rows):
            raise IndexError(f"{self.path}: block {i} outside [0, {self.num_blocks(block_rows)})")
        start = i * block_rows
        stop = min(start + block_rows, self.num_rows)
        futs = [self._arrays[n][start:stop].read() for n in _ARRAYS]
        acts, clip, frame = (f.result() for f in futs)
        return acts, clip, frame

    # --- writing

    def _commit(self, manifest: dict[str, Any]) -> None:
        with self._io("commit the manifest"):
            _write_json_atomic(self.path / MANIFEST, manifest, self.durable)
        self._m = manifest

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Turns a failed write (OSError, or tensorstore's ValueError: a full disk, a lost mount) into
        one StoreError line naming the store; nothing committed is touched."""
        try:
            yield
        except StoreError:
            raise
        except (OSError, ValueError) as e:
            committed = f"the {self.num_rows} rows committed before are intact"
            raise StoreError(f"{self.path}: cannot {what} ({_reason(e)}); {committed}") from None

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise StoreError(f"{self.path}: opened read-only, cannot {what}")

    def _validate_rows(self, acts: np.ndarray, clip: np.ndarray, frame: np.ndarray) -> tuple[np.ndarray, ...]:
        """The three arrays in stored dtypes, or StoreError naming what is wrong."""
        acts = np.asarray(acts)
        if acts.ndim != 2 or acts.shape[1] != self.d:
            raise StoreError(f"{self.path}: append expected acts of shape (n, {self.d}), got {acts.shape}")
        if not (np.issubdtype(acts.dtype, np.floating) or acts.dtype == DTYPES["bfloat16"]):
            raise StoreError(f"{self.path}: append expected float acts, got {acts.dtype}")
        with np.errstate(over="ignore"):  # overflow becomes inf, refused just below
            acts = acts.astype(self.dtype, copy=False)
        bad = ~finite_rows(acts)
        if bad.any():
            raise StoreError(
                f"{self.path}: {int(bad.sum())} non-finite rows as {self.meta.dtype} "
                f"(first: row {int(np.argmax(bad))}); filter them with finite_rows()"
            )
        ints = [_as_int32(self.path, name, a, len(acts)) for name, a in (("clip", clip), ("frame", frame))]
        return acts, ints[0], ints[1]

    def _grow(self, rows: int) -> None:
        """Makes each array at least `rows` long (a metadata write; absent chunks cost nothing)."""
        futs = {
            n: a.resize(exclusive_max=[rows] + [None] * (a.rank - 1), expand_only=True)
            for n, a in self._arrays.items()
            if a.shape[0] < rows
        }
        for n, f in futs.items():
            self._arrays[n] = f.result()

    def _write_rows(self, start: int, arrays: tuple[np.ndarray, ...]) -> None:
        stop = start + len(arrays[0])
        self._grow(stop)
        futs = [self._arrays[n][start:stop].write(a) for n, a in zip(_ARRAYS, arrays, strict=True)]
        for f in futs:
            f.result()

    def append(
        self,
        acts: np.ndarray,
        clip: np.ndarray,
        frame: np.ndarray,
        clips_done: list[int] | tuple[int, ...] = (),
        clip_records: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        """Appends rows at the end, then commits the manifest.

        acts [n, d] float (cast to the stored dtype; every row must be finite after the cast);
        clip [n] and frame [n] integer, stored as int32. `clips_done`: ids of the clips whose rows are
        now all written (each done once, each with a record, given here or earlier); `clip_records`:
        id -> {"path": str, "labels": dict, "n_frames": int}. n may be 0 (records only).
        """
        self._writable("append")
        arrays = self._validate_rows(acts, clip, frame)
        manifest = self._updated_manifest(len(arrays[0]), list(clips_done), clip_records or {})
        with self._io(f"write rows {self.num_rows}..{self.num_rows + len(arrays[0])}"):
            self._write_rows(self.num_rows, arrays)
        self._commit(manifest)

    def _updated_manifest(
        self, n: int, done: list[int], records: dict[int, dict[str, Any]]
    ) -> dict[str, Any]:
        """The manifest after an append of n rows that finishes `done`; StoreError if they do not fit."""
        clips = dict(self._m["clips"])
        for cid, rec in records.items():
            clips[str(_clip_id(self.path, cid))] = _check_record(self.path, cid, rec)
        done = [_clip_id(self.path, c) for c in done]
        seen = set(self._m["clips_done"])
        for c in done:
            if c in seen:
                raise StoreError(f"{self.path}: clip {c} is already done")
            if str(c) not in clips:
                raise StoreError(f"{self.path}: clip {c} marked done without a clip record")
            seen.add(c)
        return {
            **self._m,
            "rows_written": self.num_rows + n,
            "clips_done": self._m["clips_done"] + done,
            "clips": clips,
        }

    def record_failure(self, path: str | os.PathLike, reason: str) -> None:
        """Notes a source file that could not be exported, with why."""
        self._writable("record a failure")
        failures = self._m["failures"] + [{"path": str(path), "reason": str(reason)}]
        self._commit({**self._m, "failures": failures})

    def set_extra(self, key: str, value: Any) -> None:
        """Stores a JSON-serialisable `value` under manifest["extra"][key]."""
        self._writable("set extra")
        self._commit({**self._m, "extra": {**self._m["extra"], key: value}})

    def trim(self) -> None:
        """Shrinks the arrays to num_rows, deleting rows of appends that never committed."""
        self._writable("trim")
        n = self.num_rows
        with self._io("trim uncommitted rows"):
            futs = {
                k: a.resize(exclusive_max=[n] + [None] * (a.rank - 1), shrink_only=True)
                for k, a in self._arrays.items()
                if a.shape[0] > n
            }
            for k, f in futs.items():
                self._arrays[k] = f.result()


def _reason(e: BaseException) -> str:
    """Why a write failed, on one line: "No space left on device: <file>" for a full disk (an OSError, or
    tensorstore's RESOURCE_EXHAUSTED error), else the error's text (at most 300 characters)."""
    text = " ".join(str(e).split())
    if getattr(e, "errno", None) == errno.ENOSPC or "os_error_code='28'" in text:
        found = re.search(r'writing local file "([^"]+)"', text)
        file = getattr(e, "filename", None) or (found.group(1) if found else None)
        return f"No space left on device: {file}" if file else "No space left on device"
    return text[:300]


def _clip_id(path: Path, c: Any) -> int:
    if isinstance(c, str) and c.lstrip("-").isdigit():
        c = int(c)
    if not isinstance(c, int | np.integer) or not _INT32.min <= int(c) <= _INT32.max:
        raise StoreError(f"{path}: clip id {c!r} is not an int32")
    return int(c)


def _check_record(path: Path, cid: Any, rec: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(rec, dict) or "path" not in rec or "n_frames" not in rec:
        raise StoreError(f"{path}: record of clip {cid!r} needs 'path' and 'n_frames', got {rec!r}")
    return {"labels": {}, **rec, "path": str(rec["path"]), "n_frames": int(rec["n_frames"])}


def _as_int32(path: Path, name: str, a: np.ndarray, n: int) -> np.ndarray:
    a = np.asarray(a)
    if a.shape != (n,):
        raise StoreError(f"{path}: append expected {name} of shape ({n},), got {a.shape}")
    if n and not np.issubdtype(a.dtype, np.integer):
        raise StoreError(f"{path}: append expected integer {name}, got {a.dtype}")
    if n and (a.min() < _INT32.min or a.max() > _INT32.max):
        raise StoreError(f"{path}: {name} values outside int32")
    return a.astype(np.int32, copy=False)


# --- entry points ------------------------------------------------------------------------------------


def _check_meta(path: Path, manifest: dict[str, Any], meta: StoreMeta) -> None:
    diffs = meta_differences(StoreMeta.from_json(manifest), meta)
    if diffs:
        raise StoreError(f"{path} holds a different store (stored != given): {'; '.join(diffs)}")


def create_store(
    path: str | os.PathLike, meta: StoreMeta, *, compression: str | None = None, durable: bool = True
) -> ActivationStore:
    """A new empty store at `path`, or the existing one there if its meta equals `meta` (resume).

    StoreError if `path` holds a store of another meta or format version; LockError if another
    process is writing it. `compression`: None or
    "zstd" (smaller, 2-3x slower reads). `durable=False` skips fsync: writes survive a killed process
    but not a power cut, for 2-4x faster appends.
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        return open_store(path, meta=meta, durable=durable)
    _codecs(compression)  # validates before anything is created
    with lock.acquire(path, _WRITER):  # creates the folder; a second creator stops here
        if (path / MANIFEST).exists():  # another process created it meanwhile
            return open_store(path, meta=meta, durable=durable)
        try:
            _create_arrays(path, meta, compression, durable)
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: cannot create the store ({_reason(e)})") from None
        return ActivationStore(path, _read_manifest(path), read_only=False, durable=durable)


def _create_arrays(path: Path, meta: StoreMeta, compression: str | None, durable: bool) -> None:
    ctx = _context(durable)
    futs = [
        ts.open(_array_spec(path, n, meta, compression), create=True, delete_existing=True, context=ctx)
        for n in _ARRAYS
    ]
    for f in futs:
        f.result()
    manifest = _new_manifest(meta, compression)
    _write_json_atomic(path / MANIFEST, manifest, durable)  # last: a store without it does not exist


def open_store(
    path: str | os.PathLike, *, meta: StoreMeta | None = None, read_only: bool = False, durable: bool = True
) -> ActivationStore:
    """The existing store at `path`; appends continue at rows_written, overwriting any rows past it.

    StoreError if the manifest is missing or corrupt, its format version differs, or (when `meta` is
    given) it holds a store of another meta. A writable open takes the writer's lock (LockError if
    another process holds it) and trims uncommitted rows from the arrays.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if meta is not None:
        _check_meta(path, manifest, meta)
    store = ActivationStore(path, manifest, read_only=read_only, durable=durable)
    if not read_only:
        store.trim()
    return store
