"""Checkpoints: SIGKILL and resume is bit-exact; a checkpoint restores onto another mesh."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import checkpoint
from jaxsae.config import DataConfig, MeshConfig, RunConfig, SAEConfig, TrainConfig
from jaxsae.sharding import make_mesh
from jaxsae.step import init_states
from jaxsae.train import train

ARGS = [
    "--sae.d_in=64", "--sae.d_sae=1024", "--sae.architecture=batchtopk", "--sae.k=8",
    "--sae.threshold_start_step=10", "--data.n_rows=40000", "--train.batch_size=512", "--train.steps=120",
    "--train.log_every=10", "--train.checkpoint_every=10", "--train.dead_tokens=20000", "--train.seeds=0,1",
    "--mesh.data=2", "--train.progress=false",
]  # fmt: skip


def _jaxsae(out, *extra):
    cmd = [sys.executable, "-m", "launch.cli", "train", *ARGS, f"--train.out_dir={out}", *extra]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)


def _steps(run) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def test_sigkill_then_resume_equals_a_straight_run(tmp_path):
    straight = _jaxsae(tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    killed = _jaxsae(tmp_path / "killed")
    while not _steps(tmp_path / "killed") or max(_steps(tmp_path / "killed")) < 30:
        assert killed.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert max(_steps(tmp_path / "killed")) < 120
    resumed = _jaxsae(tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()

    a, b = checkpoint.load(tmp_path / "straight"), checkpoint.load(tmp_path / "killed")
    assert a.step == b.step == 120
    for name, value in a.params.items():
        np.testing.assert_array_equal(b.params[name], value, err_msg=name)
    np.testing.assert_array_equal(a.input_scale, b.input_scale)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    cfg = RunConfig(
        sae=SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4),
        data=DataConfig(n_atoms=32, active=3, n_rows=4096),
        train=TrainConfig(
            steps=6, batch_size=256, seeds=(0, 1), out_dir=str(tmp_path), progress=False, log_every=3
        ),
        mesh=MeshConfig(1, 1, 1),
    )
    saved = train(cfg).state
    mesh = make_mesh(MeshConfig(2, 2, 2))
    target = init_states(cfg, jnp.zeros((1, 8, 16)), [1.0], mesh)
    mgr = checkpoint.manager(tmp_path / "checkpoints")
    restored = checkpoint.restore(mgr, target)
    mgr.close()
    w_enc = restored.params["W_enc"]
    assert w_enc.sharding.mesh.shape == mesh.shape and len(w_enc.addressable_shards) == 8
    for name, value in saved.params.items():
        np.testing.assert_array_equal(
            jax.device_get(restored.params[name]), jax.device_get(value), err_msg=name
        )
    np.testing.assert_array_equal(restored.step, saved.step)
