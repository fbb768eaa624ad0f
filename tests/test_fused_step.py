"""jaxsae.fused_step (W_enc's and W_dec's gradients scattered straight into Adam) against the step's
unfused path (jax.grad of the sparse loss, then jaxsae.optimizer.update): equal states after several
steps, on one device and split over the `sae` axis, with one SAE's update not finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import fused_step
from jaxsae.config import MeshConfig, RunConfig, SAEConfig, TrainConfig
from jaxsae.kernels import cpu
from jaxsae.sharding import make_mesh
from jaxsae.step import init_states, make_train_step, use_fused_update


@pytest.fixture(params=["reference", "cpu"])
def backend(request, monkeypatch):
    from jaxsae.kernels import cpu

    if request.param == "cpu" and not cpu.available():
        pytest.skip("no C++ toolchain")
    monkeypatch.setenv("JAXSAE_KERNELS", request.param)
    return request.param


def _sae(arch: str) -> SAEConfig:
    """`arch`, or jumprelu-l0 / jumprelu-tanh (the two sparsity penalties, thresholds near the entries)."""
    if not arch.startswith("jumprelu"):
        return SAEConfig(d_in=16, d_sae=64, architecture=arch, k=4)
    return SAEConfig(d_in=16, d_sae=64, architecture="jumprelu", k=4, jumprelu_init_threshold=0.3,
                     sparsity_mode=arch.split("-")[1])


def _train(arch: str, n_sae_devices: int, fused: bool, monkeypatch) -> tuple:
    """Four steps of 2 layers × 2 seeds; layer 1's batch holds a NaN at step 2 (its SAEs skip that step)."""
    cfg = RunConfig(
        sae=_sae(arch),
        train=TrainConfig(steps=8, batch_size=32, lr=1e-2, warmup_steps=1, seeds=(0, 1), ks=(3, 4),
                          dead_tokens=8, kernels="sparse", progress=False, sparsity_coefficient=0.1),
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


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu-l0", "jumprelu-tanh"])
@pytest.mark.parametrize("n_sae_devices", [1, 2])
def test_fused_step_equals_unfused(backend, arch, n_sae_devices, monkeypatch):
    # Both steps select alike, but the fused one takes the selected values from the kernels' bfloat16
    # screen (float32 dot products, summed in another order than the unfused step's encoder): Adam's
    # first step turns a last-bit difference in a gradient near its epsilon into an O(lr) one. The
    # screen is off here so that both steps read the same encoder values; test_kernels_cpu pins it down.
    monkeypatch.setitem(cpu.SCREEN_MODES, "auto", cpu.SCREEN_MODES["off"])
    fused, fused_m = _train(arch, n_sae_devices, True, monkeypatch)
    plain, plain_m = _train(arch, n_sae_devices, False, monkeypatch)
    for got, want in zip(jax.tree.leaves(fused), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(fused_m["loss"], plain_m["loss"], rtol=1e-5)
    assert list(np.asarray(fused.opt_state[0].count)) == [4, 4, 3, 3]  # the NaN step was skipped


def test_jumprelu_sae_whose_codes_do_not_fit_is_redone_by_the_dense_step(monkeypatch):
    """Two jumprelu SAEs on the fused sparse step; SAE 1's thresholds near 0 put about half of its 512
    latents above θ − ε/2 in every row, more than the codes hold (128 per row): its batch is redone by the
    dense step, SAE 0's is not; the next step (DENSE_STEPS_BEFORE_RETRY 1) is dense for both, then the
    sparse step is tried again. The states equal those of the dense step alone."""
    from jaxsae import step as step_module

    monkeypatch.setattr(step_module, "DENSE_STEPS_BEFORE_RETRY", 1)

    def run(kernels: str):
        cfg = RunConfig(
            sae=SAEConfig(d_in=16, d_sae=512, architecture="jumprelu", k=4),
            train=TrainConfig(steps=8, batch_size=32, lr=1e-2, warmup_steps=1, seeds=(0, 1), dead_tokens=8,
                              kernels=kernels, progress=False, sparsity_coefficient=0.1),
            mesh=MeshConfig(sae=1, data=1, model=1),
        )
        mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        rng = np.random.default_rng(4)
        state = init_states(cfg, jnp.asarray(rng.normal(size=(1, 256, 16)).astype(np.float32)), [1.0], mesh)
        log_t = state.params["log_threshold"].at[1].set(np.log(0.01))
        state = state._replace(params={**state.params, "log_threshold": log_t})
        step = make_train_step(cfg, mesh, state)
        consumed, ks = [], jnp.asarray([4, 4], jnp.int32)
        if kernels == "sparse":
            assert use_fused_update(cfg, mesh)
            sparse = step.sparse
            step.sparse = lambda *a: (out := sparse(*a), consumed.append(list(np.asarray(out[2]))))[0]
        for _ in range(3):
            state, metrics = step(state, jnp.asarray(rng.normal(size=(1, 32, 16)).astype(np.float32)), ks)
            assert not np.asarray(metrics["nonfinite"]).any()
        return jax.device_get(state), jax.device_get(metrics), consumed

    sparse, sparse_m, consumed = run("sparse")
    dense, dense_m, _ = run("dense")
    assert consumed == [[True, False], [True, False]]  # steps 1 and 3; step 2 went to the dense step
    for got, want in zip(jax.tree.leaves(sparse), jax.tree.leaves(dense), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(sparse_m["loss"], dense_m["loss"], rtol=1e-5)
    assert list(np.asarray(sparse.step)) == [3, 3]
    assert list(sparse_m["dense_steps"]) == [1, 3]  # SAE 0: step 2 only; SAE 1: every step


@pytest.mark.skipif(not cpu.available(), reason="the C++ kernels hold the errors in place")
@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_the_step_holds_three_row_arrays(arch):
    """XLA's temporary buffer for the fused step holds three [b, d] arrays (the centred rows, kept once;
    the reconstruction's and aux-k's errors, each written over its decode and then over by its gradient,
    see ops.error_sums) and aux-k's slots ([b, d / 2] each: indices, values, the gradients): at most 5.5
    [b, d] arrays in all. Before error_sums and keep it held 6.7, the rows and the sums' operands in
    buffers of their own."""
    from jaxsae.bench import ours
    from jaxsae.bench.options import BenchOptions
    from jaxsae.step import jit_step

    one = "sae=1,data=1,model=1"
    opts = BenchOptions(d_in=128, expansion=4, k=4, batch=1024, architecture=arch, mesh=one)
    cfg, mesh, state, x, ks = ours.setup(opts)
    compiled = jit_step(cfg, mesh, state).lower(state, x, ks, jnp.ones(1, bool)).compile()
    rows = opts.batch * opts.d_in * 4
    assert compiled.memory_analysis().temp_size_in_bytes <= 5.5 * rows
