"""The training step: a pure function of (state, batch), one SAE; `vmap`ped over the `sae` axis.

State arrays of one SAE: params (see jaxsae.sae), optax Adam state over the trainable params,
`tokens_since_fired` [d_sae] int32, `fire_count` [d_sae] int32 (since the last log), `step` int32,
`input_scale` float32. On the `sae` axis every leaf gains a leading [S] dimension.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsae import sae
from jaxsae.config import RunConfig, SAEConfig, TrainConfig
from jaxsae.losses import LossHParams, sae_loss

_TOKENS_CAP = 2**30  # tokens_since_fired saturates here instead of overflowing int32


class TrainState(NamedTuple):
    params: dict[str, jax.Array]
    opt_state: Any
    tokens_since_fired: jax.Array
    fire_count: jax.Array
    step: jax.Array
    input_scale: jax.Array


def learning_rate(tc: TrainConfig, step: jax.Array) -> jax.Array:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 over the last
    `decay_fraction` of the steps."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / max(tc.warmup_steps, 1))
    decay_steps = max(int(tc.steps * tc.decay_fraction), 1)
    decay = jnp.clip((tc.steps - step) / decay_steps, 0.0, 1.0)
    return tc.lr * warm * decay


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Adam with the schedule above, optionally after global-norm clipping."""
    adam = optax.adam(lambda s: learning_rate(tc, s), b1=tc.adam_b1, b2=tc.adam_b2)
    if tc.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), adam)
    return adam


def trainable(params: dict) -> dict:
    return {k: v for k, v in params.items() if k in sae.TRAINABLE}


def init_state(cfg: RunConfig, key: jax.Array, sample: jax.Array, input_scale: float) -> TrainState:
    """State of one SAE; `sample` [N, d_in] raw rows (for b_dec), `input_scale` a float."""
    params = sae.init(cfg.sae, key, sample * input_scale)
    d_sae = cfg.sae.d_sae
    return TrainState(
        params=params,
        opt_state=make_optimizer(cfg.train).init(trainable(params)),
        tokens_since_fired=jnp.zeros(d_sae, jnp.int32),
        fire_count=jnp.zeros(d_sae, jnp.int32),
        step=jnp.zeros((), jnp.int32),
        input_scale=jnp.asarray(input_scale, jnp.float32),
    )


def loss_hparams(cfg: RunConfig, k: jax.Array, step: jax.Array) -> LossHParams:
    tc = cfg.train
    warm = jnp.minimum(1.0, (step + 1) / max(tc.sparsity_warmup_steps, 1))
    return LossHParams(
        k=jnp.asarray(k, jnp.int32),
        sparsity_coefficient=jnp.asarray(tc.sparsity_coefficient * warm, jnp.float32),
        aux_k_coefficient=jnp.asarray(tc.aux_k_coefficient, jnp.float32),
    )


def project_out_parallel(w_dec: jax.Array, grad: jax.Array) -> jax.Array:
    """Removes from each gradient row its component along the (unit) decoder row."""
    return grad - jnp.sum(grad * w_dec, axis=-1, keepdims=True) * w_dec


def update_threshold(cfg: SAEConfig, threshold: jax.Array, smallest: jax.Array, step: jax.Array) -> jax.Array:
    """batchtopk's inference threshold: from `threshold_start_step`, an EMA of the smallest kept value
    (the first value taken as is)."""
    ema = jnp.where(
        threshold < 0, smallest, cfg.threshold_beta * threshold + (1 - cfg.threshold_beta) * smallest
    )
    return jnp.where(step >= cfg.threshold_start_step, ema, threshold)


def make_step(cfg: RunConfig, k_max: int | None = None):
    """`step(state, x [B, d_in] raw, k int32) -> (state, metrics)` for one SAE (pure; jit or vmap it)."""
    opt = make_optimizer(cfg.train)
    k_max = k_max or max(cfg.sae_ks())

    def step(state: TrainState, x: jax.Array, k: jax.Array) -> tuple[TrainState, dict]:
        x = x * state.input_scale
        dead = state.tokens_since_fired >= cfg.train.dead_tokens
        hp = loss_hparams(cfg, k, state.step)
        frozen = {n: v for n, v in state.params.items() if n not in sae.TRAINABLE}

        def loss_fn(p):
            return sae_loss(cfg.sae, {**p, **frozen}, x, dead, hp, k_max)

        grads, out = jax.grad(loss_fn, has_aux=True)(trainable(state.params))
        grads["W_dec"] = project_out_parallel(state.params["W_dec"], grads["W_dec"])
        updates, opt_state = opt.update(grads, state.opt_state, trainable(state.params))
        params = {**optax.apply_updates(trainable(state.params), updates), **frozen}
        params["W_dec"] = sae.unit_rows(params["W_dec"])
        if "threshold" in params:
            params["threshold"] = update_threshold(
                cfg.sae, params["threshold"], out.smallest_kept, state.step
            )
        fired = jnp.any(out.codes != 0, axis=0)
        metrics = dict(out.metrics, dead_fraction=jnp.mean(dead), lr=learning_rate(cfg.train, state.step))
        new_state = TrainState(
            params=params,
            opt_state=opt_state,
            tokens_since_fired=jnp.where(
                fired, 0, jnp.minimum(state.tokens_since_fired + x.shape[0], _TOKENS_CAP)
            ),
            fire_count=state.fire_count + jnp.sum(out.codes != 0, axis=0, dtype=jnp.int32),
            step=state.step + 1,
            input_scale=state.input_scale,
        )
        return new_state, metrics

    return step


def make_multi_step(cfg: RunConfig):
    """The step over the `sae` axis: state leaves [S, ...], x [B, d_in] shared by all, ks [S]; jitted."""
    step = make_step(cfg)
    return jax.jit(jax.vmap(step, in_axes=(0, None, 0)), donate_argnums=0)


def init_multi_state(cfg: RunConfig, sample: jax.Array, input_scale: float) -> TrainState:
    """States of every SAE on the `sae` axis (one per seed in cfg.train.seeds), stacked."""
    states = [init_state(cfg, jax.random.key(seed), sample, input_scale) for seed in cfg.train.seeds]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
