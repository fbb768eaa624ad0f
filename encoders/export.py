"""Exporting a PyTorch audio encoder's layer activations into activation stores, one per layer.

Layout of `out`:
    out/layer_<name>/     a jaxsae.store store per layer ("layer_2", or "layer_encoder" for EnCodec)

How rows reach a store, and why:
  1. The clip list (a folder scanned recursively in sorted order, or a JSONL/CSV manifest) numbers clips
     0..N-1. A seeded permutation deals them into fixed groups of about `shuffle_buffer_rows` rows,
     estimated from file headers, so a group mixes clips from all over the corpus (and all its domains).
  2. A group's clips are loaded (the next group's in a background thread), bucketed by length into
     batches the model allows, run once with hooks on every wanted layer, and trimmed of padding.
  3. Its rows are shuffled with an RNG seeded by (seed, group index) - the same permutation for every
     layer, and a frame non-finite in any layer is dropped from all of them, so row i of each layer's
     store is the same frame - and appended with the group's clip records and clips_done in one atomic
     store commit.
A resumed run (same command after a kill at any moment) recomputes the plan, checks it against the one
saved in each store, skips the groups a store has committed and redoes the one in flight: the finished
stores equal those of an uninterrupted run, row for row. Bad files are recorded in each store's failures
(before the group's commit; a redo does not repeat them) and the run goes on; non-finite rows are dropped
and counted in their clip's record ("nonfinite_rows") and in ExportResult.nonfinite_rows. Each store is
locked for the run (a second export into it stops with LockError); a full disk stops it with a StoreError
naming the store, its committed rows intact (free space and re-run to resume).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encoders.audio_io import AUDIO_SUFFIXES, AudioError, estimate_samples, load_audio
from encoders.models import EQUAL_LENGTH, Encoder, load_encoder
from jaxsae.store import MANIFEST, ActivationStore, StoreError, StoreMeta, create_store, finite_rows

EXPORT_KEY = "export"  # the store manifest's extra key holding the export plan


@dataclass(frozen=True)
class Clip:
    """One source file: `id` is its int32 clip id in the stores, `labels` go into its clip record."""

    id: int
    path: str
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What a finished export holds. rows / nonfinite_rows / clips_done per layer name."""

    stores: dict[str, Path]
    clips_total: int
    clips_done: dict[str, int]
    clips_failed: dict[str, int]
    rows: dict[str, int]
    nonfinite_rows: dict[str, int]
    frames_computed: int  # in this call (0 when everything was already done)
    seconds: float


# ----------------------------------------------------------------------------------------- clip lists
def read_clips(audio: str | os.PathLike) -> list[Clip]:
    """Clips of a folder (audio files found recursively, sorted by relative path, labels {"folder": ...})
    or of a manifest: .jsonl (one object per line) or .csv, each with a `path` (relative to the manifest's
    folder unless absolute); every other key, `id` included, becomes a label. AudioError if unusable."""
    src = Path(audio)
    if src.is_dir():
        return _scan_folder(src)
    if not src.is_file():
        raise AudioError(f"{src}: no such folder or manifest")
    rows = _csv_rows(src) if src.suffix.lower() == ".csv" else _jsonl_rows(src)
    clips = []
    for i, (line, row) in enumerate(rows):
        if not isinstance(row, dict) or not row.get("path"):
            raise AudioError(f"{src}:{line}: a manifest row needs a 'path'")
        path = Path(str(row["path"]))
        path = path if path.is_absolute() else src.parent / path
        clips.append(Clip(i, str(path), {k: v for k, v in row.items() if k != "path"}))
    if not clips:
        raise AudioError(f"{src}: manifest lists no clips")
    return clips


def _scan_folder(root: Path) -> list[Clip]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise AudioError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    out = []
    for i, p in enumerate(files):
        folder = p.parent.relative_to(root).as_posix()
        out.append(Clip(i, str(p), {"folder": folder} if folder != "." else {}))
    return out


