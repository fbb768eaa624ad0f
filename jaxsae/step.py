"""The training step: a pure function of (state, batch) over every SAE on the `sae` axis, compiled
once with explicit shardings on a ('sae', 'data', 'model') mesh.

State of S SAEs (leading [S] axis on every leaf): params (see jaxsae.sae), optax Adam state over the
trainable params, `tokens_since_fired` [S, F] int32, `fire_count` [S, F] int32 (since the last log),
`step` [S] int32, `input_scale` [S] float32, `layer` [S] int32 (which layer of the batch [L, B, d_in]
each SAE reads). The loss runs inside `shard_map` (exact selection across shards, see
jaxsae.selection; on one device without it); the update is jaxsae.optimizer's (optax's Adam as one
in-place pass per matrix). topk and batchtopk with the sparse kernels, no clipping and an unsplit batch
take jaxsae.fused_step instead: their W_enc and W_dec gradients go straight from the scatters into Adam.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsae import fused_step, optimizer, sae, sparse_loss
from jaxsae.config import ConfigError, RunConfig, SAEConfig
from jaxsae.losses import Axes, LossHParams, LossOut, sae_loss
from jaxsae.optimizer import learning_rate, make_optimizer
from jaxsae.selection import DATA, MODEL, SAE, psum
from jaxsae.sharding import BATCH, named, params_specs, state_shardings
from jaxsae.sparse_loss import SPARSE_ARCHITECTURES, sparse_sae_loss

_TOKENS_CAP = 2**30  # tokens_since_fired saturates here instead of overflowing int32


class TrainState(NamedTuple):
    params: dict[str, jax.Array]
    opt_state: Any
    tokens_since_fired: jax.Array
    fire_count: jax.Array
    step: jax.Array
    input_scale: jax.Array
    layer: jax.Array


def trainable(params: dict) -> dict:
    return {k: v for k, v in params.items() if k in sae.TRAINABLE}


def frozen(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in sae.TRAINABLE}


def init_state(
    cfg: RunConfig, key: jax.Array, sample: jax.Array, input_scale: jax.Array, layer: jax.Array
) -> TrainState:
    """State of one SAE (no `sae` axis); `sample` [N, d_in] raw rows of its layer (for b_dec)."""
    params = sae.init(cfg.sae, key, sample * input_scale)
    d_sae = cfg.sae.d_sae
    return TrainState(
        params=params,
        opt_state=make_optimizer(cfg.train).init(trainable(params)),
        tokens_since_fired=jnp.zeros(d_sae, jnp.int32),
        fire_count=jnp.zeros(d_sae, jnp.int32),
        step=jnp.zeros((), jnp.int32),
        input_scale=jnp.asarray(input_scale, jnp.float32),
        layer=jnp.asarray(layer, jnp.int32),
    )


def init_states(cfg: RunConfig, samples: jax.Array, input_scales, mesh: Mesh) -> TrainState:
    """States of every SAE of `cfg.sae_grid` (each layer × each seed), created already sharded on
    `mesh`: no device or host ever holds a whole dictionary. `samples` [L, N, d_in] raw rows and
    `input_scales` [L], per layer."""
    samples = jnp.asarray(samples)
    grid = cfg.sae_grid(samples.shape[0])
    keys = jax.vmap(jax.random.key)(jnp.asarray([seed for _, seed, _ in grid], jnp.uint32))
    layers = jnp.asarray([layer for layer, _, _ in grid], jnp.int32)
    scales = jnp.asarray(input_scales, jnp.float32)

    def init(key, layer, samples, scales):
        return init_state(cfg, key, samples[layer], scales[layer], layer)

    batched = jax.vmap(init, in_axes=(0, 0, None, None))
    shardings = state_shardings(jax.eval_shape(batched, keys, layers, samples, scales), mesh)
    return jax.jit(batched, out_shardings=shardings)(keys, layers, samples, scales)


def loss_hparams(cfg: RunConfig, k: jax.Array, step: jax.Array) -> LossHParams:
    tc = cfg.train
    warm = jnp.minimum(1.0, (step + 1) / max(tc.sparsity_warmup_steps, 1))
    return LossHParams(
        k=jnp.asarray(k, jnp.int32),
        sparsity_coefficient=jnp.asarray(tc.sparsity_coefficient * warm, jnp.float32),
        aux_k_coefficient=jnp.asarray(tc.aux_k_coefficient, jnp.float32),
    )


def update_threshold(cfg: SAEConfig, threshold: jax.Array, smallest: jax.Array, step: jax.Array) -> jax.Array:
    """batchtopk's inference threshold: from `threshold_start_step`, an EMA of the smallest kept value
    (the first value taken as is)."""
    beta = cfg.threshold_beta
    ema = jnp.where(threshold < 0, smallest, beta * threshold + (1 - beta) * smallest)
    return jnp.where(step >= cfg.threshold_start_step, ema, threshold)


def use_sparse_kernels(cfg: RunConfig, mesh: Mesh) -> bool:
    """Whether the step uses the sparse loss (jaxsae.sparse_loss): `train.kernels` auto picks it where
    it applies; `sparse` insists (an error where it cannot)."""
    ok = sparse_loss.supports(cfg.sae, mesh.shape[MODEL])
    if cfg.train.kernels == "sparse" and not ok:
        raise ConfigError(
            f"train.kernels: sparse needs architecture {' or '.join(SPARSE_ARCHITECTURES)} and mesh.model 1 "
            f"(got {cfg.sae.architecture}, model {mesh.shape[MODEL]})"
        )
    return ok and cfg.train.kernels != "dense"


def sharded_loss(cfg: RunConfig, mesh: Mesh):
    """`loss(trainable, frozen, x, dead, hp, scale, layer) -> (Σ of the SAEs' losses, LossOut of [S] leaves)`,
    the per-device work under shard_map and vmapped over the SAEs a device holds."""
    k_max = max(cfg.sae_ks())
    # On one device there is nothing to map: no shard_map, no collectives. (Under shard_map the
    # gradient's psum over a data axis of size 1 is still an all-reduce that copies every gradient.)
    one_device = mesh.devices.size == 1
    axes = Axes() if one_device else Axes(DATA, MODEL)

    def one_sae(loss_fn, p, fixed, x, dead, hp, scale, layer, *precomputed):
        return loss_fn(cfg.sae, {**p, **fixed}, x[layer] * scale, dead, hp, k_max, axes, *precomputed)

    dense = jax.vmap(partial(one_sae, sae_loss), in_axes=(0, 0, None, 0, 0, 0, 0))
    sparse = jax.vmap(partial(one_sae, sparse_sae_loss), in_axes=(0, 0, None, 0, 0, 0, 0, 0))
    selections = jax.vmap(partial(one_sae, sparse_loss.select), in_axes=(0, 0, None, 0, 0, 0, 0))

    def sparse_or_dense(p, fixed, x, dead, hp, scale, layer):
        """jumprelu: the sparse loss, unless some SAE's codes are not exact (early in training, more entries
        near its thresholds than the codes hold): then the dense loss. One branch runs, not both."""
        args = (p, fixed, x, dead, hp, scale, layer)
        sel = selections(*args)
        inexact = psum(jnp.sum(~sel.exact, dtype=jnp.int32), tuple(filter(None, axes))) > 0
        return jax.lax.cond(inexact, lambda: dense(*args), lambda: sparse(*args, sel))

    def sparse_only(*args):
        return sparse(*args, None)

    if not use_sparse_kernels(cfg, mesh):
        per_device = dense
    else:
        per_device = sparse_or_dense if cfg.sae.architecture == "jumprelu" else sparse_only
    out_specs = (P(SAE), LossOut(P(SAE, MODEL), P(SAE), P(SAE)))

    def loss(p, fixed, x, dead, hp, scale, layer):
        if one_device:
            losses, out = per_device(p, fixed, x, dead, hp, scale, layer)
            return losses.sum(), out
        in_specs = (params_specs(p), params_specs(fixed), BATCH, P(SAE, MODEL), P(SAE), P(SAE), P(SAE))
        mapped = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
        losses, out = mapped(p, fixed, x, dead, hp, scale, layer)
        return losses.sum(), out

    return loss


def _advance(
    cfg: RunConfig, state: TrainState, params: dict, opt_state: Any, out: LossOut, rows: int, ok: jax.Array
) -> TrainState:
    """The state after a step that made `params` (trainable) and `opt_state`: batchtopk's threshold and the
    firing statistics of `out` (`rows` tokens per SAE) updated. An SAE whose update is not finite (`ok` [S]
    False) keeps them but for the step count, which advances (the batch is consumed either way)."""
    fixed = frozen(state.params)
    if "threshold" in fixed:
        update = jax.vmap(partial(update_threshold, cfg.sae))
        threshold = update(fixed["threshold"], out.smallest_kept, state.step)
        fixed["threshold"] = optimizer.per_sae(ok, threshold, fixed["threshold"])
    tokens = jnp.minimum(state.tokens_since_fired + rows, _TOKENS_CAP)
    tokens = jnp.where(out.fire_count > 0, 0, tokens)
    return TrainState(
        params={**params, **fixed},
        opt_state=opt_state,
        tokens_since_fired=optimizer.per_sae(ok, tokens, state.tokens_since_fired),
        fire_count=optimizer.per_sae(ok, state.fire_count + out.fire_count, state.fire_count),
        step=state.step + 1,
        input_scale=state.input_scale,
        layer=state.layer,
    )


def use_fused_update(cfg: RunConfig, mesh: Mesh) -> bool:
    """Whether the step takes jaxsae.fused_step (W_enc's and W_dec's gradients never materialised)."""
    return use_sparse_kernels(cfg, mesh) and fused_step.supports(cfg, mesh)


def make_train_step(cfg: RunConfig, mesh: Mesh, state: TrainState):
    """The jitted step `(state, x [L, B, d_in] raw, ks [S] int32) -> (state, metrics of [S] leaves)`;
    `state` (arrays or ShapeDtypeStructs) gives the structure for the shardings. Donates `state`.
    An SAE whose loss or gradient is not finite keeps its state (see `_advance`); its
    `metrics["nonfinite"]` is True."""
    loss = sharded_loss(cfg, mesh)

    fused = use_fused_update(cfg, mesh)

    def step(state: TrainState, x: jax.Array, ks: jax.Array) -> tuple[TrainState, dict]:
        dead = state.tokens_since_fired >= cfg.train.dead_tokens
        hp = jax.vmap(partial(loss_hparams, cfg))(ks, state.step)
        args = (trainable(state.params), frozen(state.params))
        inputs = (x, dead, hp, state.input_scale, state.layer)
        if fused:
            params, opt_state, out, ok = fused_step.update(cfg, mesh, *args, state.opt_state, *inputs)
        else:
            grads, out = jax.grad(loss, has_aux=True)(*args, *inputs)
            ok = optimizer.finite_per_sae(out.metrics["loss"], grads)
            params, opt_state = optimizer.update(cfg.train, mesh, args[0], grads, state.opt_state, ok)
        metrics = dict(
            out.metrics,
            dead_fraction=jnp.mean(dead, axis=-1),
            lr=jax.vmap(partial(learning_rate, cfg.train))(state.step),
            nonfinite=~ok,
        )
        return _advance(cfg, state, params, opt_state, out, x.shape[1], ok), metrics

    shardings = state_shardings(state, mesh)
    return jax.jit(
        step,
        in_shardings=(shardings, named(mesh, BATCH), named(mesh, P(SAE))),
        out_shardings=(shardings, named(mesh, P(SAE))),
        donate_argnums=0,
    )
