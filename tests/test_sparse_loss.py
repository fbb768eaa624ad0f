"""The sparse loss (jaxsae.sparse_loss) equals the dense one (jaxsae.losses) in value, metrics and
gradients, on one device and with the batch split over devices; and a training step with sparse kernels
equals one with dense ones. The loss comparisons run with every kernel backend available here (the
reference always); the sharded and training-step ones with the default backend (C++ on the CPU)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxsae import kernels, sae
from jaxsae.config import ConfigError, MeshConfig, RunConfig, SAEConfig, TrainConfig
from jaxsae.losses import ONE_DEVICE, Axes, LossHParams, sae_loss
from jaxsae.selection import DATA
from jaxsae.sharding import make_mesh
from jaxsae.sparse_loss import sparse_sae_loss
from jaxsae.step import init_states, make_train_step

BACKENDS = ["reference"] + (["cpu"] if kernels._load("cpu", "cpu") else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("JAXSAE_KERNELS", request.param)
    return request.param


def _problem(arch: str, seed: int = 0, b: int = 32, d: int = 16, f: int = 64, ties: bool = False,
             mode: str = "l0"):
    cfg = SAEConfig(d_in=d, d_sae=f, architecture=arch, k=4, sparsity_mode=mode, jumprelu_bandwidth=0.5)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, d)).astype(np.float32))
    params = sae.init(cfg, jax.random.key(seed), x)
    params["b_enc"] = jnp.asarray(rng.normal(size=f).astype(np.float32) * 0.1)
    if ties:  # equal encoder columns give equal pre-activations: ties across latents at the threshold
        params["W_enc"] = params["W_enc"].at[:, 1].set(params["W_enc"][:, 0])
        params["b_enc"] = params["b_enc"].at[1].set(params["b_enc"][0])
        x = x.at[1].set(x[0])  # and across rows
    if arch == "jumprelu":  # thresholds around the pre-activations' upper tail: some active, some in the band
        params["log_threshold"] = jnp.log(jnp.asarray(rng.uniform(0.6, 1.6, f).astype(np.float32)))
    dead = jnp.asarray(rng.random(f) < 0.25)
    hp = LossHParams(jnp.int32(4), jnp.float32(0.3), jnp.float32(1 / 32))
    return cfg, params, x, dead, hp


def _value_and_grad(loss_fn, cfg, params, x, dead, hp, axes=ONE_DEVICE):
    def f(p):
        return loss_fn(cfg, p, x, dead, hp, 4, axes)

    return jax.value_and_grad(f, has_aux=True)(params)


def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5, err_msg=what)


@pytest.mark.parametrize(
    "arch,ties,mode",
    [("topk", False, "l0"), ("topk", True, "l0"), ("batchtopk", False, "l0"), ("batchtopk", True, "l0"),
     ("jumprelu", False, "l0"), ("jumprelu", False, "tanh")],
)
def test_sparse_loss_equals_dense(backend, arch, ties, mode):
    cfg, params, x, dead, hp = _problem(arch, ties=ties, mode=mode)
    (loss_d, out_d), grad_d = jax.jit(lambda p: _value_and_grad(sae_loss, cfg, p, x, dead, hp))(params)
    (loss_s, out_s), grad_s = jax.jit(lambda p: _value_and_grad(sparse_sae_loss, cfg, p, x, dead, hp))(params)
    assert float(out_d.metrics["aux_loss" if arch != "jumprelu" else "sparsity_loss"]) > 0  # not vacuous
    _close(loss_s, loss_d, "loss")
    np.testing.assert_array_equal(out_s.fire_count, out_d.fire_count)
    _close(out_s.smallest_kept, out_d.smallest_kept, "smallest kept")
    for key in out_d.metrics:
        _close(out_s.metrics[key], out_d.metrics[key], key)
    for key in grad_d:
        if key != "threshold":
            _close(grad_s[key], grad_d[key], f"d{key}")


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_sparse_loss_equals_dense_with_the_batch_split(arch):
    """Under shard_map over 4 data shards, with ties across shards: the global BatchTopK still keeps
    exactly k·B codes, and the gradients equal the unsharded dense ones."""
    cfg, params, x, dead, hp = _problem(arch, ties=True)
    mesh = jax.make_mesh((4,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,))
    specs = ({k: P() for k in params}, P(DATA, None))

    def sharded(p, xs):
        def f(p, xs):
            (loss, out), g = _value_and_grad(sparse_sae_loss, cfg, p, xs, dead, hp, Axes(DATA, None))
            return loss, out.fire_count, g

        return jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=(P(), P(), P()))(p, xs)

    loss_s, fire_s, grad_s = jax.jit(sharded)(params, x)
    (loss_d, out_d), grad_d = _value_and_grad(sae_loss, cfg, params, x, dead, hp)
    _close(loss_s, loss_d, "loss")
    np.testing.assert_array_equal(fire_s, out_d.fire_count)
    for key in grad_d:
        if key != "threshold":
            _close(grad_s[key], grad_d[key], f"d{key}")


def _run(kernels_mode: str, arch: str, data: int, d_sae: int = 64, theta: float = 1.0):
    cfg = RunConfig(
        sae=SAEConfig(d_in=16, d_sae=d_sae, architecture=arch, k=4, jumprelu_init_threshold=theta),
        train=TrainConfig(steps=4, batch_size=32, lr=1e-2, warmup_steps=1, seeds=(0, 1), ks=(3, 4),
                          dead_tokens=8, kernels=kernels_mode, progress=False),
        mesh=MeshConfig(sae=2, data=data, model=1),
    )
    mesh = make_mesh(cfg.mesh, jax.devices()[: 2 * data])
    rng = np.random.default_rng(1)
    samples = jnp.asarray(rng.normal(size=(1, 256, 16)).astype(np.float32))
    state = init_states(cfg, samples, [1.0], mesh)
    step = make_train_step(cfg, mesh, state)
    ks = jnp.asarray([3, 4], jnp.int32)
    for _ in range(4):
        x = jnp.asarray(rng.normal(size=(1, 32, 16)).astype(np.float32))
        state, metrics = step(state, x, ks)
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_train_steps_with_sparse_kernels_equal_dense(backend, arch):
    """Four steps of two SAEs (k 3 and 4) on a (sae 2, data 2) mesh, aux-k active after step 1. With the
    C++ kernels the encoder matmul is OpenBLAS's, rounded unlike XLA's dense one: a near-tie at a
    threshold may flip one selection, which Adam (lr 1e-2) turns into a few ±lr steps of one latent."""
    sparse_state, sparse_m = _run("sparse", arch, data=2)
    dense_state, dense_m = _run("dense", arch, data=2)
    for key in dense_state.params:  # Adam turns last-bit gradient differences of rarely firing latents
        a, b = np.asarray(sparse_state.params[key]), np.asarray(dense_state.params[key])  # into ±lr steps
        if backend == "reference":
            assert np.mean(~np.isclose(a, b, rtol=2e-4, atol=2e-5)) < 0.02, key
        np.testing.assert_allclose(a, b, atol=1e-2 if backend == "reference" else 5e-2, err_msg=key)
    np.testing.assert_array_equal(sparse_state.tokens_since_fired, dense_state.tokens_since_fired)
    rtol = 2e-4 if backend == "reference" else 2e-3
    np.testing.assert_allclose(sparse_m["aux_loss"], dense_m["aux_loss"], rtol=rtol, err_msg="aux loss")


def test_jumprelu_falls_back_to_dense_when_its_codes_do_not_fit():
    """θ near 0 and 512 latents: about 256 entries per row above θ − ε/2, more than the sparse codes'
    room (128 per row): the step takes the dense branch, and still equals the dense step."""
    from jaxsae.sparse_loss import select

    cfg, params, x, dead, hp = _problem("jumprelu", f=512)
    params["log_threshold"] = jnp.full(512, np.log(0.01), jnp.float32)
    assert not bool(select(cfg, params, x, dead, hp, 4).exact)
    sparse_state, _ = _run("sparse", "jumprelu", data=2, d_sae=512, theta=0.01)
    dense_state, _ = _run("dense", "jumprelu", data=2, d_sae=512, theta=0.01)
    for key in dense_state.params:
        _close(sparse_state.params[key], dense_state.params[key], key)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_bfloat16_selection_encodes_with_rounded_operands(backend, arch):
    """sae.dtype=bfloat16: the sparse step's encoder matmul takes both operands rounded to bfloat16
    (float32 accumulation): its pre-activations at the selected slots are numpy's with those operands,
    not float32's; the codes are the dense step's on them."""
    from jaxsae.sparse_loss import select

    cfg, params, x, dead, hp = _problem(arch)
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    sel = select(cfg16, params, x, dead, hp, 4)

    def rounded(a):
        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)

    centred = np.asarray(x - params["b_dec"])
    want = rounded(centred) @ rounded(params["W_enc"]) + np.asarray(params["b_enc"])
    full = centred @ np.asarray(params["W_enc"]) + np.asarray(params["b_enc"])
    row, idx, pre = (np.asarray(a) for a in (sel.row, sel.idx, sel.pre))
    used = idx >= 0
    rows = np.broadcast_to(row[:, None], idx.shape)[used]
    np.testing.assert_allclose(pre[used], want[rows, idx[used]], rtol=1e-5, atol=1e-5)
    assert np.abs(pre[used] - full[rows, idx[used]]).max() > 1e-4
    if arch != "jumprelu":  # jumprelu's slots hold a band around θ, not only the codes
        dense_codes = sae.activate(cfg, params, jnp.asarray(want), training=True, k=4)[0]
        chosen = np.zeros(want.shape, bool)
        chosen[rows, idx[used]] = True
        np.testing.assert_array_equal(chosen, np.asarray(dense_codes) != 0)


def test_sparse_kernels_are_refused_where_they_do_not_apply():
    from jaxsae.step import use_sparse_kernels

    relu = SAEConfig(d_in=16, d_sae=64, architecture="relu")
    sparse = RunConfig(sae=relu, train=TrainConfig(kernels="sparse"))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    with pytest.raises(ConfigError, match="train.kernels"):
        use_sparse_kernels(sparse, mesh)
    auto = dataclasses.replace(sparse, train=TrainConfig(kernels="auto"))
    assert not use_sparse_kernels(auto, mesh)


def test_unknown_kernels_option_is_a_config_error():
    with pytest.raises(ConfigError, match="train.kernels"):
        dataclasses.replace(TrainConfig(), kernels="fast")


@pytest.mark.parametrize("with_aux", [True, False])
def test_error_sums_equal_their_definition_in_value_and_gradient(backend, with_aux):
    """ops.error_sums (on the CPU: the errors, then their gradients, written over the decodes) equals
    its definition by jnp and autodiff, e = x − (decoded + b_dec) and a = stop_gradient(e) − aux_hat,
    for every output's cotangent; rows of 13 (the kernels' eight-lane loops and their tails)."""
    from jax import lax

    from jaxsae.kernels import ops

    rng = np.random.default_rng(5)
    b, d = 37, 13
    x, dec, aux = (jnp.asarray(rng.normal(size=(b, d)).astype(np.float32)) for _ in range(3))
    aux = aux if with_aux else jnp.zeros((0, d), jnp.float32)
    b_dec = jnp.asarray(rng.normal(size=d).astype(np.float32))
    weights = jnp.asarray(rng.normal(size=d + 2).astype(np.float32))

    def definition(dec, aux, b_dec):
        e = x - (dec + b_dec)
        a = lax.stop_gradient(e) - aux if with_aux else aux
        return jnp.sum(e**2), jnp.sum(a**2), jnp.sum(e, axis=0)

    def fused(dec, aux, b_dec):
        return ops.error_sums(x - lax.stop_gradient(b_dec), dec, aux, b_dec)

    def weighted(f):
        def total(*args):
            squared, aux_squared, rows = f(*args)
            return weights[0] * squared + weights[1] * aux_squared + jnp.dot(weights[2:], rows)

        return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))

    for got, want in zip(jax.jit(fused)(dec, aux, b_dec), definition(dec, aux, b_dec), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    (v_got, g_got), (v_want, g_want) = weighted(fused)(dec, aux, b_dec), weighted(definition)(dec, aux, b_dec)
    np.testing.assert_allclose(v_got, v_want, rtol=1e-5)
    for got, want, name in zip(g_got, g_want, ("decoded", "aux_hat", "b_dec"), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_selections_hold_positive_codes_and_zeros_in_empty_slots(backend, arch):
    """The contract the sparse step reads the selections by (ops.selected_pre returns their values as
    they are; topk's and batchtopk's codes skip the ReLU): values > 0 at selected slots of topk,
    batchtopk and aux-k, and 0 in every empty slot."""
    from jaxsae.sparse_loss import select

    cfg, params, x, dead, hp = _problem(arch, ties=True)
    params["b_enc"] = params["b_enc"] - 0.5  # many non-positive pre-activations: rows with fewer than k
    sel = jax.jit(lambda p, x: select(cfg, p, x, dead, hp, 4))(params, x)
    for idx, val in ((sel.idx, sel.pre), (sel.aux_idx, sel.aux_pre)):
        idx, val = np.asarray(idx), np.asarray(val)
        np.testing.assert_array_equal(val[idx < 0], 0.0)
        if arch != "jumprelu":  # jumprelu keeps the band below θ, which may be ≤ 0
            assert np.all(val[idx >= 0] > 0)
    assert np.sum(np.asarray(sel.idx) >= 0) > 0
