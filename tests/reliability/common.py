"""Shared pieces of the reliability tests: running the real CLI under fault injection, small runs,
comparisons of results, a small disk."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]
SR = 16000
FAULTS = [sys.executable, "-m", "tests.reliability.faults"]
STEPS = 16  # of the small training runs
# One persistent compilation cache for the subprocesses of this session: each run of a kill chain loads
# the compiled step instead of compiling it again (half of a small run's CPU time); same executable, same
# bits.
_JIT_CACHE = tempfile.mkdtemp(prefix="jaxsae-reliability-jit-")
atexit.register(shutil.rmtree, _JIT_CACHE, ignore_errors=True)
_BASE_ENV = {
    "PYTHONPATH": str(ROOT),
    "JAX_COMPILATION_CACHE_DIR": _JIT_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}

# A tiny run: planted rows, one device, a checkpoint at every step (a kill at any moment lands in or near
# a save), max_to_keep 3 (old checkpoints are deleted while new ones are written).
TRAIN_ARGS = [
    "--sae.d_in=16", "--sae.d_sae=64", "--sae.k=4", "--sae.architecture=batchtopk",
    "--sae.threshold_start_step=5", "--data.n_rows=8192", "--data.n_atoms=32", "--data.active=3",
    "--train.batch_size=256", "--train.log_every=1", "--train.checkpoint_every=1", "--train.warmup_steps=5",
    "--train.dead_tokens=2048", "--train.scale_sample_rows=2048", "--mesh.data=1", "--train.progress=false",
]  # fmt: skip


def run(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`jaxsae ARGS` through tests.reliability.faults with fault variables `env`; waits for its end."""
    full = {**os.environ, **_BASE_ENV, **(env or {})}
    return subprocess.run(FAULTS + args, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    full = {**os.environ, **_BASE_ENV, **(env or {})}
    return subprocess.Popen(FAULTS + args, cwd=ROOT, env=full, stderr=subprocess.PIPE, text=True)


def train_args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", *TRAIN_ARGS, f"--train.steps={steps}", f"--train.out_dir={out}", *extra]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `jaxsae: error:` line of a run that exited with 2 (asserted), without a traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("jaxsae:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -9


def latest(run_dir: Path) -> int:
    """The step of the run's latest complete checkpoint (0 if none)."""
    from jaxsae import checkpoint

    steps = checkpoint.complete_steps(run_dir / "checkpoints")
    return steps[-1] if steps else 0


# ------------------------------------------------------------------------------------------ comparing
def assert_same_params(a: Path, b: Path) -> int:
    """Both run folders' latest checkpoints hold bit-identical parameters and scales; returns the step."""
    from jaxsae import checkpoint

    x, y = checkpoint.load(a), checkpoint.load(b)
    assert x.step == y.step
    assert sorted(x.params) == sorted(y.params)
    for name, value in x.params.items():
        np.testing.assert_array_equal(y.params[name], value, err_msg=name)
    np.testing.assert_array_equal(x.input_scale, y.input_scale)
    return x.step


def metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl without the timing field (which differs between runs)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("tokens_per_s")
        out.append(rec)
    return out


def store_files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path, but temp files a kill can leave behind and never read:
    a manifest being written (.manifest.json.<pid>.tmp) and tensorstore's chunk being written (*.__lock)."""
    skip = re.compile(r"\.manifest\.json\.\d+\.tmp|.*\.__lock")
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not skip.fullmatch(p.name)
    }


def assert_same_stores(a: Path, b: Path) -> None:
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], name


# ------------------------------------------------------------------------------------------ inputs
def write_clips(folder: Path, n: int, seed: int = 5) -> Path:
    """n tone-plus-noise wavs of 2000..12000 samples (float32 subtype: exact round trip)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, length in enumerate(rng.integers(2000, 12000, n)):
        t = np.arange(length) / SR
        w = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(length)
        sf.write(folder / f"clip{i:03d}.wav", w.astype(np.float32), SR, subtype="FLOAT")
    return folder


def export_args(audio: Path, out: Path, *extra: str) -> list[str]:
    return [
        "export-activations", "--model", "tests.reliability.tiny_encoder:make", "--layers", "1,2",
        "--audio", str(audio), "--out", str(out), "--batch-size", "3", "--shuffle-buffer-rows", "50",
        "--dtype", "float32", "--no-progress", *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ full disk
@contextlib.contextmanager
def small_disk(parent: Path, size: str = "16m") -> Iterator[tuple[Path, dict]]:
    """A folder on a real tmpfs of `size` (unmounted afterwards) and {} for the fault variables; where
    mounting is not allowed, a plain folder and {"FAULT_ENOSPC": "1"}: writes then fail by injection."""
    mnt = parent / f"disk-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]
    ok = subprocess.run(mount, capture_output=True)
    try:
        yield mnt, ({} if ok.returncode == 0 else {"FAULT_ENOSPC": "1"})
    finally:
        if ok.returncode == 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def is_real_disk(env: dict) -> bool:
    return "FAULT_ENOSPC" not in env
