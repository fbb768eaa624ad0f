"""jaxsae.optimizer.update against optax (make_optimizer's transformation applied leaf by leaf as the
step used to): every backend's `adam` kernel, with and without clipping, one SAE's update not finite."""

from functools import partial

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
        keep = partial(optimizer.per_sae, ok)
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


def _codes(rng, n_chunks, k, b):
    """Chunked ELL codes of one SAE set: rows non-decreasing, ids ascending per chunk or -1."""
    row = np.sort(rng.integers(0, b, n_chunks)).astype(np.int32)
    idx = np.sort(rng.choice(F, size=(n_chunks, k)), axis=1).astype(np.int32)
    idx[rng.random((n_chunks, k)) < 0.2] = -1
    val = np.where(idx >= 0, rng.normal(size=(n_chunks, k)), 0).astype(np.float32)
    return row, idx, val


def _aux_like(rng, b, n_dead):
    """Codes of one set as aux-k makes them: every row holds the same dead latents (one chunk per row)."""
    dead = np.sort(rng.choice(F, n_dead, replace=False)).astype(np.int32)
    idx = np.broadcast_to(dead, (b, n_dead)).copy()
    idx[rng.random(idx.shape) < 0.1] = -1
    val = np.where(idx >= 0, rng.normal(size=idx.shape), 0).astype(np.float32)
    return np.arange(b, dtype=np.int32), idx, val


@pytest.mark.parametrize("set_b", ["sparse", "aux_like", "empty"])
@pytest.mark.parametrize("transposed", [False, True])
def test_scatter_adam_equals_scatter_then_adam(transposed, set_b):
    """The fused C++ scatter + Adam equals the reference (two scatters summed, then `adam`), per SAE, with
    SAE 1's update skipped; and the reference equals an independent numpy scatter. Set b: `aux_like`, its
    latents are in every row (the kernel sums those by a GEMM); `empty`, no slots (jumprelu has no aux-k).
    W_dec's sets read two y arrays (the decoder taps), W_enc's one array passed twice."""
    if not cpu.available():
        pytest.skip("no C++ toolchain")
    rng = np.random.default_rng(2)
    b = 12
    shape = (S, D, F) if transposed else (S, F, D)
    p = _tree(rng)["W_enc" if transposed else "W_dec"]
    m, g0 = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    v = rng.random(size=shape).astype(np.float32)
    a = [np.stack(z) for z in zip(*(_codes(rng, 9, 5, b) for _ in range(S)), strict=True)]
    make_b = {"sparse": partial(_codes, rng, b, 7, b), "aux_like": partial(_aux_like, rng, b, 7),
              "empty": partial(_codes, rng, b, 0, b)}[set_b]
    bb = [np.stack(z) for z in zip(*(make_b() for _ in range(S)), strict=True)]
    y_a = rng.normal(size=(S, b, D)).astype(np.float32)
    y_b = y_a if transposed else rng.normal(size=(S, b, D)).astype(np.float32)
    hyper = np.asarray([[-0.01, 0.9, 0.1, 0.999, 0.001, 0.19, 0.002, 1e-8, 1.0, 0.0]] * S, np.float32)
    flags = np.asarray([[1, 0], [0, 0]], np.int32)
    args = (p, m, v, tuple(a), tuple(bb), y_a, y_b, hyper, flags, transposed)
    want = reference.scatter_adam(*args)
    got = jax.jit(cpu.scatter_adam, static_argnums=(9,))(*args)
    for x, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[0][1]), p[1])  # skipped: unchanged
    # The gradient the reference applied, from numpy: invert Adam's first moment (mu = 0.1 g + 0.9 m).
    grad = np.zeros((S, F, D), np.float32)
    for s in range(S):
        for (row, idx, val), y in ((a, y_a), (bb, y_b)):
            for c in range(row.shape[1]):
                for j in range(idx.shape[2]):
                    if idx[s, c, j] >= 0:
                        grad[s, idx[s, c, j]] += val[s, c, j] * y[s, row[s, c]]
    grad = grad.transpose(0, 2, 1) if transposed else grad
    if not transposed:  # W_dec's gradient is projected off the rows first
        grad = np.asarray(project_out_parallel(jnp.asarray(p), jnp.asarray(grad)))
    np.testing.assert_allclose((np.asarray(want[1][0]) - 0.9 * m[0]) / 0.1, grad[0], rtol=1e-3, atol=1e-4)
