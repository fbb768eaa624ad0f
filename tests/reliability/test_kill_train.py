"""kill -9 during training and during checkpoint saves, at seeded random points: every rerun resumes
(`jaxsae train --resume`), never loads a half-written checkpoint, and ends with the parameters and the
metrics of an uninterrupted run (every step logged once, same values: no step lost or repeated).

Each run is the real CLI in its own process (tests.reliability.faults): a kill at the n-th step dispatch
(the host is then anywhere in the loop, a save of the previous step usually in flight), or at the n-th
file-system event under checkpoints/ (orbax's write protocol: temp folders, metadata, commit markers,
renames, the deletion of old checkpoints).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jaxsae import checkpoint

from .common import STEPS, assert_same_params, killed, latest, metrics, run, train_args

SEED = 9


def partial_checkpoints(run_dir: Path) -> set[tuple[str, int]]:
    """(name, mtime) of the folders of checkpoints/ that are not complete checkpoints (orbax's temp
    folders of an unfinished save)."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.exists():
        return set()
    return {(p.name, p.stat().st_mtime_ns) for p in ckpts.iterdir() if not p.name.isdigit()}


def check_no_partial_checkpoint_is_listed(run_dir: Path) -> None:
    """After a kill: orbax and jaxsae list only complete checkpoints, the latest of which loads; the
    half-written ones (temp folders) are not among them."""
    ckpts = run_dir / "checkpoints"
    if not ckpts.exists():
        return
    steps = checkpoint.complete_steps(ckpts)
    mgr = checkpoint.manager(ckpts)
    try:
        assert mgr.latest_step() == (steps[-1] if steps else None)
    finally:
        mgr.close()
    if steps:
        assert checkpoint.load(run_dir).step == steps[-1]


def kill_chain(run_dir: Path, faults: list) -> dict:
    """Runs `jaxsae train --resume` once per fault, each a function of the latest complete step giving
    the fault variables (each must kill the run), then once more to the end. Returns the figures."""
    partial = 0
    for fault in faults:
        before, left = latest(run_dir), partial_checkpoints(run_dir)
        env = fault(before)
        proc = run(train_args(run_dir, STEPS, "--resume"), env)
        assert killed(proc), (env, proc.returncode, proc.stderr[-3000:])
        partial += bool(partial_checkpoints(run_dir) - left)  # this kill interrupted a save
        check_no_partial_checkpoint_is_listed(run_dir)
        assert latest(run_dir) >= before  # a kill never loses a complete checkpoint
    final = run(train_args(run_dir, STEPS, "--resume"))
    assert final.returncode == 0, final.stderr[-3000:]
    return {"kills": len(faults), "kills_mid_save": partial}


def at_step(target: int):
    """Kill when the run dispatches global step `target` (a run resumed at step s dispatches s+1 first)."""
    return lambda before: {"FAULT_KILL_STEP": str(max(target - before, 1))}


def at_event(rng: np.random.Generator, per_save: float, run_dir: Path):
    """Kill at a random file event within the next few checkpoint saves."""

    def fault(before: int) -> dict:
        span = max(int(per_save * min(4, STEPS - before) * 0.9), 1)
        return {"FAULT_DIR": str(run_dir / "checkpoints"), "FAULT_KILL_EVENT": str(rng.integers(1, span + 1))}

    return fault


def test_kill_during_training_and_during_checkpoint_saves(straight_train, tmp_path):
    """Two chains of 10 kills each, run side by side (each process is mostly single-threaded start-up):
    at seeded steps, and at seeded file events of the checkpoint saves."""
    ref, per_save = straight_train
    targets = sorted(np.random.default_rng(SEED).choice(np.arange(2, STEPS), 10, replace=False).tolist())
    at_events = [at_event(np.random.default_rng(SEED + 1), per_save, tmp_path / "saves")] * 10
    with ThreadPoolExecutor(2) as pool:
        steps = pool.submit(kill_chain, tmp_path / "steps", [at_step(t) for t in targets])
        saves = pool.submit(kill_chain, tmp_path / "saves", at_events)
        figures = {"training": steps.result(), "checkpoint saves": saves.result()}
    for run_dir in (tmp_path / "steps", tmp_path / "saves"):
        assert assert_same_params(ref, run_dir) == STEPS
        assert metrics(run_dir) == metrics(ref)  # each step logged once, with the same values: none lost
    print(f"\nkills at steps {targets}: {figures}; steps lost 0")
