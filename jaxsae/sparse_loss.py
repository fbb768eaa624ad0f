"""The training loss of jaxsae.losses.sae_loss, computed with sparse kernels: equal value, equal
gradients, but the only dense [b, F] work is the encoder matmul and the selection passes over its
output. The decode, the decoder's and the encoder's gradients and aux-k touch only selected entries
(see jaxsae.kernels.ops). TopK and BatchTopK; latents must not be split (model axis of size 1).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxsae.config import SAEConfig
from jaxsae.kernels import ops
from jaxsae.losses import ONE_DEVICE, Axes, LossHParams, LossOut, reconstruction_metrics, total_variance
from jaxsae.sae import Params, pre_activations
from jaxsae.selection import psum

SPARSE_ARCHITECTURES = ("topk", "batchtopk")


def supports(cfg: SAEConfig, model_axis_size: int) -> bool:
    """Whether the sparse loss can train this SAE on a mesh with this many latent shards."""
    return cfg.architecture in SPARSE_ARCHITECTURES and model_axis_size == 1


def sparse_sae_loss(
    cfg: SAEConfig,
    params: Params,
    x: jax.Array,
    dead: jax.Array,
    hp: LossHParams,
    k_max: int,
    axes: Axes = ONE_DEVICE,
) -> tuple[jax.Array, LossOut]:
    """Same contract as jaxsae.losses.sae_loss; a `model` axis, if named, must have size 1."""
    if axes.model is not None and lax.axis_size(axes.model) != 1:
        raise ValueError("the sparse loss needs unsplit latents (mesh model axis of size 1)")
    b, n_latents = x.shape[0], params["W_enc"].shape[1]
    n_rows = psum(b, axes.data)
    pre = lax.stop_gradient(pre_activations(params, x))
    if cfg.architecture == "topk":
        row, idx = ops.select_topk(pre, hp.k, k_max)
        smallest = jnp.zeros((), pre.dtype)
    else:
        row, idx, smallest = ops.select_batchtopk(pre, hp.k, k_max, axes.data)
    codes = _values(params, pre, x, row, idx)
    x_hat = ops.decode(row, idx, codes, params["W_dec"], b) + params["b_dec"]
    err = x - x_hat
    recon = psum(jnp.sum(err**2), axes.data) / n_rows
    aux = hp.aux_k_coefficient * sparse_aux_k_loss(params, pre, x, lax.stop_gradient(err), dead, axes)
    loss = recon + aux
    fired = codes > 0
    metrics = reconstruction_metrics(x, x_hat, jnp.sum(fired, dtype=jnp.float32), axes)
    metrics.update(loss=loss, recon_loss=recon, sparsity_loss=jnp.zeros(()), aux_loss=aux)
    fire_count = psum(ops.fire_count(idx, fired, n_latents), axes.data)
    # The params are typed as varying over the (size-1) model axis; a mean over it is the identity
    # that makes the scalars model-invariant, as the dense loss's psums over `model` do.
    loss, smallest, metrics = jax.tree.map(partial(_pmean, axes.model), (loss, smallest, metrics))
    return loss, LossOut(fire_count, smallest, metrics)


def _pmean(axis: str | None, v: jax.Array) -> jax.Array:
    return lax.pmean(v, axis) if axis else v


def _values(params: Params, pre: jax.Array, x: jax.Array, row: jax.Array, idx: jax.Array) -> jax.Array:
    """ReLU of the pre-activations at the selected slots, differentiable in the encoder's params."""
    sel = ops.selected_pre(pre, x, params["W_enc"], params["b_enc"], params["b_dec"], row, idx)
    return jax.nn.relu(sel)


def sparse_aux_k_loss(
    params: Params, pre: jax.Array, x: jax.Array, residual: jax.Array, dead: jax.Array, axes: Axes
) -> jax.Array:
    """jaxsae.losses.aux_k_loss with the k_aux largest dead latents of each row as sparse codes."""
    k_aux = min(residual.shape[-1] // 2, pre.shape[1])
    row, idx = ops.select_topk(pre, k_aux, k_aux, mask=dead)
    aux_hat = ops.decode(row, idx, _values(params, pre, x, row, idx), params["W_dec"], x.shape[0])
    loss = psum(jnp.sum((residual - aux_hat) ** 2), axes.data) / total_variance(residual, axes)
    return jnp.where(jnp.sum(dead) > 0, loss, 0.0)

