"""One process of the multi-process test: `python distributed_worker.py PORT PROCESS_ID OUT.npz`.

Joins a 2-process `jax.distributed` run on 127.0.0.1 (4 CPU devices each), trains a few global
BatchTopK steps on a (1, 2, 4) mesh spanning both processes, and process 0 saves the parameters.
"""

import os
import sys

if __name__ == "__main__":  # as a worker: 4 devices per process (set before JAX starts)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxsae.config import MeshConfig, RunConfig, SAEConfig, TrainConfig  # noqa: E402
from jaxsae.sharding import BATCH, make_mesh, named  # noqa: E402
from jaxsae.step import init_states, make_train_step  # noqa: E402

B, D, F, K, STEPS = 64, 16, 64, 4, 4


def config(mesh: MeshConfig) -> RunConfig:
    sae = SAEConfig(d_in=D, d_sae=F, architecture="batchtopk", k=K, threshold_start_step=0)
    return RunConfig(
        sae=sae, train=TrainConfig(steps=10, batch_size=B, seeds=(0, 1), dead_tokens=2 * B), mesh=mesh
    )


def rows() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((STEPS * B, D)).astype(np.float32)


def train_params(cfg: RunConfig) -> dict:
    """Runs STEPS steps on the fixed rows; each process feeds only its own rows of every batch."""
    mesh = make_mesh(cfg.mesh)
    data = rows()
    state = init_states(cfg, data[None], [0.8], mesh)
    step = make_train_step(cfg, mesh, state)
    n, i = jax.process_count(), jax.process_index()
    for s in range(STEPS):
        local = data[None, s * B + i * B // n : s * B + (i + 1) * B // n]
        x = jax.make_array_from_process_local_data(named(mesh, BATCH), local, (1, B, D))
        state, _ = step(state, x, jax.numpy.asarray([K, K]))
    return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in state.params.items()}


if __name__ == "__main__":
    port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    params = train_params(config(MeshConfig(1, 2, 4)))
    if pid == 0:
        np.savez(out, **params)
    jax.distributed.shutdown()
