"""Our step and a peer's, timed in alternating rounds in two live processes, so that a machine shared
with other work slows both alike and the ratio of the two holds. (Timed one after the other, sparsify's
ratio at 8x moved between 2.0x and 3.0x with other tenants' load.)

The protocol, in text lines: a process started with `--interleave true` does its set-up (and ours its
own measurement), prints `@jaxsae-bench ready`, then answers each `step` on its stdin with the seconds
of one timed step (`@jaxsae-bench 0.123`), and each `warm` likewise, leaving that step out of its own
record. On `end` it prints its JSON result as its last line and exits.
Lines without the prefix (a library's own output) are skipped. A process with nothing to time (a peer
that is not installed) prints its result without `ready`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable

from jaxsae.bench import timing
from jaxsae.bench.options import BenchOptions

PREFIX = "@jaxsae-bench "


class BenchError(RuntimeError):
    """A benchmark process failed; the message carries the end of its output."""


def serve(step: Callable[[], object], sync: Callable[[object], object]) -> list[float]:
    """The process's side: answers the rounds until `end`; returns the seconds of the steps it timed."""
    print(PREFIX + "ready", flush=True)
    times: list[float] = []
    for line in sys.stdin:
        command = line.strip()
        if command == "end":
            break
        seconds = timing.time_calls(step, 1, 0, sync)[0]
        times += [seconds] if command == "step" else []
        print(PREFIX + repr(seconds), flush=True)
    return times


class Live:
    """The coordinator's side of one benchmark process (`python -m module <opts>`)."""

    def __init__(self, module: str, opts: BenchOptions, env: dict[str, str]):
        self.module = module
        self._stderr = tempfile.TemporaryFile("w+")  # a file: a full pipe would block the process
        cmd = [sys.executable, "-m", module, *opts.to_argv()]
        self._proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        self._last = ""
        self.ready = self._message() == "ready"

    def _message(self) -> str | None:
        """The next protocol message; None at the end of the output."""
        for line in self._proc.stdout:
            if line.startswith(PREFIX):
                return line[len(PREFIX) :].strip()
            if line.strip():
                self._last = line
        return None

    def step(self, command: str = "step") -> float:
        """Seconds of one timed step of the process (`warm`: left out of its own record)."""
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        message = self._message()
        if message is None:
            raise self._failure()
        return float(message)

    def finish(self) -> dict:
        """Ends the process; its JSON result."""
        if self.ready:
            self._proc.stdin.write("end\n")
        self._proc.stdin.close()
        while self._message() is not None:
            pass
        if self._proc.wait() != 0 or not self._last:
            raise self._failure()
        self._stderr.close()
        return json.loads(self._last)

    def abort(self) -> None:
        """Stops the process (the coordinator gave up on it)."""
        self._proc.kill()
        self._proc.wait()
        self._stderr.close()

    def _failure(self) -> BenchError:
        self._proc.kill()
        self._proc.wait()
        self._stderr.seek(0)
        tail = (self._stderr.read() or self._last)[-2000:]
        self._stderr.close()
        return BenchError(f"{self.module} failed (exit {self._proc.returncode}):\n{tail}")


def alternate(ours: Live, peer: Live, rounds: int, warmup: int) -> dict[str, list[float]]:
    """`warmup` untimed rounds, then `rounds` rounds of two steps of ours then two of the peer's, the
    second of each pair timed: {"ours_s": [...], "peer_s": [...]}. Each timed step follows a step of
    its own process, as in training, so that neither pays for the switch from the other (the first
    step after a switch ran up to 1.6x slower for ours, with its buffers mapped afresh each step, see
    jaxsae.allocator)."""
    out: dict[str, list[float]] = {"ours_s": [], "peer_s": []}
    for i in range(warmup + rounds):
        for name, live in (("ours_s", ours), ("peer_s", peer)):
            live.step("warm")
            seconds = live.step("warm" if i < warmup else "step")
            out[name] += [seconds] if i >= warmup else []
    return out


def speedup(rounds: dict[str, list[float]]) -> float:
    """Median peer step over median step of ours, in the same rounds."""
    return statistics.median(rounds["peer_s"]) / statistics.median(rounds["ours_s"])
