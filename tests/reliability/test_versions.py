"""Stores and checkpoints of another format version or another shape are refused with one line saying what
differs (exit code 2 from the CLI), before anything is written or trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import launch.cli as cli
from jaxsae import checkpoint
from jaxsae.checkpoint import CheckpointError
from jaxsae.config import load_config
from jaxsae.sharding import make_mesh
from jaxsae.step import init_states
from jaxsae.store import StoreMeta, create_store

from .common import TRAIN_ARGS

D = 16


def cli_error(argv: list[str], capsys) -> str:
    """Runs `jaxsae ARGV` in this process; asserts exit code 2 and one stderr line; returns it."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("jaxsae: error: "), (code, err)
    return err[0]


@pytest.fixture
def store(tmp_path) -> Path:
    """A store folder with layer_1 of 2048 rows x 16 (float32)."""
    s = create_store(
        tmp_path / "store" / "layer_1", StoreMeta("enc", "r1", 1, "h", 16000, 50.0, "float32", D)
    )
    rows = np.random.default_rng(0).standard_normal((2048, D)).astype(np.float32)
    s.append(rows, np.zeros(2048, np.int32), np.arange(2048, dtype=np.int32))
    s.close()
    return tmp_path / "store"


def _train(out, *extra) -> list[str]:
    over = [a for a in TRAIN_ARGS if not a.startswith("--data.")]
    return ["train", *over, "--train.steps=2", f"--train.out_dir={out}", *extra]


def test_store_of_another_version_is_refused(store, tmp_path, capsys):
    manifest = store / "layer_1" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "format_version": 2}))
    line = cli_error(_train(tmp_path / "run", f"--data.source={store}"), capsys)
    assert line.endswith(f"{manifest}: format version 2, this code reads version 1")


def test_store_of_another_shape_is_refused(store, tmp_path, capsys):
    line = cli_error(_train(tmp_path / "run", f"--data.source={store}", "--sae.d_in=32"), capsys)
    assert line.endswith(f"{store / 'layer_1'}: expected shape [N, 32] (sae.d_in), got [2048, 16]")
    with pytest.raises(ValueError, match=r"holds a different store \(stored != given\): d 16 != 8"):
        create_store(store / "layer_1", StoreMeta("enc", "r1", 1, "h", 16000, 50.0, "float32", 8))


def test_store_whose_array_disagrees_with_its_manifest_is_refused(store, tmp_path, capsys):
    manifest = store / "layer_1" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "d": 8}))
    line = cli_error(_train(tmp_path / "run", f"--data.source={store}"), capsys)
    assert "array is float32 (2048, 16), manifest says float32 [N, 8]" in line


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-step run (planted rows, d_sae 64, one SAE) with its checkpoint."""
    out = tmp_path_factory.mktemp("versions") / "run"
    assert cli.main(_train(out, "--data.n_rows=4096", "--data.n_atoms=32", "--data.active=3")) == 0
    return out


def _meta_file(run_dir: Path) -> Path:
    step = checkpoint.complete_steps(run_dir / "checkpoints")[-1]
    return run_dir / "checkpoints" / str(step) / "meta" / "metadata"


def _with_meta(run_dir: Path, tmp_path: Path, **changes) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    meta = _meta_file(copy)
    merged = {**json.loads(meta.read_text()), **changes}
    meta.write_text(json.dumps({k: v for k, v in merged.items() if v is not None}))
    return copy


def test_checkpoint_of_another_version_is_refused(run_dir, tmp_path, capsys):
    old = _with_meta(run_dir, tmp_path, format_version=99)
    line = cli_error(
        _train(old, "--data.n_rows=4096", "--data.n_atoms=32", "--data.active=3", "--resume"), capsys
    )
    assert "checkpoint format version 99, this code resumes versions 1 to 2" in line and str(old) in line
    newer = _with_meta(run_dir, tmp_path / "b", format_version=0)
    line = cli_error(["export", str(newer), "--format", "saelens", "--out", str(tmp_path / "x")], capsys)
    assert (
        "checkpoint format version 0, this code reads versions 1 to 2 (use the jaxsae that wrote it)" in line
    )
    v1 = _with_meta(run_dir, tmp_path / "c", format_version=None)  # before versions were recorded: same state
    assert cli.main(_train(v1, "--data.n_rows=4096", "--data.n_atoms=32", "--data.active=3", "--resume")) == 0


def test_checkpoint_of_another_shape_is_refused(run_dir, capsys):
    args = ("--data.n_rows=4096", "--data.n_atoms=32", "--data.active=3", "--resume")
    line = cli_error(_train(run_dir, *args, "--sae.d_sae=128", "--train.steps=3"), capsys)
    assert "checkpoint does not fit this run (saved != now): sae.d_sae 64 != 128" in line
    line = cli_error(_train(run_dir, *args, "--train.seeds=0,1", "--train.steps=3"), capsys)
    assert "train.seeds [0] != [0, 1]" in line
    # a difference the config does not show is found in the saved arrays themselves
    cfg = load_config(None, [a for a in _train(run_dir, *args[:3], "--sae.d_sae=128")[1:]])
    target = init_states(cfg, np.zeros((1, 8, D), np.float32), [1.0], make_mesh(cfg.mesh))
    step = checkpoint.complete_steps(run_dir / "checkpoints")[-1]
    diffs = checkpoint.tree_differences(run_dir / "checkpoints" / str(step), target)
    assert "params/W_enc: float32[1, 16, 64] != float32[1, 16, 128]" in diffs
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        checkpoint.tree_differences(run_dir / "checkpoints" / "999", target)
