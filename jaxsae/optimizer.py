"""The optimiser of the training step: Adam (optax's state layout, optax's arithmetic) with the
learning-rate schedule, optional global-norm clipping, the decoder's row constraint and the per-SAE
guard against non-finite updates, applied in one pass per parameter.

`make_optimizer` is the optax transformation: it defines the state (checkpoints hold optax's
`ScaleByAdamState` / `ScaleByScheduleState`) and the semantics. `update` applies the same step through
`jaxsae.kernels` `adam`: on the CPU one in-place C++ pass over (param, mu, nu, grad) per matrix instead
of XLA's several passes and temporaries (and the W_dec projection and renormalisation folded in).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsae.config import TrainConfig
from jaxsae.kernels import kernel, reference
from jaxsae.sae import project_out_parallel
from jaxsae.selection import DATA, SAE
from jaxsae.sharding import param_spec

ADAM_EPS = 1e-8  # optax.adam's default


def learning_rate(tc: TrainConfig, step: jax.Array) -> jax.Array:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 over the last
    `decay_fraction` of the steps."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / max(tc.warmup_steps, 1))
    decay_steps = max(int(tc.steps * tc.decay_fraction), 1)
    decay = jnp.clip((tc.steps - step) / decay_steps, 0.0, 1.0)
    return tc.lr * warm * decay


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Adam with the schedule above, optionally after global-norm clipping (per SAE)."""
    adam = optax.adam(lambda s: learning_rate(tc, s), b1=tc.adam_b1, b2=tc.adam_b2, eps=ADAM_EPS)
    if tc.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), adam)
    return adam


def _adam_states(tc: TrainConfig, opt_state: Any) -> tuple:
    """The Adam and schedule states inside `make_optimizer(tc)`'s state."""
    return opt_state[1] if tc.max_grad_norm > 0 else opt_state


def _with_adam_states(tc: TrainConfig, opt_state: Any, states: tuple) -> Any:
    return (opt_state[0], states) if tc.max_grad_norm > 0 else states


