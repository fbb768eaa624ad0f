"""The training loss of jaxsae.losses.sae_loss, computed with sparse kernels: equal value, equal
gradients, but the only dense [b, F] work is the encoder matmul and the selection passes over its
output. The decode, the decoder's and the encoder's gradients and aux-k touch only selected entries
(see jaxsae.kernels.ops). TopK, BatchTopK and JumpReLU (its active and near-threshold entries, with a
dense fallback when they do not fit); latents must not be split (model axis of size 1).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxsae.activations import heaviside, jumprelu
from jaxsae.config import SAEConfig
from jaxsae.kernels import ops
from jaxsae.losses import ONE_DEVICE, Axes, LossHParams, LossOut, metrics_of_sums, total_variance
from jaxsae.sae import Params
from jaxsae.selection import psum

SPARSE_ARCHITECTURES = ("topk", "batchtopk", "jumprelu")


def supports(cfg: SAEConfig, model_axis_size: int) -> bool:
    """Whether the sparse loss can train this SAE on a mesh with this many latent shards."""
    return cfg.architecture in SPARSE_ARCHITECTURES and model_axis_size == 1


class Selection(NamedTuple):
    """The sparse codes of one SAE on its rows, chosen before the loss (constants of it): chunked ELL
    (row [C], idx [C, K]) with the pre-activations at the slots (pre [C, K]: 0 in empty slots, and > 0
    where topk and batchtopk selected, as the step reads them), the same for aux-k's dead latents (topk,
    batchtopk; empty for jumprelu), batchtopk's smallest kept value, and `exact`: False
    when the codes of these rows may differ from the dense loss's (jumprelu's when they do not fit; the
    loss combines it over the data shards into `metrics["exact"]`, and jaxsae.step has the dense step
    redo the batch of each SAE that was not exact)."""

    row: jax.Array
    idx: jax.Array
    pre: jax.Array
    aux_row: jax.Array
    aux_idx: jax.Array
    aux_pre: jax.Array
    smallest: jax.Array
    exact: jax.Array


class Taps(NamedTuple):
    """Zeros added to the outputs of the sparse products whose gradients reach W_dec and W_enc (the
    decodes [b, d] and the pre-activations at the slots [C, K], of the codes and of aux-k's): the
    gradient of the loss with respect to them is what the scatters of W_dec's and W_enc's gradients
    read (see jaxsae.fused_step)."""

    main: jax.Array
    aux: jax.Array
    pre: jax.Array
    aux_pre: jax.Array


def zero_taps(sel: Selection, x: jax.Array) -> Taps:
    """Taps of the selection `sel` on rows x [b, d]."""
    rows = jnp.zeros(x.shape, jnp.float32)
    return Taps(rows, rows, jnp.zeros(sel.pre.shape, jnp.float32), jnp.zeros(sel.aux_pre.shape, jnp.float32))


def select(
    cfg: SAEConfig, params: Params, x: jax.Array, dead: jax.Array, hp: LossHParams, k_max: int,
    axes: Axes = ONE_DEVICE, centred: jax.Array | None = None,
) -> Selection:
    """The sparse codes of rows x [b, d] (input-scaled). topk runs the encoder fused with its per-row
    selections (jaxsae.kernels.ops.encode_topk: no [b, F] array on the CPU). batchtopk's threshold is
    global (one row may hold a thousand of the batch's k·B entries): on one data shard the CPU kernel
    keeps, while encoding, only the entries above a guessed bound of it (no [b, F] array either, see
    jaxsae.kernels.ops.encode_batchtopk); over several shards it selects over the [b, F] pre-activations.
    jumprelu keeps the entries above θ − ε/2, also selected while encoding on the CPU. `centred`: x − b_dec,
    where the caller has it already."""
    params = jax.tree.map(lax.stop_gradient, params)
    b, n_latents = x.shape[0], params["W_enc"].shape[1]
    # The encoder matmul's operands in the compute dtype; the kernels accumulate in float32.
    xc = (x - params["b_dec"] if centred is None else centred).astype(cfg.dtype)
    w_enc, b_enc = params["W_enc"].astype(cfg.dtype), params["b_enc"]
    k_aux = min(x.shape[-1] // 2, n_latents)
    rows = jnp.arange(b, dtype=jnp.int32)
    if cfg.architecture == "topk":
        idx, pre, aux_idx, aux_pre = ops.encode_topk(
            xc, w_enc, b_enc, hp.k, jnp.ones(n_latents, bool), k_max, k_aux, dead, k_aux
        )
        return Selection(rows, idx, pre, rows, aux_idx, aux_pre, jnp.zeros((), pre.dtype), jnp.asarray(True))
    if cfg.architecture == "jumprelu":
        floor, n_chunks = _band_floor(cfg, params), _jumprelu_chunks(cfg, b)
        row, idx, pre, counts = ops.encode_above(xc, w_enc, b_enc, floor, JUMPRELU_CHUNK, n_chunks)
        none = jnp.zeros((b, 0), jnp.int32)
        return Selection(row, idx, pre, rows, none, none.astype(pre.dtype), jnp.zeros((), pre.dtype),
                         jumprelu_fits(cfg, counts))
    row, idx, pre, aux_idx, aux_pre, smallest = ops.encode_batchtopk(
        xc, w_enc, b_enc, hp.k, k_max, k_aux, dead, axes.data
    )
    return Selection(row, idx, pre, rows, aux_idx, aux_pre, smallest, jnp.asarray(True))


def sparse_sae_loss(
    cfg: SAEConfig,
    params: Params,
    x: jax.Array,
    dead: jax.Array,
    hp: LossHParams,
    k_max: int,
    axes: Axes = ONE_DEVICE,
    selection: Selection | None = None,
    taps: Taps | None = None,
    centred: jax.Array | None = None,
) -> tuple[jax.Array, LossOut]:
    """Same contract as jaxsae.losses.sae_loss (where `selection.exact`); a `model` axis, if named, must
    have size 1. `selection`: the codes from `select`, if already chosen (the step does, to decide
    between this loss and the dense one). `taps`: zeros added where W_dec's and W_enc's gradients are
    read (their gradients are those inputs of the scatters). `centred`: x − b_dec (with params' b_dec),
    where the caller has it. Its [b, d] arrays: centred, the two decodes, their errors and the errors'
    gradients, each written over the one before (ops.error_sums); x is read only through centred."""
    if axes.model is not None and lax.axis_size(axes.model) != 1:
        raise ValueError("the sparse loss needs unsplit latents (mesh model axis of size 1)")
    b, n_latents = x.shape[0], params["W_enc"].shape[1]
    n_rows = psum(b, axes.data)
    b_dec = params["b_dec"]
    # A constant of the loss: b_dec's gradients reach b_dec through selected_pre and `decoded` below.
    centred = lax.stop_gradient(x - b_dec) if centred is None else centred
    sel = select(cfg, params, x, dead, hp, k_max, axes, centred) if selection is None else selection
    row, idx = sel.row, sel.idx
    taps = Taps(0.0, 0.0, 0.0, 0.0) if taps is None else taps
    # The cotangents of the taps' sums reach the taps and the kernels' backward passes: kept once.
    pre = ops.selected_pre(sel.pre, centred, params["W_enc"], params["b_enc"], b_dec, row, idx)
    codes, sparsity = codes_at(cfg, params, ops.keep_cotangent(pre + taps.pre), idx)
    # x̂ − b_dec. Its cotangent (as aux_hat's) is error_sums' gradient kernel's output: one buffer already.
    decoded = ops.decode(row, idx, codes, params["W_dec"], b) + taps.main
    has_aux = cfg.architecture != "jumprelu"
    no_aux = jnp.zeros((0, x.shape[-1]), jnp.float32)
    aux_hat = aux_k_decode(params, sel, centred, taps) if has_aux else no_aux
    # err = centred − decoded = x − x̂; aux-k reconstructs stop_gradient(err) with aux_hat.
    sq_err, sq_aux, err_rows = ops.error_sums(centred, decoded, aux_hat, b_dec)
    squared_error = psum(sq_err, axes.data)
    recon = squared_error / n_rows
    sparsity = hp.sparsity_coefficient * psum(sparsity, axes.data) / n_rows
    aux = jnp.zeros(())
    if has_aux:
        # Σ ‖err − mean err‖² over the global batch, from the sums (no gradient: err is a constant there).
        sums = lax.stop_gradient((squared_error, psum(err_rows, axes.data)))
        variance = jnp.maximum(sums[0] - jnp.sum(sums[1] ** 2) / n_rows, 1e-12)
        aux_loss = jnp.where(jnp.sum(dead) > 0, psum(sq_aux, axes.data) / variance, 0.0)
        aux = hp.aux_k_coefficient * aux_loss
    loss = recon + sparsity + aux
    fired = codes != 0
    # ‖x − x̄‖² from centred: the same (b_dec shifts every row alike), without x as an array of its own.
    variance = total_variance(lax.stop_gradient(centred), axes)
    metrics = metrics_of_sums(squared_error, variance, jnp.sum(fired, dtype=jnp.float32), x.shape, axes)
    metrics.update(loss=loss, recon_loss=recon, sparsity_loss=sparsity, aux_loss=aux)
    # 1.0 where every data shard's codes are exact (jumprelu's may not fit; the step then has the dense
    # step redo this SAE's batch, see jaxsae.step); popped by the step, never logged.
    metrics["exact"] = (psum(jnp.sum(~sel.exact, dtype=jnp.int32), axes.data) == 0).astype(jnp.float32)
    fire_count = psum(ops.fire_count(row, idx, fired, n_latents, b), axes.data)
    smallest = sel.smallest
    # The params are typed as varying over the (size-1) model axis; a mean over it is the identity
    # that makes the scalars model-invariant, as the dense loss's psums over `model` do.
    loss, smallest, metrics = jax.tree.map(partial(_pmean, axes.model), (loss, smallest, metrics))
    return loss, LossOut(fire_count, smallest, metrics)


def codes_at(cfg: SAEConfig, params: Params, sel: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Codes [C, K] at the selected slots from their pre-activations, and the sparsity penalty summed
    over them (as jaxsae.losses.sparsity_penalty; entries outside the slots add 0 to it and its
    gradient: below θ − ε/2 both H and its pseudo-derivative vanish)."""
    if cfg.architecture != "jumprelu":
        # TopK's and BatchTopK's selections hold positive values only (0 in empty slots, on every
        # backend): their ReLU is the identity, and its gate would only copy the gradient.
        return sel, jnp.zeros(())
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


def jumprelu_fits(cfg: SAEConfig, counts: jax.Array) -> jax.Array:
    """Whether rows with `counts` [b] entries fit the sparse codes (else the step uses the dense loss)."""
    return jnp.sum((counts + JUMPRELU_CHUNK - 1) // JUMPRELU_CHUNK) <= _jumprelu_chunks(cfg, counts.shape[0])


def _pmean(axis: str | None, v: jax.Array) -> jax.Array:
    return lax.pmean(v, axis) if axis else v


def aux_k_decode(params: Params, sel: Selection, centred: jax.Array, taps: Taps) -> jax.Array:
    """[b, d]: aux-k's reconstruction of the residual from the k_aux largest dead latents of each row
    (`sel`'s aux codes; no b_dec), as in jaxsae.losses.aux_k_loss; centred = x − b_dec."""
    row, idx = sel.aux_row, sel.aux_idx
    pre = ops.selected_pre(sel.aux_pre, centred, params["W_enc"], params["b_enc"], params["b_dec"], row, idx)
    codes = ops.keep_cotangent(pre + taps.aux_pre)  # positive where selected, as codes_at's
    return ops.decode(row, idx, codes, params["W_dec"], centred.shape[0]) + taps.aux
