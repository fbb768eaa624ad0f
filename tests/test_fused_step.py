"""jaxsae.fused_step (W_enc's and W_dec's gradients scattered straight into Adam) against the step's
unfused path (jax.grad of the sparse loss, then jaxsae.optimizer.update): equal states after several
steps, on one device and split over the `sae` axis, with one SAE's update not finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import fused_step
from jaxsae.config import MeshConfig, RunConfig, SAEConfig, TrainConfig
from jaxsae.sharding import make_mesh
from jaxsae.step import init_states, make_train_step, use_fused_update


@pytest.fixture(params=["reference", "cpu"])
def backend(request, monkeypatch):
    from jaxsae.kernels import cpu

    if request.param == "cpu" and not cpu.available():
        pytest.skip("no C++ toolchain")
    monkeypatch.setenv("JAXSAE_KERNELS", request.param)
    return request.param


def _train(arch: str, n_sae_devices: int, fused: bool, monkeypatch) -> tuple:
    """Four steps of 2 layers × 2 seeds; layer 1's batch holds a NaN at step 2 (its SAEs skip that step)."""
    cfg = RunConfig(
        sae=SAEConfig(d_in=16, d_sae=64, architecture=arch, k=4),
        train=TrainConfig(steps=8, batch_size=32, lr=1e-2, warmup_steps=1, seeds=(0, 1), ks=(3, 4),
                          dead_tokens=8, kernels="sparse", progress=False),
        mesh=MeshConfig(sae=n_sae_devices, data=1, model=1),
    )
    mesh = make_mesh(cfg.mesh, jax.devices()[:n_sae_devices])
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(fused_step, "supports", lambda cfg, mesh: False)
        assert use_fused_update(cfg, mesh) == fused
        rng = np.random.default_rng(3)
        samples = jnp.asarray(rng.normal(size=(2, 256, 16)).astype(np.float32))
        state = init_states(cfg, samples, [1.0, 1.0], mesh)
        step = make_train_step(cfg, mesh, state)
        ks = jnp.asarray([3, 4, 3, 4], jnp.int32)
        for i in range(4):
            x = rng.normal(size=(2, 32, 16)).astype(np.float32)
            if i == 2:
                x[1, 5, 3] = np.nan
            state, metrics = step(state, jnp.asarray(x), ks)
            assert list(np.asarray(metrics["nonfinite"])) == [False, False, i == 2, i == 2]
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_sae_devices", [1, 2])
def test_fused_step_equals_unfused(backend, arch, n_sae_devices, monkeypatch):
    fused, fused_m = _train(arch, n_sae_devices, True, monkeypatch)
    plain, plain_m = _train(arch, n_sae_devices, False, monkeypatch)
    for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(fused_m["loss"], plain_m["loss"], rtol=1e-5)
    assert list(np.asarray(fused.opt_state[0].count)) == [4, 4, 3, 3]  # the NaN step was skipped
