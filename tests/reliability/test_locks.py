"""One writer per folder: a second trainer on a run folder, or a second export into a store, stops with
one line naming the folder and the holder's pid (exit code 2); once the holder is killed with -9, its
lock is gone and the next run proceeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxsae.lock import LockError, acquire

from .common import ROOT, export_args, one_error_line, run, start, train_args, write_clips


def wait_for(path: Path, proc: subprocess.Popen, limit: float = 600) -> None:
    """Until `proc` writes `path` (it then holds its locks and sleeps); no timing is asserted."""
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the first run never got going"
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_second_trainer_on_a_run_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    first = start(train_args(out, 4), {"FAULT_PAUSE": str(tmp_path / "paused")})
    try:
        wait_for(tmp_path / "paused", first)
        line = one_error_line(run(train_args(out, 4)))
        assert line == (
            f"jaxsae: error: {out}: in use by another trainer (pid {first.pid}); "
            "wait for it to finish or stop it first"
        )
    finally:
        kill(first)
    again = run(train_args(out, 4, "--resume"))  # the dead holder's lock does not block
    assert again.returncode == 0, again.stderr[-3000:]


def test_second_export_into_a_store_is_refused(tmp_path):
    audio = write_clips(tmp_path / "audio", 6)
    out = tmp_path / "out"
    first = start(export_args(audio, out), {"FAULT_PAUSE": str(tmp_path / "paused")})
    try:
        wait_for(tmp_path / "paused", first)
        line = one_error_line(run(export_args(audio, out)))
        assert f"{out / 'layer_1'}: in use by another store writer (pid {first.pid})" in line
    finally:
        kill(first)
    again = run(export_args(audio, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "layer 2: " in again.stdout


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    a = acquire(tmp_path, "trainer")
    b = acquire(tmp_path, "trainer")  # the same process may open its own store twice
    a.release()
    assert try_lock(tmp_path) == f"{tmp_path}: in use by another trainer (pid {os.getpid()})"
    b.release()
    assert try_lock(tmp_path) == "free"
    holder = start_holder(tmp_path)  # and the other way round
    try:
        with pytest.raises(LockError, match=f"in use by another trainer \\(pid {holder.pid}\\)"):
            acquire(tmp_path, "trainer")
    finally:
        kill(holder)


def try_lock(folder: Path) -> str:
    """What another process gets: "free", or the start of the LockError message."""
    code = (
        "from jaxsae.lock import LockError, acquire\n"
        f"try:\n    acquire({str(folder)!r}, 'trainer'); print('free')\n"
        "except LockError as e:\n    print(str(e).split(';')[0])"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return proc.stdout.strip()


def start_holder(folder: Path) -> subprocess.Popen:
    code = (
        "import time; from jaxsae.lock import acquire\n"
        f"held = acquire({str(folder)!r}, 'trainer'); print('held', flush=True); time.sleep(600)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc
