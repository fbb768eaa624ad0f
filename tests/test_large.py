"""A large dictionary: 2^20 latents at d_in 256 on an 8-device mesh (data 2 × model 4).

Slow (minutes on 2 CPU cores, ~15 GB): outside the default suite; run with `pytest -m slow -s`.
"""

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae.config import MeshConfig, RunConfig, SAEConfig, TrainConfig
from jaxsae.sharding import BATCH, make_mesh, named
from jaxsae.step import init_states, make_train_step


@pytest.mark.slow
def test_two_to_the_twenty_latents_on_eight_devices():
    d, f, b = 256, 2**20, 256
    cfg = RunConfig(
        sae=SAEConfig(d_in=d, d_sae=f, architecture="batchtopk", k=32),
        train=TrainConfig(steps=100, batch_size=b),
        mesh=MeshConfig(1, 2, 4),
    )
    mesh = make_mesh(cfg.mesh)
    rows = np.random.default_rng(0).standard_normal((4 * b, d)).astype(np.float32)
    state = init_states(cfg, jnp.asarray(rows)[None], [1.0], mesh)
    w_enc = state.params["W_enc"]
    assert {s.data.shape for s in w_enc.addressable_shards} == {(1, d, f // 4)}  # a quarter per device
    step = make_train_step(cfg, mesh, state)
    times = []
    for i in range(3):
        x = jax.device_put(rows[None, i * b : (i + 1) * b], named(mesh, BATCH))
        t = time.perf_counter()
        state, metrics = step(state, x, jnp.asarray([32]))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    n_params = sum(v.size for v in state.params.values())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n2^20 latents, d 256, batch {b}: {n_params / 1e6:.0f}M params; step times {times} s")
    print(f"peak RSS {peak_gb:.1f} GB")
    assert np.isfinite(float(metrics["loss"][0]))
    assert float(metrics["l0"][0]) == pytest.approx(32, rel=1e-6)
