"""The sparse step's loss, gradients and Adam update with W_enc's and W_dec's gradients never
materialised (topk, batchtopk, jumprelu): their gradients are scatters of a few [b, d] and [C, K] arrays
(jaxsae.kernels.ops), so instead of writing two [F, d] gradients and reading them back in Adam, the
kernel `scatter_adam` accumulates each tile of latents and applies Adam to it at once, in place.

The gradients it scatters are the loss's gradients with respect to `Taps` (zeros added to the sparse
products' outputs, see jaxsae.sparse_loss): those, the small parameters' gradients and the codes are
all the step needs. Equal to jaxsae.step's unfused path (tests/test_fused_step.py). Needs: no gradient
clipping (the global norm needs the whole gradient first), a data axis of size 1 (each device owns its
SAEs whole). jumprelu's tanh penalty also reaches W_dec through its row norms: that
gradient is parallel to each (unit) row, which the update projects out, so it is left out here.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsae import optimizer
from jaxsae.config import RunConfig, SAEConfig
from jaxsae.kernels import kernel, ops
from jaxsae.losses import LossHParams, LossOut
from jaxsae.selection import DATA, MODEL, SAE, vary_like
from jaxsae.sharding import BATCH, params_specs, state_specs
from jaxsae.sparse_loss import Selection, Taps, codes_at, select, sparse_sae_loss, zero_taps

FUSED_ARCHITECTURES = ("topk", "batchtopk", "jumprelu")
_MATRICES = ("W_enc", "W_dec")


def supports(cfg: RunConfig, mesh: Mesh) -> bool:
    """Whether `cfg` on `mesh` can take the fused step (given that the sparse loss applies)."""
    return (
        cfg.sae.architecture in FUSED_ARCHITECTURES
        and cfg.train.max_grad_norm <= 0
        and mesh.shape[DATA] == 1
        and mesh.shape[MODEL] == 1
    )


def per_sae(fn):
    """`fn` over the leading SAE axis of every argument (all [S, ...]): vmapped, or with one SAE called
    on the arrays without it, so that XLA sees no batch dimension (rank-1 scatter indices, no copies
    between [1, b, d] and [b, d] layouts)."""

    def mapped(*args):
        if jax.tree.leaves(args)[0].shape[0] != 1:
            return jax.vmap(fn)(*args)
        out = fn(*jax.tree.map(lambda a: a[0], args))
        return jax.tree.map(lambda a: jnp.expand_dims(a, 0), out)

    return mapped


def tap_gradients(
    cfg: RunConfig, params: dict, fixed: dict, x: jax.Array, dead: jax.Array, hp: LossHParams,
    scale: jax.Array, layer: jax.Array,
) -> tuple[jax.Array, Selection, dict, Taps, LossOut]:
    """The step's forward and backward for the S SAEs a device holds (every leaf [S, ...]; x [L, b, d]
    raw): (centred rows [S, b, d] (scaled, less the old b_dec), the selection, the small parameters'
    gradients, the taps' gradients, LossOut). Everything the update needs, without an [F, d] gradient."""
    k_max = max(cfg.sae_ks())
    one = partial(_tap_gradients_one, cfg.sae, k_max, x)
    return per_sae(one)(params, fixed, dead, hp, scale, layer)


def _tap_gradients_one(
    cfg: SAEConfig, k_max: int, x: jax.Array, params: dict, fixed: dict, dead: jax.Array, hp: LossHParams,
    scale: jax.Array, layer: jax.Array,
) -> tuple[jax.Array, Selection, dict, Taps, LossOut]:
    """`tap_gradients` of one SAE (leaves without the S axis). The [b, d] arrays that several kernels
    read (the centred rows; the taps' gradients, in sparse_sae_loss) are kept (jaxsae.kernels.cpu.keep):
    XLA would otherwise recompute them in one fusion per consumer and shape, each its own [b, d] buffer.
    The scaled rows are read only through the centred ones: never an array of their own."""
    both = {**params, **fixed}
    rows = x[layer] * scale
    centred = ops.keep(rows - params["b_dec"])
    sel = select(cfg, both, rows, dead, hp, k_max=k_max, centred=centred)
    small = {n: v for n, v in params.items() if n not in _MATRICES}

    def loss(small: dict, taps: Taps):
        return sparse_sae_loss(
            cfg, {**both, **small}, rows, dead, hp, k_max=k_max, selection=sel, taps=taps, centred=centred
        )

    (g_small, g_taps), out = jax.grad(loss, argnums=(0, 1), has_aux=True)(small, zero_taps(sel, rows))
    return centred, sel, g_small, g_taps, out


def per_device(
    cfg: RunConfig, params: dict, fixed: dict, opt_state: Any, x: jax.Array, dead: jax.Array, hp: LossHParams,
    scale: jax.Array, layer: jax.Array, todo: jax.Array,
) -> tuple[dict, Any, LossOut, jax.Array]:
    """One step of the S SAEs a device holds (every leaf [S, ...]; x [L, b, d] raw; `todo` [S] bool, the
    SAEs to update): (trainable params, opt_state, LossOut, ok [S]). An SAE whose loss or gradients are
    not finite, or whose codes are not exact (out.metrics["exact"], jumprelu's), keeps its values."""
    tc = cfg.train
    centred, sel, g_small, g_taps, out = tap_gradients(cfg, params, fixed, x, dead, hp, scale, layer)
    ok = optimizer.finite_per_sae(out.metrics["loss"], (g_small, g_taps)) & todo & (out.metrics["exact"] == 1)
    h, flags = optimizer.hyper(tc, opt_state, {}, {}, ok)
    mu, nu = optimizer.moments(tc, opt_state)
    new = {n: kernel("adam")(params[n], mu[n], nu[n], g, h, flags, False) for n, g in g_small.items()}
    # The codes as the decodes read them. Empty slots (idx −1) are skipped by the scatters: no masking
    # needed. TopK's, BatchTopK's and aux-k's selections take positive entries only (every backend), so
    # their ReLU is the identity: the pre-activations are read as they are, not copied.
    main_codes = sel.pre
    if cfg.sae.architecture == "jumprelu":
        codes = per_sae(lambda p, pre, idx: codes_at(cfg.sae, p, pre, idx)[0])
        main_codes = codes({**params, **fixed}, sel.pre, sel.idx)
    main = (sel.row, sel.idx, main_codes)
    aux = (sel.aux_row, sel.aux_idx, sel.aux_pre)  # jumprelu: no slots
    # jumprelu has no aux slots, so y_b is never read: passing main keeps its zero aux gradient out of memory.
    aux_y = g_taps.main if cfg.sae.architecture == "jumprelu" else g_taps.aux
    new["W_dec"] = kernel("scatter_adam")(
        params["W_dec"], mu["W_dec"], nu["W_dec"], main, aux, g_taps.main, aux_y, h, flags, False
    )
    enc_main = (sel.row, sel.idx, g_taps.pre)
    enc_aux = (sel.aux_row, sel.aux_idx, g_taps.aux_pre)
    new["W_enc"] = kernel("scatter_adam")(
        params["W_enc"], mu["W_enc"], nu["W_enc"], enc_main, enc_aux, centred, centred, h, flags, True
    )
    new = {n: tuple(vary_like(a, params[n]) for a in v) for n, v in new.items()}
    new_params, new_opt = optimizer.assemble(tc, opt_state, new, ok)
    return new_params, new_opt, out, ok


def update(
    cfg: RunConfig, mesh: Mesh, params: dict, fixed: dict, opt_state: Any, x: jax.Array, dead: jax.Array,
    hp: LossHParams, scale: jax.Array, layer: jax.Array, todo: jax.Array,
) -> tuple[dict, Any, LossOut, jax.Array]:
    """`per_device` over the mesh: directly on one device, else under shard_map (SAEs split over `sae`)."""
    step = partial(per_device, cfg)
    args = (params, fixed, opt_state, x, dead, hp, scale, layer, todo)
    if mesh.devices.size == 1:
        return step(*args)
    opt_specs, per_sae = state_specs(opt_state), P(SAE)
    in_specs = (params_specs(params), params_specs(fixed), opt_specs, BATCH, P(SAE, MODEL)) + (per_sae,) * 4
    out_specs = (params_specs(params), opt_specs, LossOut(P(SAE, MODEL), per_sae, per_sae), per_sae)
    # data and model have size 1 here: every value is trivially the same over them, which the
    # device-variance check cannot infer through the kernels' custom calls.
    mapped = jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return mapped(*args)
