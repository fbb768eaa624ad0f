"""Fixtures shared by the reliability tests: one uninterrupted training run to compare others with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .common import STEPS, run, train_args


@pytest.fixture(scope="session")
def straight_train(tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted `jaxsae train` of STEPS steps (subprocess), and the file events of one of its
    checkpoint saves on average (orbax's write protocol, seen by tests.reliability.faults)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    counts = out.parent / "counts.json"
    env = {"FAULT_DIR": str(out / "checkpoints"), "FAULT_COUNTS_OUT": str(counts)}
    proc = run(train_args(out, STEPS), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(counts.read_text())["events"] / STEPS
