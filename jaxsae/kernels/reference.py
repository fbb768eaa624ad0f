"""Pure-JAX reference of the sparse kernels: the semantics every backend (C++ on the CPU, Pallas on
GPU/TPU) must reproduce, and the fallback where none is available.

Sparse codes are held in *chunked ELL* form, one layout for every architecture:
  row [C] int32   the batch row each chunk belongs to; non-decreasing; every row in [0, b)
  idx [C, K] int32 latent ids of the chunk, ascending within a row; -1 marks an empty slot
  val [C, K]      a value per slot (0 in empty slots)
A row with n selected latents spans ceil(n / K) consecutive chunks (TopK: one chunk of K = k per row).
Unused chunks at the end carry row = b - 1 and idx = -1. These functions materialise [C, K, d]: fine for
tests and small shapes, which is why the real backends exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae.sae import project_out_parallel, unit_rows


def _rows_of(w: jax.Array, idx: jax.Array) -> jax.Array:
    """w[idx] [C, K, d] with zero rows for empty slots."""
    return jnp.where((idx >= 0)[..., None], w[jnp.maximum(idx, 0)], 0.0)


def keep(x: jax.Array) -> jax.Array:
    """The identity (the CPU kernel's materialises x once; see jaxsae.kernels.cpu.keep)."""
    return x


def sum_squares(a: jax.Array, mean: jax.Array) -> jax.Array:
    """f32[]: Σ (a[r] − mean)² over the rows of a [R, d] (mean [d])."""
    return jnp.sum((a.astype(jnp.float32) - mean.astype(jnp.float32)) ** 2)


def reconstruction_errors(
    centred: jax.Array, decoded: jax.Array, aux_hat: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(e, a, sums): e = centred − decoded [b, d], a = e − aux_hat (aux_hat [0, d]: none, a [0, d]),
    sums [d + 2] = (Σ e², Σ a², Σ over rows of e)."""
    e = centred.astype(jnp.float32) - decoded.astype(jnp.float32)
    a = e - aux_hat.astype(jnp.float32) if aux_hat.shape[0] else aux_hat.astype(jnp.float32)
    return e, a, jnp.concatenate([jnp.stack([jnp.sum(e**2), jnp.sum(a**2)]), jnp.sum(e, axis=0)])


def scale_shift(a: jax.Array, s: jax.Array, v: jax.Array) -> jax.Array:
    """s · a + v (a [R, d], s [], v [d])."""
    return s * a.astype(jnp.float32) + v


def gather_sum(row: jax.Array, idx: jax.Array, val: jax.Array, w: jax.Array, n_rows: int) -> jax.Array:
    """[n_rows, d]: out[r] = Σ over the slots (c, j) of row r of val[c, j] · w[idx[c, j]]  (w [F, d]).
    The sparse decode; accumulates in float32."""
    per_chunk = jnp.einsum("ck,ckd->cd", val.astype(jnp.float32), _rows_of(w, idx).astype(jnp.float32))
    return jax.ops.segment_sum(per_chunk, row, n_rows, indices_are_sorted=True)


def gather_dot(row: jax.Array, idx: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    """[C, K] float32: y[row[c]] · w[idx[c, j]] (y [b, d], w [F, d]); 0 in empty slots.
    The decode's gradient with respect to the values."""
    return jnp.einsum("cd,ckd->ck", y[row].astype(jnp.float32), _rows_of(w, idx).astype(jnp.float32))


def scatter_rows(row: jax.Array, idx: jax.Array, val: jax.Array, y: jax.Array, n_latents: int) -> jax.Array:
    """[n_latents, d] float32: out[f] = Σ over slots with idx = f of val[c, j] · y[row[c]] (y [b, d]).
    The decoder's gradient (y = the output gradient) and the encoder's transposed gradient
    (y = the centred input, val = the gradient of the pre-activations)."""
    contrib = val.astype(jnp.float32)[..., None] * y[row].astype(jnp.float32)[:, None, :]  # [C, K, d]
    flat_idx = jnp.where(idx >= 0, idx, n_latents).reshape(-1)
    out = jnp.zeros((n_latents + 1, y.shape[1]), jnp.float32)
    return out.at[flat_idx].add(contrib.reshape(-1, y.shape[1]))[:n_latents]


def scatter_cols(row: jax.Array, idx: jax.Array, val: jax.Array, y: jax.Array, n_latents: int) -> jax.Array:
    """[d, n_latents] float32: scatter_rows transposed (the encoder's gradient in W_enc's layout)."""
    return scatter_rows(row, idx, val, y, n_latents).T


def topk_rows(acts: jax.Array, k: jax.Array | int, mask: jax.Array, size: int) -> jax.Array:
    """idx [b, size] int32: per row, the k largest entries among latents with mask[f] and acts > 0
    (ties: lower latent id first), in ascending latent order, then -1. `k` ≤ `size` may be traced;
    acts [b, F] float32, mask [F] bool."""
    masked = jnp.where(mask & (acts > 0), acts, -jnp.inf)
    vals, pos = jax.lax.top_k(masked, size)
    keep = (jnp.arange(size) < k) & (vals > -jnp.inf)
    return _ascending(jnp.where(keep, pos, -1))


def _ascending(idx: jax.Array) -> jax.Array:
    """Sorts each row's ids ascending with the -1s moved to the end."""
    big = jnp.iinfo(jnp.int32).max
    s = jnp.sort(jnp.where(idx < 0, big, idx), axis=-1)
    return jnp.where(s == big, -1, s).astype(jnp.int32)


def positive_histogram(acts: jax.Array, prefix: jax.Array | int, level: int) -> jax.Array:
    """[65536] int32 counts of the float32 bit patterns of the positive entries of acts [b, F].
    level 0: bins are the high 16 bits (prefix ignored); level 1: bins are the low 16 bits of the
    entries whose high 16 bits equal `prefix`. Two levels give the exact k-th largest value."""
    bits = jax.lax.bitcast_convert_type(acts.astype(jnp.float32), jnp.int32)
    pos = acts > 0
    if level == 0:
        keys, take = bits >> 16, pos
    else:
        keys, take = bits & 0xFFFF, pos & ((bits >> 16) == prefix)
    return jnp.zeros(65536, jnp.int32).at[keys.reshape(-1)].add(take.reshape(-1).astype(jnp.int32))


def row_counts(acts: jax.Array, thr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(n_above [b], n_equal [b]) int32: per row, entries with acts[r, f] > thr[f] and == thr[f]
    (acts [b, F], thr [F] float32)."""
    above = jnp.sum(acts > thr, axis=1, dtype=jnp.int32)
    equal = jnp.sum(acts == thr, axis=1, dtype=jnp.int32)
    return above, equal


def compact(
    acts: jax.Array, thr: jax.Array, quota: jax.Array, chunk_start: jax.Array, n_chunks: int, size: int
) -> tuple[jax.Array, jax.Array]:
    """Chunked ELL (row [n_chunks], idx [n_chunks, size]) of the entries with acts[r, f] > thr[f], plus
    the first quota[r] entries of row r (by latent id) with acts[r, f] == thr[f]. Row r's entries fill
    the chunks from chunk_start[r] on (the caller sizes chunk_start from row_counts; the chunks of a
    row never overlap the next row's). acts [b, F], thr [F] float32, quota and chunk_start [b] int32."""
    b, n_latents = acts.shape
    eq = acts == thr
    eq_rank = jnp.cumsum(eq, axis=1, dtype=jnp.int32) - eq
    take = (acts > thr) | (eq & (eq_rank < quota[:, None]))
    slot = jnp.cumsum(take, axis=1, dtype=jnp.int32) - 1  # position of the entry within its row
    chunk = chunk_start[:, None] + slot // size
    flat = jnp.where(take, chunk * size + slot % size, n_chunks * size)
    latent = jnp.broadcast_to(jnp.arange(n_latents, dtype=jnp.int32), acts.shape)
    idx = jnp.full(n_chunks * size + 1, -1, jnp.int32).at[flat.reshape(-1)].set(latent.reshape(-1))
    idx = idx[:-1].reshape(n_chunks, size)
    n_row_chunks = jnp.zeros(b, jnp.int32).at[:].set((jnp.sum(take, axis=1) + size - 1) // size)
    owner = jnp.full(n_chunks + 1, 0, jnp.int32)
    owner = owner.at[jnp.where(n_row_chunks > 0, chunk_start, n_chunks)].max(jnp.arange(b, dtype=jnp.int32))
    row = jax.lax.cummax(owner[:-1], axis=0)
    used = jnp.arange(n_chunks) < jnp.max(jnp.where(n_row_chunks > 0, chunk_start + n_row_chunks, 0))
    return jnp.where(used, row, b - 1).astype(jnp.int32), idx


def encode(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """[R, F] float32 pre-activations x·w + b (x [R, d], w [d, F], b [F]; x is already centred): a
    matmul in the operands' dtype (bfloat16 ones take the bfloat16 units), accumulated in float32."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32) + b.astype(jnp.float32)


def encode_histogram(x: jax.Array, w: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(encode(x, w, b) [R, F], positive_histogram(that, 0, 0) [65536]): batchtopk's first radix pass."""
    pre = encode(x, w, b)
    return pre, positive_histogram(pre, 0, 0)


def _values_at(acts: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.where(idx >= 0, jnp.take_along_axis(acts, jnp.maximum(idx, 0), axis=1), 0.0)


def encode_topk(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    k: jax.Array | int,
    mask: jax.Array,
    size: int,
    k_aux: jax.Array | int,
    mask_aux: jax.Array,
    size_aux: int,
):
    """The encoder fused with two per-row selections, on pre = encode(x, w, b) [R, F]:
    (idx [R, size], val [R, size]) = topk_rows(pre, k, mask, size) and pre at those slots (0 where -1),
    and (aux_idx [R, size_aux], aux_val) likewise for topk_rows(pre, k_aux, mask_aux, size_aux)."""
    pre = encode(x, w, b)
    idx = topk_rows(pre, k, mask, size)
    aux_idx = topk_rows(pre, k_aux, mask_aux, size_aux)
    return idx, _values_at(pre, idx), aux_idx, _values_at(pre, aux_idx)


ADAM_HYPER = (
    "step_size", "b1", "one_minus_b1", "b2", "one_minus_b2", "bc1", "bc2", "eps", "g_norm", "max_norm"
)


def adam(
    param: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    grad: jax.Array,
    hyper: jax.Array,
    flags: jax.Array,
    rows: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Adam step of S SAEs as optax's clip_by_global_norm -> scale_by_adam -> scale_by_schedule ->
    apply_updates, in its float32 operation order: (param, mu, nu) after it. param, mu, nu, grad [S, ...]
    float32; hyper [S, 10] float32 in the order of ADAM_HYPER (bc = 1 − b^count, step_size = −lr); flags
    [S, 2] int32: (the update is finite, clip: grad · max_norm / g_norm). An SAE whose update is not finite
    keeps its values. rows: param is W_dec [S, F, d]: the gradient's component along each (unit) row is
    removed first and the rows are renormalised after."""
    shape = (-1,) + (1,) * (param.ndim - 1)
    h = dict(zip(ADAM_HYPER, (hyper[:, i].reshape(shape) for i in range(len(ADAM_HYPER))), strict=True))
    ok, clip = (flags[:, i].reshape(shape) != 0 for i in (0, 1))
    g = project_out_parallel(param, grad) if rows else grad
    g = jnp.where(clip, (g / h["g_norm"]) * h["max_norm"], g)
    m = h["one_minus_b1"] * g + h["b1"] * mu
    v = h["one_minus_b2"] * (g * g) + h["b2"] * nu
    p = param + h["step_size"] * ((m / h["bc1"]) / (jnp.sqrt(v / h["bc2"]) + h["eps"]))
    p = unit_rows(p) if rows else p
    return tuple(jnp.where(ok, new, old) for new, old in ((p, param), (m, mu), (v, nu)))


def scatter_adam(
    param: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    codes_a: tuple[jax.Array, jax.Array, jax.Array],
    codes_b: tuple[jax.Array, jax.Array, jax.Array],
    y_a: jax.Array,
    y_b: jax.Array,
    hyper: jax.Array,
    flags: jax.Array,
    transposed: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`adam` on the gradient scattered from two code sets (codes and aux-k's), per SAE of S:
    scatter_rows (W_dec [S, F, d]) or scatter_cols (`transposed`: W_enc [S, d, F]) of set a over y_a[s] and
    of set b over y_b[s], summed. codes (row [S, C], idx [S, C, K], val [S, C, K]); y_a, y_b [S, B, d].
    No clipping (it needs the whole gradient first)."""
    n_latents = param.shape[2 if transposed else 1]
    scatter = scatter_cols if transposed else scatter_rows

    def grad(a, b, y_a, y_b):
        return scatter(*a, y_a, n_latents) + scatter(*b, y_b, n_latents)

    g = jax.vmap(grad)(codes_a, codes_b, y_a, y_b)
    return adam(param, mu, nu, g, hyper, flags, rows=not transposed)
