"""The training loss of jaxsae.losses.sae_loss, computed with sparse kernels: equal value, equal
gradients, but the only dense [b, F] work is the encoder matmul and the selection passes over its
output. The decode, the decoder's and the encoder's gradients and aux-k touch only selected entries
(see jaxsae.kernels.ops). TopK, BatchTopK and JumpReLU (its active and near-threshold entries, with a
dense fallback when they do not fit); latents must not be split (model axis of size 1).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxsae.activations import heaviside, jumprelu
from jaxsae.config import SAEConfig
from jaxsae.kernels import ops
from jaxsae.losses import ONE_DEVICE, Axes, LossHParams, LossOut, reconstruction_metrics, total_variance
from jaxsae.sae import Params, pre_activations
from jaxsae.selection import psum

SPARSE_ARCHITECTURES = ("topk", "batchtopk", "jumprelu")


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
    pre: jax.Array | None = None,
    band_counts: jax.Array | None = None,
) -> tuple[jax.Array, LossOut]:
    """Same contract as jaxsae.losses.sae_loss; a `model` axis, if named, must have size 1. `pre` and
    `band_counts`: the pre-activations and jumprelu's `band_counts` if already computed (the step does,
    to choose between this loss and the dense one)."""
    if axes.model is not None and lax.axis_size(axes.model) != 1:
        raise ValueError("the sparse loss needs unsplit latents (mesh model axis of size 1)")
    b, n_latents = x.shape[0], params["W_enc"].shape[1]
    n_rows = psum(b, axes.data)
    pre = lax.stop_gradient(pre_activations(params, x) if pre is None else pre)
    smallest = jnp.zeros((), pre.dtype)
    if cfg.architecture == "topk":
        row, idx = ops.select_topk(pre, hp.k, k_max)
    elif cfg.architecture == "batchtopk":
        row, idx, smallest = ops.select_batchtopk(pre, hp.k, k_max, axes.data)
    else:
        row, idx = select_jumprelu(cfg, params, pre, band_counts)
    sel = ops.selected_pre(pre, x, params["W_enc"], params["b_enc"], params["b_dec"], row, idx)
    codes, sparsity = _codes(cfg, params, sel, idx)
    x_hat = ops.decode(row, idx, codes, params["W_dec"], b) + params["b_dec"]
    err = x - x_hat
    recon = psum(jnp.sum(err**2), axes.data) / n_rows
    sparsity = hp.sparsity_coefficient * psum(sparsity, axes.data) / n_rows
    aux = jnp.zeros(())
    if cfg.architecture != "jumprelu":
        aux = hp.aux_k_coefficient * sparse_aux_k_loss(params, pre, x, lax.stop_gradient(err), dead, axes)
    loss = recon + sparsity + aux
    fired = codes != 0
    metrics = reconstruction_metrics(x, x_hat, jnp.sum(fired, dtype=jnp.float32), axes)
    metrics.update(loss=loss, recon_loss=recon, sparsity_loss=sparsity, aux_loss=aux)
    fire_count = psum(ops.fire_count(idx, fired, n_latents), axes.data)
    # The params are typed as varying over the (size-1) model axis; a mean over it is the identity
    # that makes the scalars model-invariant, as the dense loss's psums over `model` do.
    loss, smallest, metrics = jax.tree.map(partial(_pmean, axes.model), (loss, smallest, metrics))
    return loss, LossOut(fire_count, smallest, metrics)


def _codes(cfg: SAEConfig, params: Params, sel: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Codes [C, K] at the selected slots from their pre-activations, and the sparsity penalty summed
    over them (as jaxsae.losses.sparsity_penalty; entries outside the slots add 0 to it and its
    gradient: below θ − ε/2 both H and its pseudo-derivative vanish)."""
    if cfg.architecture != "jumprelu":
        return jax.nn.relu(sel), jnp.zeros(())
    theta = jnp.exp(params["log_threshold"])[jnp.maximum(idx, 0)]
    sel = jnp.where(idx >= 0, sel, -jnp.inf)  # empty slots: no code, no penalty, no gradient
    codes = jumprelu(sel, theta, cfg.jumprelu_bandwidth)
    codes = jnp.where(idx >= 0, codes, 0.0)
    if cfg.sparsity_mode == "tanh":
        norms = jnp.linalg.norm(params["W_dec"], axis=-1)[jnp.maximum(idx, 0)]
        return codes, jnp.sum(jnp.tanh(cfg.tanh_scale * codes * norms))
    return codes, jnp.sum(jnp.where(idx >= 0, heaviside(sel, theta, cfg.jumprelu_bandwidth), 0.0))


JUMPRELU_CHUNK = 32  # slots per chunk of the jumprelu codes


def _band_floor(cfg: SAEConfig, params: Params) -> jax.Array:
    """[F]: θ − ε/2. Entries above it are active or inside the band where θ gets a gradient."""
    return jnp.exp(params["log_threshold"]) - cfg.jumprelu_bandwidth / 2


def _jumprelu_chunks(cfg: SAEConfig, b: int) -> int:
    """Chunks for jumprelu's selected entries: room for max(4k, 128) per row on average."""
    return b + b * max(4 * cfg.k, 128) // JUMPRELU_CHUNK


def band_counts(cfg: SAEConfig, params: Params, pre: jax.Array) -> jax.Array:
    """[b] int32: per row of pre [b, F], jumprelu's entries above θ − ε/2 (the sparse codes' entries)."""
    return ops.count_above(pre, _band_floor(cfg, params))


def jumprelu_fits(cfg: SAEConfig, counts: jax.Array) -> jax.Array:
    """Whether rows with `counts` [b] entries fit the sparse codes (else the step uses the dense loss)."""
    return jnp.sum((counts + JUMPRELU_CHUNK - 1) // JUMPRELU_CHUNK) <= _jumprelu_chunks(cfg, counts.shape[0])


def select_jumprelu(cfg: SAEConfig, params: Params, pre: jax.Array, counts: jax.Array | None = None):
    """jumprelu's sparse codes as chunked ELL (row, idx): the entries of pre [b, F] above θ − ε/2;
    `counts` from `band_counts` if already computed."""
    b = pre.shape[0]
    return ops.select_above(pre, _band_floor(cfg, params), JUMPRELU_CHUNK, _jumprelu_chunks(cfg, b), counts)


def _pmean(axis: str | None, v: jax.Array) -> jax.Array:
    return lax.pmean(v, axis) if axis else v


def _relu_values(params: Params, pre: jax.Array, x: jax.Array, row: jax.Array, idx: jax.Array) -> jax.Array:
    """ReLU of the pre-activations at the selected slots, differentiable in the encoder's params."""
    sel = ops.selected_pre(pre, x, params["W_enc"], params["b_enc"], params["b_dec"], row, idx)
    return jax.nn.relu(sel)


def sparse_aux_k_loss(
    params: Params, pre: jax.Array, x: jax.Array, residual: jax.Array, dead: jax.Array, axes: Axes
) -> jax.Array:
    """jaxsae.losses.aux_k_loss with the k_aux largest dead latents of each row as sparse codes."""
    k_aux = min(residual.shape[-1] // 2, pre.shape[1])
    row, idx = ops.select_topk(pre, k_aux, k_aux, mask=dead)
    aux_hat = ops.decode(row, idx, _relu_values(params, pre, x, row, idx), params["W_dec"], x.shape[0])
    loss = psum(jnp.sum((residual - aux_hat) ** 2), axes.data) / total_variance(residual, axes)
    return jnp.where(jnp.sum(dead) > 0, loss, 0.0)

