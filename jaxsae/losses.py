"""Training loss of one SAE on one batch, with its metrics.

All inputs are already scaled (see `sae.estimate_input_scale`). Shapes: x [B, d_in]; `dead` [d_sae] bool.
Reconstruction loss: mean over rows of ‖x − x̂‖² (summed over d_in; with E‖x‖² = d_in).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsae.activations import heaviside
from jaxsae.config import SAEConfig
from jaxsae.sae import Params, activate, pre_activations


class LossHParams(NamedTuple):
    """Per-SAE values that may differ along the `sae` axis (traced scalars under vmap)."""

    k: jax.Array  # int32: active latents per row (mean, for batchtopk)
    sparsity_coefficient: jax.Array  # float32: λ after warm-up
    aux_k_coefficient: jax.Array  # float32


class LossOut(NamedTuple):
    codes: jax.Array  # [B, d_sae]
    smallest_kept: jax.Array  # batchtopk: smallest selected value; 0 otherwise
    metrics: dict[str, jax.Array]


def sae_loss(
    cfg: SAEConfig, params: Params, x: jax.Array, dead: jax.Array, hp: LossHParams, k_max: int
) -> tuple[jax.Array, LossOut]:
    """Total loss (scalar) and what the step needs besides the gradient."""
    pre = pre_activations(params, x)
    codes, smallest = activate(cfg, params, pre, training=True, k=hp.k, k_max=k_max)
    x_hat = codes @ params["W_dec"] + params["b_dec"]
    err = x - x_hat
    recon = jnp.mean(jnp.sum(err**2, axis=-1))
    sparsity = hp.sparsity_coefficient * sparsity_penalty(cfg, params, pre, codes)
    aux = jnp.zeros(())
    if cfg.architecture in ("topk", "batchtopk"):
        aux = hp.aux_k_coefficient * aux_k_loss(params, pre, lax.stop_gradient(err), dead)
    loss = recon + sparsity + aux
    metrics = reconstruction_metrics(x, x_hat, codes)
    metrics.update(loss=loss, recon_loss=recon, sparsity_loss=sparsity, aux_loss=aux)
    return loss, LossOut(codes, smallest, metrics)


def sparsity_penalty(cfg: SAEConfig, params: Params, pre: jax.Array, codes: jax.Array) -> jax.Array:
    """Mean over rows of: Σ|f|·‖W_dec_i‖ (relu), Σ H(pre − θ) (jumprelu l0) or
    Σ tanh(c·f·‖W_dec_i‖) (jumprelu tanh); 0 for topk/batchtopk."""
    dec_norm = jnp.linalg.norm(params["W_dec"], axis=-1)
    if cfg.architecture == "relu":
        return jnp.mean(jnp.sum(jnp.abs(codes) * dec_norm, axis=-1))
    if cfg.architecture == "jumprelu":
        if cfg.sparsity_mode == "tanh":
            return jnp.mean(jnp.sum(jnp.tanh(cfg.tanh_scale * codes * dec_norm), axis=-1))
        theta = jnp.exp(params["log_threshold"])
        return jnp.mean(jnp.sum(heaviside(pre, theta, cfg.jumprelu_bandwidth), axis=-1))
    return jnp.zeros(())


def aux_k_loss(params: Params, pre: jax.Array, residual: jax.Array, dead: jax.Array) -> jax.Array:
    """The k_aux = d_in/2 largest dead latents of each row reconstruct the residual [B, d_in]
    (no b_dec), normalised by the residual's variance. 0 when nothing is dead; with fewer than
    k_aux dead latents, all of them are used."""
    d_in = residual.shape[-1]
    k_aux = min(d_in // 2, pre.shape[-1])
    dead_acts = jnp.where(dead, jax.nn.relu(pre), -jnp.inf)
    vals, idx = lax.top_k(dead_acts, k_aux)
    vals = jnp.where(jnp.isfinite(vals), vals, 0.0)  # rows with fewer dead latents than k_aux
    rows = jnp.arange(pre.shape[0])[:, None]
    aux_codes = jnp.zeros_like(pre).at[rows, idx].set(vals)
    aux_hat = aux_codes @ params["W_dec"]
    total_var = jnp.sum((residual - residual.mean(0)) ** 2)
    loss = jnp.sum((residual - aux_hat) ** 2) / jnp.maximum(total_var, 1e-12)
    return jnp.where(jnp.any(dead), loss, 0.0)


def reconstruction_metrics(x: jax.Array, x_hat: jax.Array, codes: jax.Array) -> dict[str, jax.Array]:
    """MSE (per element), normalised MSE (‖x − x̂‖² / ‖x − mean x‖²), FVE = 1 − nMSE, mean L0."""
    err = jnp.sum((x - x_hat) ** 2)
    var = jnp.sum((x - x.mean(0)) ** 2)
    nmse = err / jnp.maximum(var, 1e-12)
    return {
        "mse": err / x.size,
        "nmse": nmse,
        "fve": 1.0 - nmse,
        "l0": jnp.mean(jnp.sum(codes != 0, axis=-1)),
    }