def _jsonl_rows(src: Path) -> list[tuple[int, Any]]:
    rows = []
    for n, line in enumerate(src.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except ValueError as e:
                raise AudioError(f"{src}:{n}: not JSON ({e})") from None
    return rows


def _csv_rows(src: Path) -> list[tuple[int, Any]]:
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise AudioError(f"{src}: CSV manifest has no 'path' column")
        return [(n, dict(r)) for n, r in enumerate(reader, start=2)]


# ------------------------------------------------------------------------------------------ the plan
def plan_groups(est_frames: list[int], rows_per_group: int, seed: int) -> list[list[int]]:
    """Clip indices dealt into groups: a permutation seeded by `seed`, cut greedily once a group's
    estimated frames reach rows_per_group (so a group holds under rows_per_group + one clip's frames)."""
    groups: list[list[int]] = [[]]
    total = 0
    for i in np.random.default_rng(seed).permutation(len(est_frames)).tolist():
        if total >= rows_per_group:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += max(est_frames[i], 1)
    return [g for g in groups if g]


def _plan_digest(clips: list[Clip], groups: list[list[int]], seed: int) -> str:
    blob = json.dumps(
        {"clips": [[c.id, c.path, c.labels] for c in clips], "groups": groups, "seed": seed},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------- the stores
class _Sink:
    """One layer's store and what it already holds (clips done, failures), to skip committed groups."""

    def __init__(self, layer: str, store: ActivationStore) -> None:
        self.layer, self.store = layer, store
        self.done = set(store.clips_done)
        self.failed = {(f["path"], f["reason"]) for f in store.manifest["failures"]}
        self.failed_paths = {p for p, _ in self.failed}

    def has(self, clips: list[Clip]) -> bool:
        """True when every clip of the group is committed or recorded as failed."""
        return all(c.id in self.done or c.path in self.failed_paths for c in clips)

    def fail(self, path: str, reason: str) -> None:
        if (path, reason) not in self.failed:  # a redone group does not record its failures twice
            self.store.record_failure(path, reason)
            self.failed.add((path, reason))
            self.failed_paths.add(path)

    def commit(self, g: _GroupRows, perm: np.ndarray, ok: np.ndarray) -> None:
        """Appends the group's rows in `perm` order, those not `ok` (bool [R] in `perm` order: finite in
        every layer) dropped and counted per clip."""
        acts, clip, frame = g.acts[self.layer][perm], g.clip[perm], g.frame[perm]
        bad = dict(zip(*np.unique(clip[~ok], return_counts=True), strict=True))
        records = {cid: {**rec, "nonfinite_rows": int(bad.get(cid, 0))} for cid, rec in g.records.items()}
        self.store.append(acts[ok], clip[ok], frame[ok], clips_done=list(g.records), clip_records=records)
        self.done.update(g.records)


def _open_sinks(enc: Encoder, layers: list[str], out: Path, dtype: str, durable: bool) -> list[_Sink]:
    """A store per layer under out/layer_<name>; StoreError if `out` is itself a store or a folder holds
    another model's / layer's store."""
    if (out / MANIFEST).exists():
        raise StoreError(f"{out} is itself an activation store; --out takes a folder for one store per layer")
    sinks: list[_Sink] = []
    for ly in layers:
        meta = StoreMeta(
            encoder=enc.name,
            revision=enc.revision,
            layer=enc.layer_index(ly),
            hook=enc.hook_name(ly),
            sample_rate=enc.sample_rate,
            frame_rate=enc.frame_rate,
            dtype=dtype,
            d=enc.dim(ly),
        )
        sinks.append(_Sink(ly, create_store(out / f"layer_{ly}", meta, durable=durable)))
    return sinks


def _check_plan(sink: _Sink, plan: dict[str, Any]) -> None:
    """Saves the plan in a fresh store; refuses a store that was started with another plan."""
    saved = sink.store.manifest["extra"].get(EXPORT_KEY)
    if saved is None:
        m = sink.store.manifest
        if m["rows_written"] or m["clips_done"] or m["failures"]:
            raise StoreError(f"{sink.store.path}: holds rows that export_activations did not plan")
        sink.store.set_extra(EXPORT_KEY, plan)
    elif saved.get("plan") != plan["plan"]:
        diffs = [
            f"{k} {saved.get(k)!r} != {plan[k]!r}"
            for k in ("n_clips", "seed", "shuffle_buffer_rows")
            if saved.get(k) != plan[k]
        ]
        raise StoreError(
            f"{sink.store.path}: was started from another clip list or settings "
            f"({'; '.join(diffs) or 'the clips or their lengths changed'}); "
            "resume with the same inputs or use a new --out"
        )


# ------------------------------------------------------------------------------------- one group
@dataclass
class _GroupRows:
    """A group's rows in clip order: acts {layer: [R, d] store dtype}, clip and frame int32 [R]."""

    acts: dict[str, np.ndarray]
    clip: np.ndarray
    frame: np.ndarray
    records: dict[int, dict[str, Any]]
    failures: list[tuple[str, str]]


@dataclass
class _Segment:
    """A window of a clip that runs as one example: frames [offset, offset + n_frames) of the clip."""

    clip: int  # index into the group's kept clips
    wave: np.ndarray
    offset: int
    last: bool


def _load_group(clips: list[Clip], sr: int) -> list[np.ndarray | AudioError]:
    out: list[np.ndarray | AudioError] = []
    for c in clips:
        try:
            out.append(load_audio(c.path, sr))
        except AudioError as e:
            out.append(e)
    return out


def _segments(enc: Encoder, waves: list[np.ndarray]) -> list[_Segment]:
    """Each wave cut into windows of enc.segment_samples (Whisper's 30 s), frame offsets running on."""
    segs = []
    for i, w in enumerate(waves):
        step = enc.segment_samples or len(w)
        offset = 0
        for s in range(0, len(w), step):
            piece = w[s : s + step]
            segs.append(_Segment(i, piece, offset, s + step >= len(w)))
            offset += enc.n_frames(len(piece))
    return segs


def _batches(enc: Encoder, segs: list[_Segment], batch_size: int) -> list[list[int]]:
    """Segment indices bucketed by length: sorted by length (little padding), cut at batch_size, and for
    EQUAL_LENGTH models also wherever the length changes (they must not see padding)."""
    order = sorted(range(len(segs)), key=lambda i: (len(segs[i].wave), i))
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        fits = b is not None and len(b) < batch_size
        if fits and enc.batching == EQUAL_LENGTH:
            fits = len(segs[b[0]].wave) == len(segs[i].wave)
        if fits:
            b.append(i)
        else:
            batches.append([i])
    return batches


def _usable(enc: Encoder, clips: list[Clip], loaded: list) -> tuple[list[Clip], list[np.ndarray], list]:
    """(clips that load and give >= 1 frame, their waves, [(path, reason)] for the rest)."""
    keep, waves, failures = [], [], []
    for c, w in zip(clips, loaded, strict=True):
        if isinstance(w, AudioError):
            failures.append((c.path, str(w)))
        elif enc.total_frames(len(w)) <= 0:
            failures.append(
                (
                    c.path,
                    f"{c.path}: too short for one frame ({len(w)} samples at "
                    f"{enc.sample_rate} Hz = {len(w) / enc.sample_rate:.4f} s)",
                )
            )
        else:
            keep.append(c)
            waves.append(w)
    return keep, waves, failures


def _run_group(
    enc: Encoder, layers: list[str], clips: list[Clip], loaded: list, batch_size: int, dtype: np.dtype, tick
) -> _GroupRows:
    """Runs the group's usable clips through the model; rows in clip order, frames in time order."""
    keep, waves, failures = _usable(enc, clips, loaded)
    segs = _segments(enc, waves)
    got: list[dict[str, np.ndarray]] = [{} for _ in segs]
    for batch in _batches(enc, segs, batch_size):
        acts = enc.activations([segs[i].wave for i in batch], layers)
        with np.errstate(over="ignore"):  # overflow gives inf: dropped and counted at commit
            for ly, per in acts.items():
                for i, a in zip(batch, per, strict=True):
                    got[i][ly] = a.astype(dtype)  # store dtype now: halves the buffer for bf16/fp16
        tick(clips=sum(segs[i].last for i in batch), frames=sum(len(a) for a in acts[layers[0]]))
    return _assemble(enc, layers, keep, waves, segs, got, failures, dtype)


def _assemble(
    enc: Encoder,
    layers: list[str],
    keep: list[Clip],
    waves: list[np.ndarray],
    segs: list[_Segment],
    got: list[dict[str, np.ndarray]],
    failures: list,
    dtype: np.dtype,
) -> _GroupRows:
    """Concatenates the segments' rows (segments are in clip order, windows in time order)."""
    counts = [len(g[layers[0]]) for g in got]
    clip = [np.full(n, keep[s.clip].id, np.int32) for s, n in zip(segs, counts, strict=True)]
    frame = [np.arange(s.offset, s.offset + n, dtype=np.int32) for s, n in zip(segs, counts, strict=True)]
    acts = {
        ly: np.concatenate([g[ly] for g in got]) if got else np.zeros((0, enc.dim(ly)), dtype)
        for ly in layers
    }
    records = {
        c.id: {
            "path": c.path,
            "labels": c.labels,
            "n_frames": enc.total_frames(len(w)),
            "duration_s": round(len(w) / enc.sample_rate, 6),
        }
        for c, w in zip(keep, waves, strict=True)
    }
    empty = np.zeros(0, np.int32)
    return _GroupRows(
        acts, np.concatenate(clip or [empty]), np.concatenate(frame or [empty]), records, failures
    )


def _commit_group(sinks: list[_Sink], g: int, clips: list[Clip], rows: _GroupRows, seed: int) -> None:
    """Shuffles group g's rows with the RNG of (seed, g) and commits them to each store that lacks them;
    failures go first, so a kill between the two leaves the group unfinished (redone, not duplicated)."""
    perm = np.random.default_rng([seed, g]).permutation(len(rows.clip))
    ok = np.logical_and.reduce([finite_rows(a) for a in rows.acts.values()])[perm]  # layers stay aligned
    for sink in sinks:
        if sink.has(clips):
            continue
        for path, reason in rows.failures:
            sink.fail(path, reason)
        if rows.records:
            sink.commit(rows, perm, ok)


# ------------------------------------------------------------------------------------------ progress
class _Progress:
    """A tqdm bar over clips (rate = clips/s, ETA) with frames/s of this run as a postfix."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=done, unit="clip", disable=not enabled, dynamic_ncols=True, desc="export"
        )
        self.frames, self.t0 = 0, time.perf_counter()

    def __call__(self, clips: int = 0, frames: int = 0) -> None:
        self.frames += frames
        rate = self.frames / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} frames/s", refresh=False)
        self.bar.update(clips)

    def close(self) -> None:
        self.bar.close()


# -------------------------------------------------------------------------------------------- entry
def export_activations(
    model: str | Encoder,
    layers: str | list,
    audio: str | os.PathLike,
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    shuffle_buffer_rows: int = 65536,
    seed: int = 0,
    dtype: str = "bfloat16",
    device: str = "cpu",
    progress: bool = True,
    durable: bool = True,
) -> ExportResult:
    """Exports `layers` ("2,4", "all", or a list) of `model` (a registry name, checkpoint folder,
    "module:callable", or a loaded Encoder) on every clip of `audio` (folder or manifest) into one store
    per layer under out/layer_<name>/, stored as `dtype`. Resumes an interrupted export of the same
    command; StoreError if `out` holds stores of another model, layer, clip list or plan settings.
    batch_size: examples per forward pass; shuffle_buffer_rows: rows per shuffled group (memory: about
    rows x d x bytes per value x layers); durable=False skips fsync (survives kill -9, not power loss).
    """
    t0 = time.perf_counter()
    clips = read_clips(audio)
    enc = model if isinstance(model, Encoder) else load_encoder(model, device)
    names = enc.parse_layers(layers)
    sinks: list[_Sink] = []
    try:  # the stores stay locked until the end, even when an error stops the run
        sinks = _open_sinks(enc, names, Path(out), dtype, durable)
        plan = _plan(enc, clips, shuffle_buffer_rows, seed, sinks, progress)
        groups = [[clips[i] for i in g] for g in plan]
        frames = _export_groups(enc, names, clips, groups, sinks, batch_size, seed, progress)
        return _result(sinks, len(clips), frames, time.perf_counter() - t0)
    finally:
        for s in sinks:
            s.store.close()


def _export_groups(
    enc: Encoder,
    names: list[str],
    clips: list[Clip],
    groups: list[list[Clip]],
    sinks: list[_Sink],
    batch_size: int,
    seed: int,
    progress: bool,
) -> int:
    """Runs and commits every group some store lacks; returns the frames computed."""
    todo = [g for g in range(len(groups)) if not all(s.has(groups[g]) for s in sinks)]
    done = len(clips) - sum(len(groups[g]) for g in todo)
    bar = _Progress(len(clips), done, progress)
    try:
        with ThreadPoolExecutor(1) as pool:  # loads the next group's audio while the model runs
            nxt: Future | None = pool.submit(_load_group, groups[todo[0]], enc.sample_rate) if todo else None
            for k, g in enumerate(todo):
                loaded = nxt.result()
                if k + 1 < len(todo):
                    nxt = pool.submit(_load_group, groups[todo[k + 1]], enc.sample_rate)
                rows = _run_group(enc, names, groups[g], loaded, batch_size, sinks[0].store.dtype, bar)
                bar(clips=len(rows.failures))
                _commit_group(sinks, g, groups[g], rows, seed)
    finally:
        bar.close()
    return bar.frames


def _plan(
    enc: Encoder, clips: list[Clip], rows_per_group: int, seed: int, sinks: list[_Sink], progress: bool
) -> list[list[int]]:
    """The groups of clip indices, from header lengths; saved in (or checked against) every store."""
    from tqdm.auto import tqdm

    if rows_per_group < 1:
        raise StoreError(f"shuffle_buffer_rows must be >= 1, got {rows_per_group}")
    est = [
        enc.total_frames(estimate_samples(c.path, enc.sample_rate))
        for c in tqdm(clips, desc="reading headers", unit="file", disable=not progress, leave=False)
    ]
    groups = plan_groups(est, rows_per_group, seed)
    plan = {
        "plan": _plan_digest(clips, groups, seed),
        "n_clips": len(clips),
        "n_groups": len(groups),
        "seed": seed,
        "shuffle_buffer_rows": rows_per_group,
    }
    for s in sinks:
        _check_plan(s, plan)
    return groups


def _result(sinks: list[_Sink], n_clips: int, frames: int, seconds: float) -> ExportResult:
    stores, done, failed, rows, bad = {}, {}, {}, {}, {}
    for s in sinks:
        m = s.store.manifest
        stores[s.layer], rows[s.layer] = s.store.path, m["rows_written"]
        done[s.layer], failed[s.layer] = len(m["clips_done"]), len(m["failures"])
        bad[s.layer] = sum(int(r.get("nonfinite_rows", 0)) for r in m["clips"].values())
    return ExportResult(stores, n_clips, done, failed, rows, bad, frames, seconds)
