"""kill -9 during `jaxsae export-activations`, at seeded random points: in a forward pass, at a file event
of a store commit (the manifest's temp file opened, or renamed over the manifest), or halfway through
writing a group's rows. Every rerun of the same command resumes; the final stores equal those of an
uninterrupted run byte for byte (no row lost or repeated).

The model is tests.reliability.tiny_encoder (loaded by the real CLI as `module:callable`): an export of
40 short clips takes about a second, most of each run is starting Python and torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxsae.store import open_store

from .common import assert_same_stores, export_args, killed, run, write_clips

SEED = 11
KINDS = {"forwards": "FAULT_KILL_FORWARD", "events": "FAULT_KILL_EVENT", "writes": "FAULT_TEAR_WRITE"}
SMALL_GROUPS = ("--shuffle-buffer-rows", "20")  # over 20 groups: each kill lands within the next two


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(audio folder, an uninterrupted export, its counts per group: forwards, events, writes)."""
    root = tmp_path_factory.mktemp("export")
    audio = write_clips(root / "audio", 40)
    ref = root / "ref"
    counts = root / "counts.json"
    env = {"FAULT_DIR": str(ref), "FAULT_COUNTS_OUT": str(counts)}
    proc = run(export_args(audio, ref, *SMALL_GROUPS), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_groups = open_store(ref / "layer_1", read_only=True).manifest["extra"]["export"]["n_groups"]
    assert n_groups >= 20
    per_group = {k: v / n_groups for k, v in json.loads(counts.read_text()).items() if k in KINDS}
    return audio, ref, per_group


def rows(out: Path, layer: str = "layer_2") -> int:
    return open_store(out / layer, read_only=True).num_rows if (out / layer / "manifest.json").exists() else 0


def test_kill_during_export_resumes_to_the_same_stores(corpus, tmp_path):
    audio, ref, per_group = corpus
    rng = np.random.default_rng(SEED)
    out = tmp_path / "out"
    kills = []
    for _ in range(10):
        kind = str(rng.choice(list(KINDS)))
        at = int(rng.integers(1, math.ceil(1.5 * per_group[kind]) + 1))
        env = {KINDS[kind]: str(at), "FAULT_DIR": str(out)}
        before = rows(out)
        proc = run(export_args(audio, out, *SMALL_GROUPS), env)
        assert killed(proc), (kind, at, proc.returncode, proc.stderr[-3000:])
        assert rows(out) >= before  # committed rows survive every kill
        for layer in ("layer_1", "layer_2"):  # what is committed reads back (a store never half-commits)
            if (out / layer / "manifest.json").exists():
                s = open_store(out / layer, read_only=True)
                assert len(s.read_rows(0, s.num_rows)) == s.num_rows
        kills.append((kind, at))
    assert rows(out) < rows(ref), "the export finished before the tenth kill"
    final = run(export_args(audio, out, *SMALL_GROUPS))
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same_stores(ref, out)
    print(f"\nexport: {len(kills)} kills {kills}; rows {rows(out)} == {rows(ref)}, rows lost 0")
