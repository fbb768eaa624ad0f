"""Training loss of one SAE on one batch, with its metrics.

All inputs are already scaled (see `sae.estimate_input_scale`). Inside shard_map each device sees its
rows x [b, d_in] and its latents (W_enc [d_in, f], W_dec [f, d_in], `dead` [f]); `axes` names the mesh
axes that split rows (`data`) and latents (`model`), and every sum over them is a psum. With the
default `Axes()` the same code runs on one device.
Reconstruction loss: mean over rows of ‖x − x̂‖² (summed over d_in; with E‖x‖² = d_in).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsae.activations import heaviside
from jaxsae.config import SAEConfig
from jaxsae.kernels import ops
from jaxsae.sae import Params, activate, matmul, pre_activations
from jaxsae.selection import psum, topk_mask, vary


class Axes(NamedTuple):
    data: str | None = None  # mesh axis splitting the batch rows
    model: str | None = None  # mesh axis splitting the latents


ONE_DEVICE = Axes()


class LossHParams(NamedTuple):
    """Per-SAE values that may differ along the `sae` axis (traced scalars under vmap)."""

    k: jax.Array  # int32: active latents per row (mean, for batchtopk)
    sparsity_coefficient: jax.Array  # float32: λ after warm-up
    aux_k_coefficient: jax.Array  # float32


class LossOut(NamedTuple):
    fire_count: jax.Array  # [f] int32: rows of the global batch on which each latent fired
    smallest_kept: jax.Array  # batchtopk: smallest selected value; 0 otherwise
    metrics: dict[str, jax.Array]


def sae_loss(
    cfg: SAEConfig,
    params: Params,
    x: jax.Array,
    dead: jax.Array,
    hp: LossHParams,
    k_max: int,
    axes: Axes = ONE_DEVICE,
) -> tuple[jax.Array, LossOut]:
    """Total loss (scalar, equal on every device) and what the step needs besides the gradient."""
    n_rows = psum(x.shape[0], axes.data)
    pre = pre_activations(params, x, cfg.dtype)
    codes, smallest = activate(
        cfg, params, pre, training=True, k=hp.k, k_max=k_max, data=axes.data, model=axes.model
    )
    decoded = psum(matmul(codes, params["W_dec"], cfg.dtype), axes.model)  # x̂ − b_dec
    err = (x - params["b_dec"]) - decoded  # x − x̂, rounded as jaxsae.sparse_loss has it
    squared_error = psum(jnp.sum(err**2), axes.data)
    recon = squared_error / n_rows
    sparsity = hp.sparsity_coefficient * sparsity_penalty(cfg, params, pre, codes, axes) / n_rows
    aux = jnp.zeros(())
    if cfg.architecture in ("topk", "batchtopk"):
        aux = hp.aux_k_coefficient * aux_k_loss(params, pre, lax.stop_gradient(err), dead, axes, cfg.dtype)
    loss = recon + sparsity + aux
    fired = codes != 0
    n_fired = jnp.sum(fired, dtype=jnp.float32)
    metrics = metrics_of_sums(squared_error, total_variance(x, axes), n_fired, x.shape, axes)
    metrics.update(loss=loss, recon_loss=recon, sparsity_loss=sparsity, aux_loss=aux)
    fire_count = psum(jnp.sum(fired, axis=0, dtype=jnp.int32), axes.data)
    return loss, LossOut(fire_count, smallest, metrics)


def sparsity_penalty(
    cfg: SAEConfig, params: Params, pre: jax.Array, codes: jax.Array, axes: Axes = ONE_DEVICE
) -> jax.Array:
    """Sum over rows and latents of: |f|·‖W_dec_i‖ (relu), H(pre − θ) (jumprelu l0) or
    tanh(c·f·‖W_dec_i‖) (jumprelu tanh); 0 for topk/batchtopk."""
    dec_norm = jnp.linalg.norm(params["W_dec"], axis=-1)
    if cfg.architecture == "relu":
        per_entry = jnp.abs(codes) * dec_norm
    elif cfg.architecture == "jumprelu" and cfg.sparsity_mode == "tanh":
        per_entry = jnp.tanh(cfg.tanh_scale * codes * dec_norm)
    elif cfg.architecture == "jumprelu":
        theta = vary(jnp.exp(params["log_threshold"]), axes.data)
        per_entry = heaviside(pre, theta, cfg.jumprelu_bandwidth)
    else:
        return jnp.zeros(())
    return psum(jnp.sum(per_entry), tuple(a for a in axes if a))


def aux_k_loss(
    params: Params, pre: jax.Array, residual: jax.Array, dead: jax.Array, axes: Axes = ONE_DEVICE,
    dtype: str = "float32",
) -> jax.Array:
    """The k_aux = d_in/2 largest dead latents of each row reconstruct the residual [b, d_in]
    (no b_dec), normalised by the residual's variance over the batch. 0 when nothing is dead; with
    fewer than k_aux dead latents, all of them are used."""
    n_latents = pre.shape[1] * (lax.axis_size(axes.model) if axes.model else 1)
    k_aux = min(residual.shape[-1] // 2, n_latents)
    acts = jax.nn.relu(pre)
    dead_acts = jnp.where(dead, acts, -1.0)  # below every live ReLU value: only dead ones are chosen
    chosen = topk_mask(dead_acts, k_aux, k_aux, axes.model) & dead
    aux_hat = psum(matmul(jnp.where(chosen, acts, 0.0), params["W_dec"], dtype), axes.model)
    loss = psum(jnp.sum((residual - aux_hat) ** 2), axes.data) / total_variance(residual, axes)
    return jnp.where(psum(jnp.sum(dead), axes.model) > 0, loss, 0.0)


def total_variance(x: jax.Array, axes: Axes) -> jax.Array:
    """Σ ‖x − x̄‖² over the global batch; x̄ is the global row mean."""
    n = psum(x.shape[0], axes.data)
    mean = psum(jnp.sum(x, axis=0), axes.data) / n
    return jnp.maximum(psum(ops.sum_squares(x, mean), axes.data), 1e-12)


def metrics_of_sums(
    squared_error: jax.Array, variance: jax.Array, n_fired: jax.Array, shape: tuple[int, int], axes: Axes
) -> dict[str, jax.Array]:
    """MSE (per element), normalised MSE (‖x − x̂‖² / ‖x − x̄‖²), FVE = 1 − nMSE, mean L0, from
    ‖x − x̂‖² and ‖x − x̄‖² summed over the global batch, `n_fired` (this device's count of nonzero
    codes) and x's local shape [b, d_in]."""
    n = psum(shape[0], axes.data)
    nmse = squared_error / variance
    l0 = psum(jnp.asarray(n_fired, jnp.float32), tuple(a for a in axes if a)) / n
    return {"mse": squared_error / (n * shape[1]), "nmse": nmse, "fve": 1.0 - nmse, "l0": l0}
