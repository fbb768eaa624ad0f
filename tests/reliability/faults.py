"""Runs the real `jaxsae` command line with faults injected at chosen points, set by environment variables:

    python -m tests.reliability.faults train ...            (same arguments as `jaxsae`)

FAULT_KILL_STEP=n    SIGKILL itself when the trainer dispatches its n-th step (counted in this process)
FAULT_KILL_EVENT=n   SIGKILL itself at the n-th file-system event (a file opened for writing, a mkdir,
                     rename, replace or removal, seen through a Python audit hook) under FAULT_DIR:
                     orbax's checkpoint protocol and the store's manifest commits happen there
FAULT_KILL_FORWARD=n SIGKILL itself at the n-th forward pass of the audio encoder (mid-export)
FAULT_TEAR_WRITE=n   at the n-th row write of a store, write half of the rows, then SIGKILL itself
FAULT_FILL_AT=n      before the n-th checkpoint save (`train`) or store append (`export-activations`),
                     fill the file system of FAULT_FILL_FILE with it (a small tmpfs: a real full disk);
                     with FAULT_ENOSPC=1 instead, every later open-for-writing under FAULT_DIR fails
                     with OSError(ENOSPC) (for machines where a tmpfs cannot be mounted)
FAULT_PAUSE=path     at the first step / forward pass, create `path` and sleep (holding every lock)
FAULT_RSS_EVERY=n    every n-th step dispatch, note the resident memory (VmRSS, kB) in COUNTS["rss_kb"]
FAULT_COUNTS_OUT=path  at exit, write what was counted as JSON: {"events", "steps", "saves", "forwards",
                     "writes", "appends"} (a straight run's counts bound where a chain's kills may land)

Hooks wrap library functions from outside; the library holds no test code.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

_WRITE_EVENTS = ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree")


def _env_int(name: str) -> int:
    return int(os.environ.get(name, "0") or 0)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


COUNTS: dict[str, int] = {}


class _Counter:
    """Counts calls under `name`; calls `action` at call number `at` (never if `at` is 0)."""

    def __init__(self, name: str, at: int, action) -> None:
        self.name, self.at, self.action = name, at, action
        COUNTS.setdefault(name, 0)

    def tick(self) -> bool:
        COUNTS[self.name] += 1
        if COUNTS[self.name] == self.at:
            self.action()
            return True
        return False


def _is_write(event: str, args: tuple) -> bool:
    if event in _WRITE_EVENTS:
        return True
    if event != "open" or len(args) < 3:
        return False
    mode, flags = args[1], args[2]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def _install_event_hook(root: str) -> None:
    kill = _Counter("events", _env_int("FAULT_KILL_EVENT"), _die)
    state = {"enospc": False}

    def hook(event: str, args: tuple) -> None:
        if not args or not isinstance(args[0], str | bytes | os.PathLike):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if not path.startswith(root) or not _is_write(event, args):
            return
        if state["enospc"] and event == "open":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        kill.tick()

    sys.addaudithook(hook)
    _ARM["enospc"] = lambda: state.update(enospc=True)


_ARM: dict = {}


def fill_disk() -> None:
    """Fills the file system of FAULT_FILL_FILE (or arms the ENOSPC hook): every later write fails."""
    if os.environ.get("FAULT_ENOSPC") == "1":
        _ARM["enospc"]()
        return
    with open(os.environ["FAULT_FILL_FILE"], "ab", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise


def rss_kb() -> int:
    """This process's resident memory in kB (VmRSS of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _pause() -> None:
    Path(os.environ["FAULT_PAUSE"]).write_text(str(os.getpid()))
    time.sleep(3600)


def _patch_train() -> None:
    import jaxsae.checkpoint as checkpoint
    import jaxsae.train as train

    kill = _Counter("steps", _env_int("FAULT_KILL_STEP"), _die)
    pause = _Counter("steps_", 1 if os.environ.get("FAULT_PAUSE") else 0, _pause)
    every = _env_int("FAULT_RSS_EVERY")
    make = train.make_train_step

    def make_train_step(*a, **kw):
        step = make(*a, **kw)

        def counted(*args):
            kill.tick()
            pause.tick()
            if every and COUNTS["steps"] % every == 0:
                COUNTS.setdefault("rss_kb", []).append(rss_kb())
            return step(*args)

        return counted

    train.make_train_step = make_train_step
    fill = _Counter("saves", _env_int("FAULT_FILL_AT"), fill_disk)
    save = checkpoint.save

    def save_filling(*a, **kw):
        fill.tick()
        return save(*a, **kw)

    checkpoint.save = save_filling


def _patch_export() -> None:
    from encoders.models import Encoder
    from jaxsae.store import ActivationStore

    kill = _Counter("forwards", _env_int("FAULT_KILL_FORWARD"), _die)
    pause = _Counter("forwards_", 1 if os.environ.get("FAULT_PAUSE") else 0, _pause)
    activations = Encoder.activations

    def counted(self, *a, **kw):
        kill.tick()
        pause.tick()
        return activations(self, *a, **kw)

    Encoder.activations = counted
    tear = _Counter("writes", _env_int("FAULT_TEAR_WRITE"), lambda: None)
    write_rows = ActivationStore._write_rows

    def torn(self, start, arrays):
        if tear.tick():
            write_rows(self, start, tuple(a[: max(len(a) // 2, 1)] for a in arrays))
            _die()
        return write_rows(self, start, arrays)

    ActivationStore._write_rows = torn
    fill = _Counter("appends", _env_int("FAULT_FILL_AT"), fill_disk)
    append = ActivationStore.append

    def append_filling(self, *a, **kw):
        fill.tick()
        return append(self, *a, **kw)

    ActivationStore.append = append_filling


def main(argv: list[str]) -> int:
    if os.environ.get("FAULT_COUNTS_OUT"):
        out = Path(os.environ["FAULT_COUNTS_OUT"])
        atexit.register(lambda: out.write_text(json.dumps(COUNTS)))
    if os.environ.get("FAULT_DIR"):
        _install_event_hook(os.path.abspath(os.environ["FAULT_DIR"]))
    if argv and argv[0] == "train":
        _patch_train()
    elif argv and argv[0] == "export-activations":
        _patch_export()
    from launch.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
