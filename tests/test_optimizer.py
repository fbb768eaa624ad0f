"""jaxsae.optimizer.update against optax (make_optimizer's transformation applied leaf by leaf as the
step used to): every backend's `adam` kernel, with and without clipping, one SAE's update not finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import optimizer
from jaxsae.config import MeshConfig, TrainConfig
from jaxsae.kernels import cpu, reference
from jaxsae.sae import project_out_parallel, unit_rows
from jaxsae.sharding import make_mesh

S, F, D = 2, 40, 24


def _tree(rng):
    w_dec = rng.normal(size=(S, F, D)).astype(np.float32)
    return {
        "W_enc": rng.normal(size=(S, D, F)).astype(np.float32),
        "b_enc": rng.normal(size=(S, F)).astype(np.float32),
        "W_dec": np.asarray(unit_rows(jnp.asarray(w_dec))),
        "b_dec": rng.normal(size=(S, D)).astype(np.float32),
    }


def _optax_step(tc, params, grads, opt_state):
    """The step's update as written with optax: project W_dec's gradient, vmapped opt.update, unit rows."""
    opt = optimizer.make_optimizer(tc)
    grads = dict(grads, W_dec=project_out_parallel(params["W_dec"], grads["W_dec"]))
    updates, opt_state = jax.vmap(opt.update)(grads, opt_state, params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    return dict(new, W_dec=unit_rows(new["W_dec"])), opt_state


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_update_equals_optax_over_steps(backend, max_grad_norm, monkeypatch):
    if backend == "cpu" and not cpu.available():
        pytest.skip("no C++ toolchain")
    monkeypatch.setenv("JAXSAE_KERNELS", backend)
    tc = TrainConfig(steps=100, lr=3e-2, warmup_steps=3, max_grad_norm=max_grad_norm)
    mesh = make_mesh(MeshConfig(sae=1, data=1, model=1), jax.devices()[:1])
    rng = np.random.default_rng(0)
    params = jax.tree.map(jnp.asarray, _tree(rng))
    ref_params = params
    opt_state = ref_state = jax.vmap(optimizer.make_optimizer(tc).init)(params)
    update = jax.jit(lambda p, g, s, ok: optimizer.update(tc, mesh, p, g, s, ok))
    for step in range(4):
        grads = jax.tree.map(jnp.asarray, _tree(rng))
        ok = jnp.asarray([True, step != 2])  # SAE 1's update at step 2 is not finite: it is skipped
        ref_new, ref_new_state = _optax_step(tc, ref_params, grads, ref_state)
        keep = lambda n, o: jnp.where(ok.reshape((S,) + (1,) * (n.ndim - 1)), n, o)  # noqa: E731
        ref_params, ref_state = jax.tree.map(keep, (ref_new, ref_new_state), (ref_params, ref_state))
        params, opt_state = update(params, grads, opt_state, ok)
        for got, want in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((ref_params, ref_state)),
                             strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    assert int(opt_state[1][0].count[1] if max_grad_norm else opt_state[0].count[1]) == 3


def test_cpu_kernel_matches_reference_to_rounding():
    """The C++ pass does optax's float32 operations in optax's order (the compiler may fuse a multiply-add:
    one rounding apart), with clipping on for SAE 0 only."""
    if not cpu.available():
        pytest.skip("no C++ toolchain")
    rng = np.random.default_rng(1)
    p, m, g = (jnp.asarray(rng.normal(size=(S, D, F)), jnp.float32) for _ in range(3))
    v = jnp.asarray(rng.random(size=(S, D, F)), jnp.float32)
    hyper = jnp.asarray([[-0.01, 0.9, 0.1, 0.999, 0.001, 0.19, 0.002, 1e-8, 3.0, 1.0]] * S, jnp.float32)
    flags = jnp.asarray([[1, 1], [1, 0]], jnp.int32)
    want = reference.adam(p, m, v, g, hyper, flags, rows=False)
    got = jax.jit(lambda *a: cpu.adam(*a, rows=False))(p, m, v, g, hyper, flags)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=3e-7, atol=1e-7)
