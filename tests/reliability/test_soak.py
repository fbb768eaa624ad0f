"""A soak: a small SAE trained on an activation store for many steps with a checkpoint every 100, killed
with -9 five times at seeded steps and resumed each time, ends with the parameters and metrics of a straight
run; the resident memory of the straight run is flat (RSS after the first 100 steps and at the end).

The demo store holds real Whisper activations (`jaxsae demo`, minutes to build); here a store of the same
kind (bfloat16, 1024-row chunks, clip and frame ids) is written with the real store writer from planted rows
(a known dictionary of 512 atoms in R^64), so the SAE has structure to learn. The full 2000-step soak is
marked slow (`pytest -m slow tests/reliability/test_soak.py`); with `JAXSAE_SOAK_STORE=runs/demo/store` it
soaks on that store (the demo's Whisper activations) instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jaxsae.store import StoreMeta, create_store
from jaxsae.synthetic import planted_dictionary, planted_rows

from .common import assert_same_params, killed, latest, metrics, run

D, F, ROWS = 64, 256, 64 * 1024


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, int]:
    """(store folder, d_in): $JAXSAE_SOAK_STORE if set, else a one-layer folder of ROWS planted rows
    [ROWS, 64] as bfloat16, written in 8 appends."""
    if os.environ.get("JAXSAE_SOAK_STORE"):
        given = Path(os.environ["JAXSAE_SOAK_STORE"])
        meta = json.loads(next(given.glob("layer_*/manifest.json")).read_text())
        return given, int(meta["d"])
    root = tmp_path_factory.mktemp("soak") / "store"
    rows = planted_rows(planted_dictionary(D, 512, 0), ROWS, 8, 0.01, 0)
    s = create_store(
        root / "layer_3", StoreMeta("planted", "seed0", 3, "synthetic", 16000, 50.0, "bfloat16", D)
    )
    for i, part in enumerate(np.array_split(np.arange(ROWS), 8)):
        s.append(rows[part], np.full(len(part), i, np.int32), part.astype(np.int32))
    s.close()
    return root, D


def soak_args(store: tuple[Path, int], out: Path, steps: int, every: int, *extra: str) -> list[str]:
    return [
        "train", f"--data.source={store[0]}", f"--sae.d_in={store[1]}", f"--sae.d_sae={F}",
        "--sae.architecture=batchtopk", "--sae.k=16", "--train.batch_size=256", f"--train.steps={steps}",
        "--train.log_every=50", f"--train.checkpoint_every={every}", "--train.lr=1e-3", "--mesh.data=1",
        "--train.progress=false", "--train.dead_tokens=100000",
        f"--train.out_dir={out}", *extra,
    ]  # fmt: skip


@pytest.mark.slow  # about 7 runs of 2000 steps; the default run's kill chains cover kill and resume
@pytest.mark.parametrize("steps, every", [(2000, 100)])
def test_soak_kill_resume_equals_straight_and_memory_is_flat(store, tmp_path, steps, every):
    counts = tmp_path / "counts.json"
    sample = {"FAULT_RSS_EVERY": str(every), "FAULT_COUNTS_OUT": str(counts)}
    straight = run(soak_args(store, tmp_path / "straight", steps, every), sample)
    assert straight.returncode == 0, straight.stderr[-3000:]
    rss = json.loads(counts.read_text())["rss_kb"]  # at every checkpoint interval
    targets = sorted(
        np.random.default_rng(3).choice(np.arange(every + 10, steps - 10), 5, replace=False).tolist()
    )
    out = tmp_path / "killed"
    for target in targets:
        env = {"FAULT_KILL_STEP": str(target - latest(out))}
        proc = run(soak_args(store, out, steps, every, "--resume"), env)
        assert killed(proc), (target, proc.returncode, proc.stderr[-3000:])
    final = run(soak_args(store, out, steps, every, "--resume"))
    assert final.returncode == 0, final.stderr[-3000:]
    assert assert_same_params(tmp_path / "straight", out) == steps
    assert metrics(out) == metrics(tmp_path / "straight")
    start, end = rss[1], rss[-1]  # after the first checkpoint (compiled, orbax's threads up), at the end
    print(
        f"\nsoak {steps} steps, kills at {targets}: params equal, steps lost 0; RSS of the straight run "
        f"{start / 1024:.0f} MB at step {2 * every}, {end / 1024:.0f} MB at step {steps}"
        f" (every {every}: {[round(r / 1024) for r in rss]})"
    )
    assert end - start < max(0.1 * start, 64 * 1024), rss  # flat: no growth with the number of steps
