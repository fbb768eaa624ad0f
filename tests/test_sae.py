"""The SAE core against an independent numpy reference."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxsae import sae
from jaxsae.activations import heaviside, jumprelu
from jaxsae.config import SAEConfig
from jaxsae.losses import ONE_DEVICE, LossHParams, aux_k_loss, metrics_of_sums, sae_loss, total_variance

B, D, F, K = 16, 8, 32, 3


def _params(arch: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    p = {
        "W_enc": rng.standard_normal((D, F)).astype(np.float32),
        "b_enc": rng.standard_normal(F).astype(np.float32) * 0.1,
        "W_dec": rng.standard_normal((F, D)).astype(np.float32),
        "b_dec": rng.standard_normal(D).astype(np.float32) * 0.1,
    }
    if arch == "jumprelu":
        p["log_threshold"] = np.log(rng.uniform(0.1, 1.0, F)).astype(np.float32)
    if arch == "batchtopk":
        p["threshold"] = np.float32(0.7)
    return p


def _x(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, D)).astype(np.float32)


def _np_codes(arch: str, p: dict, x: np.ndarray, training: bool) -> np.ndarray:
    """Independent reference: stable sorts for the selections."""
    return _np_select(arch, p, (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], training)


def _np_select(arch: str, p: dict, pre: np.ndarray, training: bool) -> np.ndarray:
    acts = np.maximum(pre, 0)
    keep = np.zeros_like(acts, bool)
    if arch == "relu":
        return acts
    if arch == "jumprelu":
        return pre * (pre > np.exp(p["log_threshold"]))
    if arch == "topk":
        order = np.argsort(-acts, axis=1, kind="stable")[:, :K]
        np.put_along_axis(keep, order, True, axis=1)
    elif training:
        keep.reshape(-1)[np.argsort(-acts.reshape(-1), kind="stable")[: K * B]] = True
    else:
        keep = acts > p["threshold"]
    return np.where(keep, acts, 0)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_numpy(arch, training):
    cfg = SAEConfig(d_in=D, d_sae=F, architecture=arch, k=K)
    p, x = _params(arch), _x()
    codes = np.asarray(sae.encode(cfg, p, x, training=training))
    want = _np_codes(arch, p, x, training)
    np.testing.assert_allclose(codes, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        sae.decode(cfg, p, codes), want @ p["W_dec"] + p["b_dec"], rtol=1e-4, atol=1e-4
    )


def test_batchtopk_keeps_exactly_k_times_b_with_ties():
    cfg = SAEConfig(d_in=D, d_sae=F, architecture="batchtopk", k=K)
    p = _params("batchtopk")
    x = np.repeat(_x()[:4], 4, axis=0)  # duplicated rows: many exact ties at the cut
    codes = np.asarray(sae.encode(cfg, p, x, training=True))
    assert (codes != 0).sum() == K * B
    np.testing.assert_array_equal(codes, _np_codes("batchtopk", p, x, training=True))


def test_topk_at_most_k_per_row():
    cfg = SAEConfig(d_in=D, d_sae=F, architecture="topk", k=K)
    codes = np.asarray(sae.encode(cfg, _params("topk"), _x() * 3))
    assert ((codes != 0).sum(1) <= K).all() and ((codes != 0).sum(1) == K).any()


def _rect(u):
    return (np.abs(u) < 0.5).astype(np.float32)


def test_jumprelu_threshold_gradients_are_the_pseudo_derivatives():
    rng = np.random.default_rng(0)
    eps = 0.1
    theta = rng.uniform(0.5, 1.0, F).astype(np.float32)
    pre = (theta + rng.uniform(-0.12, 0.12, (B, F))).astype(np.float32)  # many within the kernel window
    g = rng.standard_normal((B, F)).astype(np.float32)
    d_theta = jax.grad(lambda t: jnp.sum(g * jumprelu(pre, t, eps)))(theta)
    want = (-(theta / eps) * _rect((pre - theta) / eps) * g).sum(0)
    np.testing.assert_allclose(d_theta, want, rtol=1e-5, atol=1e-5)
    d_theta_h = jax.grad(lambda t: jnp.sum(g * heaviside(pre, t, eps)))(theta)
    np.testing.assert_allclose(d_theta_h, (-(1 / eps) * _rect((pre - theta) / eps) * g).sum(0), rtol=1e-5)
    d_pre = jax.grad(lambda z: jnp.sum(g * jumprelu(z, theta, eps)))(pre)
    np.testing.assert_allclose(d_pre, g * (pre > theta))
    assert not np.any(jax.grad(lambda z: jnp.sum(g * heaviside(z, theta, eps)))(pre))
    assert np.count_nonzero(want) > F // 2  # the test exercises the window


def test_aux_k_touches_only_dead_latents_and_matches_numpy():
    p, x = _params("topk"), _x()
    dead = np.zeros(F, bool)
    dead[[1, 5, 6, 20, 31]] = True
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    residual = np.random.default_rng(3).standard_normal((B, D)).astype(np.float32)

    def loss(q):
        return aux_k_loss(q, jnp.asarray((x - q["b_dec"]) @ q["W_enc"] + q["b_enc"]), residual, dead)

    # numpy: top d/2 = 4 of the 5 dead latents by ReLU(pre) per row reconstruct the residual
    acts = np.where(dead, np.maximum(pre, 0), -np.inf)
    keep = np.zeros_like(acts, bool)
    np.put_along_axis(keep, np.argsort(-acts, axis=1, kind="stable")[:, : D // 2], True, axis=1)
    aux_hat = np.where(keep, np.maximum(pre, 0), 0) @ p["W_dec"]
    want = ((residual - aux_hat) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    np.testing.assert_allclose(loss(p), want, rtol=1e-5)
    grads = jax.grad(loss)(p)
    assert not np.any(grads["W_enc"][:, ~dead]) and not np.any(grads["b_enc"][~dead])
    assert not np.any(grads["W_dec"][~dead])
    assert np.any(grads["W_dec"][dead]) and np.any(grads["W_enc"][:, dead])
    assert float(aux_k_loss(p, jnp.asarray(pre), residual, np.zeros(F, bool))) == 0.0


def test_fold_input_scale_takes_raw_inputs():
    for arch in ("topk", "jumprelu", "batchtopk"):
        cfg = SAEConfig(d_in=D, d_sae=F, architecture=arch, k=K)
        p, x, s = _params(arch), _x(), 2.5
        folded = sae.fold_input_scale(p, s)
        np.testing.assert_allclose(
            sae.encode(cfg, folded, x), sae.encode(cfg, p, x * s), rtol=1e-5, atol=1e-5
        )
        codes = sae.encode(cfg, p, x * s)
        np.testing.assert_allclose(
            sae.decode(cfg, folded, codes), sae.decode(cfg, p, codes) / s, rtol=1e-5, atol=1e-5
        )


def test_input_scale_ignores_massive_rows():
    x = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32) * 3
    s = sae.estimate_input_scale(x)
    np.testing.assert_allclose(np.mean(np.sum((x * s) ** 2, axis=1)), 16, rtol=1e-5)
    x[::100] *= 200  # 1% massive frames
    assert abs(sae.estimate_input_scale(x) / s - 1) < 0.05


def test_init_unit_decoder_tied_encoder_and_median_bias():
    cfg = SAEConfig(d_in=D, d_sae=F, architecture="jumprelu", k=K)
    sample = _x() + 5.0
    p = sae.init(cfg, jax.random.key(0), sample)
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
    # Weiszfeld's fixed point: the unit vectors from the median to the points sum to ~0
    u = sample - np.asarray(p["b_dec"])
    assert np.linalg.norm((u / np.linalg.norm(u, axis=1, keepdims=True)).sum(0)) < 1e-2
    np.testing.assert_allclose(np.exp(p["log_threshold"]), cfg.jumprelu_init_threshold, rtol=1e-6)


def test_metrics_match_numpy():
    x, x_hat = _x(1), _x(2) * 0.3 + _x(1)
    codes = np.where(_x(3)[:, :4] > 0, 1.0, 0.0)
    squared_error = jnp.sum((jnp.asarray(x) - jnp.asarray(x_hat)) ** 2)
    variance = total_variance(jnp.asarray(x), ONE_DEVICE)
    m = metrics_of_sums(squared_error, variance, np.sum(codes != 0), x.shape, ONE_DEVICE)
    nmse = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    np.testing.assert_allclose(m["nmse"], nmse, rtol=1e-5)
    np.testing.assert_allclose(m["fve"], 1 - nmse, rtol=1e-5)
    np.testing.assert_allclose(m["mse"], ((x - x_hat) ** 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["l0"], (codes != 0).sum(1).mean(), rtol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_bfloat16_compute_rounds_the_matmul_operands_only(arch):
    """sae.dtype=bfloat16: the loss is numpy's with both matmuls' operands rounded to bfloat16 and the
    products summed in float32 (not the float32 loss); the gradients stay float32, near float32's."""
    p, x = _params(arch), _x()
    hp = LossHParams(jnp.int32(K), jnp.float32(0.1), jnp.float32(0.0))
    dead = jnp.zeros(F, bool)

    def rounded(a):
        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)

    def np_loss(round_to):
        pre = round_to(x - p["b_dec"]) @ round_to(p["W_enc"]) + p["b_enc"]
        codes = _np_select(arch, p, pre, training=True)
        err = x - (round_to(codes) @ round_to(p["W_dec"]) + p["b_dec"])
        sparsity = np.sum(np.abs(codes) * np.linalg.norm(p["W_dec"], axis=1)) if arch == "relu" else 0.0
        return (np.sum(err**2) + 0.1 * sparsity) / B

    def loss_and_grads(dtype):
        cfg = SAEConfig(d_in=D, d_sae=F, architecture=arch, k=K, dtype=dtype)
        fn = lambda q: sae_loss(cfg, q, jnp.asarray(x), dead, hp, K)[0]  # noqa: E731
        return jax.value_and_grad(fn)({n: jnp.asarray(v) for n, v in p.items()})

    loss16, grads16 = loss_and_grads("bfloat16")
    loss32, grads32 = loss_and_grads("float32")
    np.testing.assert_allclose(float(loss16), np_loss(rounded), rtol=1e-5)
    np.testing.assert_allclose(float(loss32), np_loss(lambda a: a), rtol=1e-5)
    assert abs(float(loss16) - float(loss32)) > 1e-4 * abs(float(loss32))
    for name, g in grads16.items():
        assert g.dtype == jnp.float32, name
        g, want = np.ravel(g), np.ravel(grads32[name])
        assert np.dot(g, want) > 0.99 * np.linalg.norm(g) * np.linalg.norm(want), name
