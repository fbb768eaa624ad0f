"""Exact TopK and BatchTopK selection on data- and latent-sharded activations, inside `shard_map`.

Each device holds `acts` [b, f]: its b rows of the global batch (split over DATA) and its f latents
(split over MODEL). The results equal the single-device selections of jaxsae.activations, ties included
(lower global index first), while only small arrays cross devices: per-row candidates for TopK, one
integer count per bisection pass for BatchTopK. Outside shard_map (no mesh) the axis names are `None`
and every collective is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DATA, MODEL, SAE = "data", "model", "sae"
_INF_BITS = 0x7F800000  # float32 +inf as int32: the top of the search range for non-negative floats


def psum(x: jax.Array, axes) -> jax.Array:
    return lax.psum(x, axes) if axes else x


def vary(x: jax.Array, axis: str | None) -> jax.Array:
    """Marks a value that is equal on every device of `axis` as device-varying, so that its gradient
    is summed over `axis` (needed before a custom_vjp whose backward rule works per device)."""
    return lax.pcast(x, (axis,), to="varying") if axis else x


def vma(x: jax.Array) -> frozenset:
    """The mesh axes along which `x` varies inside shard_map (empty outside)."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)  # jax 0.10: .mat.varying (was .vma)
    return frozenset(mat.varying) if mat is not None else frozenset()


def vary_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """`x` marked varying along every axis along which one of `refs` varies (for results of custom
    calls, which carry no such type)."""
    missing = frozenset().union(*map(vma, refs)) - vma(x)
    return lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def sum_to_vma(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent summed over the axes along which it varies but its primal does not: the gradient of
    a value replicated over devices is the sum of the per-device gradients."""
    extra = vma(ct) - vma(primal)
    return lax.psum(ct, tuple(sorted(extra))) if extra else ct


def axis_index(axis: str | None) -> jax.Array:
    return lax.axis_index(axis) if axis else jnp.int32(0)


def all_gather(x: jax.Array, axis: str | None, dim: int) -> jax.Array:
    """Concatenates `x` from every device of `axis` along `dim`, in device order."""
    return lax.all_gather(x, axis, axis=dim, tiled=True) if axis else x


def topk_mask(acts: jax.Array, k: jax.Array | int, k_max: int, model: str | None = MODEL) -> jax.Array:
    """Boolean [b, f]: each row's k largest entries over all latent shards (ties: lower index first).

    Every shard proposes its k_max best per row; the all-gathered candidates are ordered by shard, then
    index, so a stable top-k over them breaks ties as the unsharded top-k does."""
    per_shard = min(k_max, acts.shape[1])
    cand, idx = lax.top_k(acts, per_shard)
    _, pos = lax.top_k(all_gather(cand, model, dim=1), k_max)
    mine = (pos // per_shard == axis_index(model)) & (jnp.arange(k_max) < k)
    local = jnp.take_along_axis(idx, pos % per_shard, axis=1)
    rows = jnp.arange(acts.shape[0])[:, None]
    return jnp.zeros(acts.shape, jnp.int32).at[rows, local].add(mine.astype(jnp.int32)) > 0


def batchtopk_mask(
    acts: jax.Array, k: jax.Array | int, data: str | None = DATA, model: str | None = MODEL
) -> tuple[jax.Array, jax.Array]:
    """Boolean [b, f] selecting exactly k·B entries of the global batch [B, F] of non-negative `acts`
    (ties: lower row-major global index first), and the smallest selected value.

    The k·B-th largest value is found by bisection on the float bits (monotone for non-negative floats):
    31 passes, each a local count and one psum of an integer."""
    axes = tuple(a for a in (data, model) if a)
    bits = lax.bitcast_convert_type(jnp.where(acts > 0, acts, 0.0).astype(jnp.float32), jnp.int32)
    n_rows = acts.shape[0] * (lax.psum(1, data) if data else 1)
    kb = jnp.asarray(k * n_rows, jnp.int32)

    def count_at_least(t):  # clamped before the psum so that huge shards cannot overflow int32
        return psum(jnp.minimum(jnp.sum(bits >= t, dtype=jnp.int32), kb), axes)

    def halve(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo + 1) // 2
        ok = count_at_least(mid) >= kb
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    zero = count_at_least(_INF_BITS) * 0  # carries the loop's device-variance type under shard_map
    t, _ = lax.fori_loop(0, 31, halve, (zero, zero + _INF_BITS))
    above = bits > t
    need = kb - psum(jnp.sum(above, dtype=jnp.int32), axes)
    ties = bits == t
    mask = above | (ties & (_tie_rank(ties, data, model) < need))
    return mask, lax.bitcast_convert_type(t, jnp.float32)


def _tie_rank(ties: jax.Array, data: str | None, model: str | None) -> jax.Array:
    """[b, f] int32: how many ties precede each entry in the global row-major order of [B, F]."""
    per_row = jnp.sum(ties, axis=1, dtype=jnp.int32)  # [b] on this latent shard
    shards = all_gather(per_row[None], model, dim=0)  # [m, b]
    me = axis_index(model)
    before_in_row = jnp.sum(jnp.where(jnp.arange(shards.shape[0])[:, None] < me, shards, 0), axis=0)
    row_total = shards.sum(0)  # [b] over all latent shards
    rows_before = jnp.cumsum(row_total) - row_total  # earlier rows of this data shard
    data_totals = all_gather(row_total.sum()[None], data, dim=0)  # [dp]
    shards_before = jnp.sum(jnp.where(jnp.arange(data_totals.shape[0]) < axis_index(data), data_totals, 0))
    in_row = jnp.cumsum(ties, axis=1, dtype=jnp.int32) - ties
    return shards_before + rows_before[:, None] + before_in_row[:, None] + in_row
