"""The training step: a pure function of (state, batch) over every SAE on the `sae` axis, compiled
once with explicit shardings on a ('sae', 'data', 'model') mesh.

State of S SAEs (leading [S] axis on every leaf): params (see jaxsae.sae), optax Adam state over the
trainable params, `tokens_since_fired` [S, F] int32, `fire_count` [S, F] int32 (since the last log),
`step` [S] int32, `input_scale` [S] float32, `layer` [S] int32 (which layer of the batch [L, B, d_in]
each SAE reads). The loss runs inside `shard_map` (exact selection across shards, see
jaxsae.selection; on one device without it); the update is jaxsae.optimizer's (optax's Adam as one
in-place pass per matrix). topk, batchtopk and jumprelu with the sparse kernels, no clipping and an
unsplit batch take jaxsae.fused_step instead: their W_enc and W_dec gradients go straight from the
scatters into Adam. jumprelu's codes may not fit the sparse layout (more than its K slots fire on a
row); the sparse step then leaves that SAE untouched and reports it not consumed, and the dense step
(compiled on first need) redoes its batch, so results never depend on the layout.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsae import fused_step, optimizer, sae, sparse_loss
from jaxsae.config import ConfigError, RunConfig, SAEConfig
from jaxsae.losses import Axes, LossHParams, LossOut, sae_loss
from jaxsae.optimizer import learning_rate, make_optimizer
from jaxsae.selection import DATA, MODEL, SAE
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

    def one_sae(loss_fn, p, fixed, x, dead, hp, scale, layer):
        return loss_fn(cfg.sae, {**p, **fixed}, x[layer] * scale, dead, hp, k_max, axes)

    loss_fn = sparse_sae_loss if use_sparse_kernels(cfg, mesh) else sae_loss
    per_device = jax.vmap(partial(one_sae, loss_fn), in_axes=(0, 0, None, 0, 0, 0, 0))
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
    cfg: RunConfig, state: TrainState, params: dict, opt_state: Any, out: LossOut, rows: int, ok: jax.Array,
    consumed: jax.Array,
) -> TrainState:
    """The state after a step that made `params` (trainable) and `opt_state`: batchtopk's threshold and the
    firing statistics of `out` (`rows` tokens per SAE) updated. An SAE whose update is not finite or not
    exact (`ok` [S] False) keeps them; its step count advances where the batch was `consumed` [S] (a
    non-finite batch is skipped; one whose codes did not fit is redone by the dense step)."""
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
        step=state.step + consumed.astype(state.step.dtype),
        input_scale=state.input_scale,
        layer=state.layer,
    )


def use_fused_update(cfg: RunConfig, mesh: Mesh) -> bool:
    """Whether the step takes jaxsae.fused_step (W_enc's and W_dec's gradients never materialised)."""
    return use_sparse_kernels(cfg, mesh) and fused_step.supports(cfg, mesh)


def jit_step(cfg: RunConfig, mesh: Mesh, state: TrainState):
    """The jitted `(state, x [L, B, d_in] raw, ks [S] int32, todo [S] bool) -> (state, metrics, consumed)`:
    one step of the SAEs in `todo` (the others keep their state). `consumed` [S] bool: the SAEs that took
    the batch (todo, less those whose sparse codes were not exact: jumprelu's early in training)."""
    loss = sharded_loss(cfg, mesh)
    fused = use_fused_update(cfg, mesh)

    def step(state: TrainState, x: jax.Array, ks: jax.Array, todo: jax.Array):
        dead = state.tokens_since_fired >= cfg.train.dead_tokens
        hp = jax.vmap(partial(loss_hparams, cfg))(ks, state.step)
        args = (trainable(state.params), frozen(state.params))
        inputs = (x, dead, hp, state.input_scale, state.layer)
        if fused:
            params, opt_state, out, ok = fused_step.update(cfg, mesh, *args, state.opt_state, *inputs, todo)
            exact = out.metrics.pop("exact") == 1
            finite = ok | ~(todo & exact)
        else:
            grads, out = jax.grad(loss, has_aux=True)(*args, *inputs)
            exact = out.metrics.pop("exact", jnp.ones_like(todo, jnp.float32)) == 1
            finite = optimizer.finite_per_sae(out.metrics["loss"], grads)
            ok = finite & todo & exact
            params, opt_state = optimizer.update(cfg.train, mesh, args[0], grads, state.opt_state, ok)
        consumed = todo & exact
        metrics = dict(
            out.metrics,
            dead_fraction=jnp.mean(dead, axis=-1),
            lr=jax.vmap(partial(learning_rate, cfg.train))(state.step),
            nonfinite=consumed & ~finite,
        )
        return _advance(cfg, state, params, opt_state, out, x.shape[1], ok, consumed), metrics, consumed

    shardings, per_sae = state_shardings(state, mesh), named(mesh, P(SAE))
    return jax.jit(
        step,
        in_shardings=(shardings, named(mesh, BATCH), per_sae, per_sae),
        out_shardings=(shardings, per_sae, per_sae),
        donate_argnums=0,
    )


# After a step whose sparse codes did not fit, this many steps go straight to the dense step before the
# sparse one is tried again: early in training (jumprelu's thresholds still low) every try would fail.
DENSE_STEPS_BEFORE_RETRY = 16


class _SparseWithDenseFallback:
    """jumprelu's step with the sparse kernels: the sparse step, and for the SAEs whose codes did not fit
    (more entries near their thresholds than the codes hold) the dense step on the same batch, compiled
    when first needed. Kept out of the sparse executable, the dense loss's [B, F] buffers cost nothing
    while the codes fit. The host reads each sparse step's `consumed` flags (one small transfer).
    `metrics["dense_steps"]` [S]: how many of this process's steps each SAE took on the dense step."""

    def __init__(self, cfg: RunConfig, mesh: Mesh, state: TrainState, everyone: jax.Array):
        self.sparse = jit_step(cfg, mesh, state)
        self.make_dense = lambda: jit_step(_dense_config(cfg), mesh, state)
        self.dense = None
        self.everyone = everyone
        self.dense_left = 0
        self.dense_steps = jnp.zeros(everyone.shape, jnp.float32)

    def _dense(self, state: TrainState, x: jax.Array, ks: jax.Array, todo: jax.Array):
        self.dense = self.dense or self.make_dense()
        return self.dense(state, x, ks, todo)[:2]

    def __call__(self, state: TrainState, x: jax.Array, ks: jax.Array) -> tuple[TrainState, dict]:
        if self.dense_left:
            self.dense_left -= 1
            return self._counted(*self._dense(state, x, ks, self.everyone), self.everyone)
        state, metrics, consumed = self.sparse(state, x, ks, self.everyone)
        if np.all(jax.device_get(consumed)):
            return self._counted(state, metrics, ~consumed)
        self.dense_left = DENSE_STEPS_BEFORE_RETRY
        state, dense_metrics = self._dense(state, x, ks, ~consumed)
        merged = {k: optimizer.per_sae(consumed, v, dense_metrics[k]) for k, v in metrics.items()}
        return self._counted(state, merged, ~consumed)

    def _counted(self, state: TrainState, metrics: dict, dense: jax.Array) -> tuple[TrainState, dict]:
        self.dense_steps = self.dense_steps + dense
        return state, dict(metrics, dense_steps=self.dense_steps)


def _dense_config(cfg: RunConfig) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, kernels="dense"))


def make_train_step(cfg: RunConfig, mesh: Mesh, state: TrainState):
    """The step `(state, x [L, B, d_in] raw, ks [S] int32) -> (state, metrics of [S] leaves)`, jitted (with
    jumprelu on the sparse kernels, two jitted steps: see `_SparseWithDenseFallback`); `state` (arrays or
    ShapeDtypeStructs) gives the structure for the shardings. Donates `state`. An SAE whose loss or
    gradient is not finite keeps its state (see `_advance`); its `metrics["nonfinite"]` is True."""
    n_saes = jax.tree.leaves(state.step)[0].shape[0]
    everyone = jax.device_put(jnp.ones(n_saes, bool), named(mesh, P(SAE)))
    if cfg.sae.architecture == "jumprelu" and use_sparse_kernels(cfg, mesh):
        return _SparseWithDenseFallback(cfg, mesh, state, everyone)
    step = jit_step(cfg, mesh, state)
    return lambda state, x, ks: step(state, x, ks, everyone)[:2]
