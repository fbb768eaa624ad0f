"""A full disk during export and during checkpointing: one clear error line (exit code 2) naming the path;
the rows already committed and the earlier checkpoints stay intact and loadable; with space freed, the
same command resumes to the result of an uninterrupted run.

The disk is a real tmpfs of a few MB, filled up at a chosen point by tests.reliability.faults
(FAULT_FILL_AT); where mounting is not allowed, writes under the folder fail with OSError(ENOSPC)
injected at the open call instead (FAULT_ENOSPC).
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxsae import checkpoint
from jaxsae.store import open_store

from .common import (
    STEPS,
    assert_same_params,
    assert_same_stores,
    export_args,
    is_real_disk,
    metrics,
    one_error_line,
    run,
    small_disk,
    train_args,
    write_clips,
)


@pytest.fixture(scope="module")
def export_ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk-export")
    audio = write_clips(root / "audio", 16)
    proc = run(export_args(audio, root / "ref"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return audio, root / "ref"


@pytest.mark.parametrize("fill_at", [1, 6])  # the first append (rows into an empty store), a later one
def test_full_disk_during_export(export_ref, tmp_path, fill_at):
    audio, ref = export_ref
    with small_disk(tmp_path) as (disk, env):
        out = disk / "out"
        env = {
            **env,
            "FAULT_FILL_AT": str(fill_at),
            "FAULT_FILL_FILE": str(disk / "ballast"),
            "FAULT_DIR": str(out),
        }
        line = one_error_line(run(export_args(audio, out), env))
        assert "No space left on device" in line and f"{out}/layer_" in line, line
        assert "rows committed before are intact" in line
        for layer in ("layer_1", "layer_2"):  # the committed rows are those of an uninterrupted run
            got, want = open_store(out / layer, read_only=True), open_store(ref / layer, read_only=True)
            assert got.num_rows <= want.num_rows
            np.testing.assert_array_equal(got.read_rows(0, got.num_rows), want.read_rows(0, got.num_rows))
        (disk / "ballast").unlink(missing_ok=True)  # space again: the same command resumes
        again = run(export_args(audio, out))
        assert again.returncode == 0, again.stderr[-3000:]
        assert_same_stores(ref, out)
        print(
            f"\nfull disk at export append {fill_at} ({'tmpfs' if is_real_disk(env) else 'injected'}): {line}"
        )


def test_full_disk_during_checkpointing(straight_train, tmp_path):
    ref, _ = straight_train
    with small_disk(tmp_path) as (disk, env):
        out = disk / "run"
        fill_at = 5  # the disk fills as the 5th checkpoint save starts
        fault = {"FAULT_FILL_AT": str(fill_at), "FAULT_FILL_FILE": str(disk / "ballast")}
        line = one_error_line(
            run(train_args(out, STEPS), {**env, **fault, "FAULT_DIR": str(out / "checkpoints")})
        )
        assert "No space left on device" in line, line
        steps = checkpoint.complete_steps(out / "checkpoints")
        # the save in flight when the disk filled (step fill_at - 1, async) may or may not have landed
        assert fill_at - 2 <= steps[-1] <= fill_at - 1
        assert f"last complete checkpoint: step {steps[-1]}" in line, line
        for step in steps:  # every complete checkpoint left is intact
            ckpt = checkpoint.load(out, step=step)
            assert ckpt.step == step and all(np.isfinite(v).all() for v in ckpt.params.values())
        (disk / "ballast").unlink(missing_ok=True)
        again = run(train_args(out, STEPS, "--resume"))
        assert again.returncode == 0, again.stderr[-3000:]
        assert assert_same_params(ref, out) == STEPS
        assert metrics(out) == metrics(ref)
        print(f"\nfull disk at checkpoint {fill_at} ({'tmpfs' if is_real_disk(env) else 'injected'}): {line}")