def per_sae(ok: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` where `ok` [S], else `old` ([S, ...] leaves)."""
    return jnp.where(ok.reshape(ok.shape + (1,) * (new.ndim - 1)), new, old)


def finite_per_sae(loss: jax.Array, grads: Any) -> jax.Array:
    """Bool [S]: SAE s's loss [S] and every value of its gradients (pytree of [S, ...] leaves) are finite,
    checked through each leaf's sum per SAE: a NaN or ±inf anywhere makes it non-finite, and finite values
    only past 3e38 in all (an update then skipped). The sum reads the gradient where it lies; XLA's CPU
    reduction of an isfinite mask would first write the mask out, a [b, d] or [F, d] bool array."""
    ok = jnp.isfinite(loss)
    for g in jax.tree.leaves(grads):
        ok &= jnp.isfinite(jnp.sum(g, axis=tuple(range(1, g.ndim))))
    return ok


def global_norm(params: dict, grads: dict) -> jax.Array:
    """[S]: each SAE's gradient norm over all leaves, W_dec's after its projection (what clipping sees)."""
    total = 0.0
    for name, g in grads.items():
        g = project_out_parallel(params[name], g) if name == "W_dec" else g
        total = total + jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))
    return jnp.sqrt(total)


def hyper(
    tc: TrainConfig, opt_state: Any, params: dict, grads: dict, ok: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(hyper [S, 10] float32, flags [S, 2] int32) of jaxsae.kernels.reference.adam for this step, each
    value computed as optax computes it."""
    adam, schedule = _adam_states(tc, opt_state)
    count = optax.safe_increment(adam.count)
    bc1 = (1 - tc.adam_b1**count).astype(jnp.float32)
    bc2 = (1 - tc.adam_b2**count).astype(jnp.float32)
    step_size = (-1 * jax.vmap(lambda c: learning_rate(tc, c))(schedule.count)).astype(jnp.float32)
    ones = jnp.ones_like(bc1)
    if tc.max_grad_norm > 0:
        g_norm = global_norm(params, grads).astype(jnp.float32)
        clip = ~(g_norm < tc.max_grad_norm)
    else:
        g_norm, clip = ones, jnp.zeros(bc1.shape, bool)
    consts = [np.float32(c) for c in (tc.adam_b1, 1 - tc.adam_b1, tc.adam_b2, 1 - tc.adam_b2)]
    b1, omb1, b2, omb2 = (c * ones for c in consts)
    columns = (step_size, b1, omb1, b2, omb2, bc1, bc2, np.float32(ADAM_EPS) * ones, g_norm,
               np.float32(tc.max_grad_norm) * ones)
    return jnp.stack(columns, axis=1), jnp.stack([ok, clip], axis=1).astype(jnp.int32)


def _leaf_update(mesh: Mesh, name: str, hyper: jax.Array, flags: jax.Array):
    """(param, mu, nu, grad) -> (param, mu, nu) for the leaf `name` [S, ...]: the backend's kernel, run
    per shard where the moments are laid out as the parameter (data axis 1); else the reference, which
    XLA partitions (the moments are split over `data` too, ZeRO-1)."""
    rows = name == "W_dec"
    if mesh.devices.size == 1:
        return lambda p, m, v, g: kernel("adam")(p, m, v, g, hyper, flags, rows)
    if mesh.shape[DATA] > 1:
        return lambda p, m, v, g: reference.adam(p, m, v, g, hyper, flags, rows)
    spec, per_sae = param_spec(name), P(SAE)
    specs = dict(in_specs=(spec,) * 4 + (per_sae, per_sae), out_specs=(spec,) * 3)
    per_shard = lambda p, m, v, g, h, f: kernel("adam")(p, m, v, g, h, f, rows)  # noqa: E731
    # The kernel's custom call carries no device-variance type; its results vary as `spec` says.
    mapped = jax.shard_map(per_shard, mesh=mesh, **specs, check_vma=False)
    return lambda p, m, v, g: mapped(p, m, v, g, hyper, flags)


def moments(tc: TrainConfig, opt_state: Any) -> tuple[dict, dict]:
    """(mu, nu): Adam's moments by parameter name."""
    adam, _ = _adam_states(tc, opt_state)
    return adam.mu, adam.nu


def assemble(tc: TrainConfig, opt_state: Any, new: dict, ok: jax.Array) -> tuple[dict, Any]:
    """(params, opt_state) from `new` (name -> (param, mu, nu) after the step, for every trainable
    name): optax's state with both counts advanced for the SAEs whose update is finite (`ok` [S])."""
    adam, schedule = _adam_states(tc, opt_state)
    counts = (optax.safe_increment(adam.count), optax.safe_increment(schedule.count))
    counts = [per_sae(ok, c, old) for c, old in zip(counts, (adam.count, schedule.count), strict=True)]
    states = (
        adam._replace(
            count=counts[0], mu={n: v[1] for n, v in new.items()}, nu={n: v[2] for n, v in new.items()}
        ),
        schedule._replace(count=counts[1]),
    )
    return {n: v[0] for n, v in new.items()}, _with_adam_states(tc, opt_state, states)


def update(tc: TrainConfig, mesh: Mesh, params: dict, grads: dict, opt_state: Any, ok: jax.Array):
    """(params, opt_state) after one step of `make_optimizer(tc)` on `grads`, for S SAEs ([S, ...] leaves,
    `ok` [S] bool: an SAE whose update is not finite keeps its params and state, counts included). The
    W_dec gradient is projected off the decoder rows first and the rows renormalised after."""
    mu, nu = moments(tc, opt_state)
    h, flags = hyper(tc, opt_state, params, grads, ok)
    new = {n: _leaf_update(mesh, n, h, flags)(p, mu[n], nu[n], grads[n]) for n, p in params.items()}
    return assemble(tc, opt_state, new, ok)
