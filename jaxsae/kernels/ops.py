"""Differentiable sparse operations and exact selections on top of the backend kernels.

Codes are chunked ELL (see jaxsae.kernels.reference): row [C], idx [C, K] (-1 empty), values [C, K].
Gradients never touch a dense [b, F] array: the encoder's gradient is a scatter of the selected
pre-activation gradients, the decoder's a scatter of the selected codes. Collectives name the mesh axis
that splits the batch rows (`data`); latents are not split here (the sparse path needs model = 1).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxsae.kernels import backend, kernel
from jaxsae.selection import all_gather, axis_index, psum, sum_to_vma, vary_like


def _exclusive_cumsum(x: jax.Array) -> jax.Array:
    return jnp.cumsum(x) - x


def _call(name: str, *args, **static):
    """The backend's kernel `name` applied to (*args, **static), its results typed as varying like its
    array inputs (custom calls inside shard_map carry no device-variance type of their own). Kernels
    are not differentiable: selections are constants of the loss, and the products have custom VJPs."""
    args = tuple(lax.stop_gradient(a) if isinstance(a, jax.Array) else a for a in args)
    out = kernel(name)(*args, **static)
    arrays = [a for a in args if isinstance(a, jax.Array)]
    return jax.tree.map(lambda o: vary_like(o, *arrays), out)


# --- differentiable ops ---------------------------------------------------------------------------


@jax.custom_vjp
def keep_cotangent(x: jax.Array) -> jax.Array:
    """x; its cotangent materialised once (the `keep` kernel) before it fans out, e.g. to a decode's
    backward kernels and to a tap: each consumer would otherwise recompute it into its own buffer."""
    return x


keep_cotangent.defvjp(lambda x: (x, None), lambda _, g: (keep(g),))


def keep(x: jax.Array) -> jax.Array:
    """x, materialised once for all its consumers (see jaxsae.kernels.cpu.keep); not differentiable."""
    return _call("keep", x)


@jax.custom_vjp
def error_sums(
    centred: jax.Array, decoded: jax.Array, aux_hat: jax.Array, b_dec: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Σ e², Σ a², Σ over rows of e [d]) of the reconstruction error e = x − x̂ = centred − decoded, with
    centred = x − b_dec (a constant: no gradient) and x̂ = decoded + b_dec, and of aux-k's error
    a = stop_gradient(e) − aux_hat; all [b, d] (aux_hat [0, d]: no aux-k, Σ a² = 0). b_dec's value is in
    centred already; it gets x̂'s gradient with respect to it. On the CPU e and a are written over
    decoded's and aux_hat's buffers, and their gradients over e's and a's (the backward reads nothing
    else): the loss holds no other [b, d] array, and no sum writes its operand out first."""
    return _error_sums_fwd(centred, decoded, aux_hat, b_dec)[0]


def _error_sums_fwd(centred, decoded, aux_hat, b_dec):
    e, a, sums = _call("reconstruction_errors", centred, decoded, aux_hat)
    # aux_hat only when it is empty (no aux-k): a zero gradient typed as it is.
    return (sums[0], sums[1], sums[2:]), (e, a, b_dec, None if aux_hat.shape[0] else aux_hat)


def _error_sums_bwd(res, g):
    e, a, b_dec, no_aux = res
    g_e, g_a, g_rows = g
    d_decoded = _call("scale_shift", e, -2.0 * g_e, -g_rows)
    no_shift = jnp.zeros(a.shape[1], jnp.float32)
    d_aux = jnp.zeros_like(no_aux) if no_aux is not None else _call("scale_shift", a, -2.0 * g_a, no_shift)
    d_b_dec = sum_to_vma(jnp.sum(d_decoded, axis=0), b_dec).astype(b_dec.dtype)
    return None, d_decoded, d_aux, d_b_dec


error_sums.defvjp(_error_sums_fwd, _error_sums_bwd)


@jax.custom_vjp
def sum_squares(a: jax.Array, mean: jax.Array) -> jax.Array:
    """f32[]: Σ (a[r] − mean)² over the rows of a [b, d] (mean [d]). The CPU kernel reads a where it
    is, where XLA would first write (a − mean)² into a [b, d] buffer of its own."""
    return _call("sum_squares", a, mean)


def _sum_squares_fwd(a, mean):
    return sum_squares(a, mean), (a, mean)


def _sum_squares_bwd(res, g):
    a, mean = res
    diff = 2.0 * g * (a - mean)
    return diff, -jnp.sum(diff, axis=0)


sum_squares.defvjp(_sum_squares_fwd, _sum_squares_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def decode(row: jax.Array, idx: jax.Array, val: jax.Array, w_dec: jax.Array, n_rows: int) -> jax.Array:
    """[n_rows, d]: Σ over each row's slots of val · w_dec[idx] (the sparse decode, without b_dec)."""
    return _call("gather_sum", row, idx, val, w_dec, n_rows)


def _decode_fwd(row, idx, val, w_dec, n_rows):
    return decode(row, idx, val, w_dec, n_rows), (row, idx, val, w_dec)


def _decode_bwd(n_rows, res, g):
    row, idx, val, w_dec = res
    d_val = _call("gather_dot", row, idx, g, w_dec)  # 0 in empty slots, on every backend
    d_w = _call("scatter_rows", row, idx, val, g, w_dec.shape[0])
    pairs = ((d_val, val), (d_w, w_dec))
    d_val, d_w = (sum_to_vma(vary_like(d, g, val), p).astype(p.dtype) for d, p in pairs)
    return None, None, d_val, d_w


decode.defvjp(_decode_fwd, _decode_bwd)


@jax.custom_vjp
def selected_pre(
    vals: jax.Array, centred: jax.Array, w_enc: jax.Array, b_enc: jax.Array, b_dec: jax.Array, row, idx
) -> jax.Array:
    """[C, K]: the pre-activations (x − b_dec) W_enc + b_enc at the selected slots, given as `vals`
    [C, K] (already computed with the selection, 0 in empty slots as every selection writes them; no
    gradient flows into them), with centred = x − b_dec [b, d]. Its gradient reaches W_enc [d, F],
    b_enc [F] and b_dec [d] through the selected slots only."""
    del centred, w_enc, b_enc, b_dec, row, idx
    return vals


def _selected_fwd(vals, centred, w_enc, b_enc, b_dec, row, idx):
    res = (centred, w_enc, b_enc, b_dec, row, idx)
    return selected_pre(vals, *res), res


def _selected_bwd(res, g):
    centred, w_enc, b_enc, b_dec, row, idx = res
    n_latents = w_enc.shape[1]
    # Every backend's scatters skip empty slots: g is read as it is (masking it would copy [C, K]).
    d_w_enc = _call("scatter_cols", row, idx, g, centred, n_latents)
    # Σ g per latent, as the scatter kernel's sums against a column of ones: XLA's scatter-add took
    # 9 ms for aux-k's [B, 384] slots at 8x (with its index copy), most of them empty.
    ones = jnp.ones((centred.shape[0], 1), jnp.float32)
    d_b_enc = _call("scatter_rows", row, idx, g, ones, n_latents)[:, 0]
    d_b_dec = -(w_enc.astype(jnp.float32) @ d_b_enc)
    pairs = ((d_w_enc, w_enc), (d_b_enc, b_enc), (d_b_dec, b_dec))
    typed = (sum_to_vma(vary_like(d, g, centred, w_enc), p).astype(p.dtype) for d, p in pairs)
    d_w_enc, d_b_enc, d_b_dec = typed
    return None, None, d_w_enc, d_b_enc, d_b_dec, None, None


selected_pre.defvjp(_selected_fwd, _selected_bwd)


def fire_count(row: jax.Array, idx: jax.Array, fired: jax.Array, n_latents: int, n_rows: int) -> jax.Array:
    """[n_latents] int32: how many slots of each latent have `fired` [C, K] set (codes on n_rows rows).
    Counted by the scatter kernel against a column of ones (exact in float32 up to 2²⁴ per latent):
    XLA's scatter-add would first copy its [C·K] indices twice."""
    ones = jnp.ones((n_rows, 1), jnp.float32)
    return _call("scatter_rows", row, idx, fired.astype(jnp.float32), ones, n_latents)[:, 0].astype(jnp.int32)


# --- encoder and selections -----------------------------------------------------------------------


def encode(x: jax.Array, w_enc: jax.Array, b_enc: jax.Array) -> jax.Array:
    """[b, F] float32 pre-activations x·W_enc + b_enc of centred rows x [b, d] (a constant: no gradient)."""
    return _call("encode", x, w_enc, b_enc)


def encode_histogram(x: jax.Array, w_enc: jax.Array, b_enc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(encode(...) [b, F], positive_histogram of it at level 0 [65536] int32): batchtopk's encoder with the
    first pass of its radix select fused in (constants: no gradient)."""
    return _call("encode_histogram", x, w_enc, b_enc)


def encode_topk(x, w_enc, b_enc, k, mask, size: int, k_aux, mask_aux, size_aux: int):
    """The encoder fused with per-row top-k selections (see jaxsae.kernels.reference.encode_topk): the
    [b, F] pre-activations are never held whole by the CPU kernel. Returns (idx [b, size], pre at idx,
    aux_idx [b, size_aux], pre at aux_idx); constants (no gradient)."""
    return _call("encode_topk", x, w_enc, b_enc, k, mask, size, k_aux, mask_aux, size_aux)


def values_at(a: jax.Array, row: jax.Array, slot: jax.Array) -> jax.Array:
    """a[row[c], slot[c, j]] for a [b, n], 0 where slot is -1 (codes' values read off dense rows)."""
    got = a[row[:, None], jnp.maximum(slot, 0)]
    return jnp.where(slot >= 0, got, jnp.zeros((), a.dtype))


def encode_batchtopk(
    x, w_enc, b_enc, k, k_max: int, k_aux, mask_aux, data: str | None = None, fused: bool = True
):
    """batchtopk's selection on centred rows x [b, d] (rows split over `data`): the codes
    select_batchtopk(pre, k, k_max, data) with pre = encode(x, w_enc, b_enc) [b, F] and their values
    (row [C], idx [C, k_max], pre at the slots), aux-k's per-row top k_aux among latents with mask_aux
    (idx [b, k_aux], pre at idx) and the smallest kept value. On one shard with the CPU kernels the
    [b, F] pre-activations are never held (jaxsae.kernels.cpu.encode_batchtopk); else (or not `fused`)
    this composition, which defines the result. Constants (no gradient)."""
    b = x.shape[0]
    if fused and data is None and hasattr(backend(), "encode_batchtopk"):
        kb = jnp.asarray(k, jnp.int32) * b
        out = _call("encode_batchtopk", x, w_enc, b_enc, kb, mask_aux, k_aux, 2 * b, k_max, k_aux)
        return out[:6]
    pre, hist = encode_histogram(x, w_enc, b_enc)
    row, idx, smallest = select_batchtopk(pre, k, k_max, data, hist)
    rows, aux_idx = select_topk(pre, k_aux, k_aux, mask=mask_aux)
    return row, idx, values_at(pre, row, idx), aux_idx, values_at(pre, rows, aux_idx), smallest


def encode_above(x, w_enc, b_enc, thr, size: int, n_chunks: int, fused: bool = True):
    """jumprelu's selection on centred rows x [b, d]: (row [n_chunks], idx [n_chunks, size], pre at the
    slots, counts [b]) = select_above(pre, thr, size, n_chunks) of pre = encode(x, w_enc, b_enc) and
    count_above(pre, thr), thr [F]. With the CPU kernels (and `fused`) pre [b, F] is never held; the codes
    equal this composition's where they fit (see jaxsae.sparse_loss.jumprelu_fits). Constants."""
    if fused and hasattr(backend(), "encode_above"):
        return _call("encode_above", x, w_enc, b_enc, thr, n_chunks, size)
    pre = encode(x, w_enc, b_enc)
    counts = count_above(pre, thr)
    row, idx = select_above(pre, thr, size, n_chunks, counts)
    return row, idx, values_at(pre, row, idx), counts


def select_topk(acts: jax.Array, k: jax.Array | int, k_max: int, mask: jax.Array | None = None):
    """TopK as chunked ELL: (row [b], idx [b, k_max]); per row the k largest positive entries of
    acts [b, F] among latents with mask [F] (default all)."""
    mask = jnp.ones(acts.shape[1], bool) if mask is None else mask
    idx = _call("topk_rows", acts, k, mask, k_max)
    return jnp.arange(acts.shape[0], dtype=jnp.int32), idx


def count_above(acts: jax.Array, thr: jax.Array) -> jax.Array:
    """[b] int32: per row, the entries of acts [b, F] above thr [F]."""
    return _call("row_counts", acts, thr)[0]


def select_above(
    acts: jax.Array, thr: jax.Array, size: int, n_chunks: int, n_above: jax.Array | None = None
):
    """Chunked ELL (row [n_chunks], idx [n_chunks, size]) of the entries with acts [b, F] > thr [F]
    (`n_above`: `count_above(acts, thr)` if already computed); the caller makes sure they fit (see
    jaxsae.sparse_loss.jumprelu_fits); rows that do not fit lose their last entries."""
    n_above = count_above(acts, thr) if n_above is None else n_above
    n_row_chunks = (n_above + size - 1) // size
    quota = jnp.zeros_like(n_above)
    return _call("compact", acts, thr, quota, _exclusive_cumsum(n_row_chunks), n_chunks, size)


def select_batchtopk(
    acts: jax.Array, k: jax.Array | int, k_max: int, data: str | None = None, hist: jax.Array | None = None
):
    """BatchTopK as chunked ELL: exactly k·B positive entries of the global batch (rows split over
    `data`; fewer when fewer are positive), ties by lower row-major global index, as
    jaxsae.selection.batchtopk_mask. Returns (row [C], idx [C, k_max], smallest kept value) with
    C = b·(1 + data size): a row with n entries spans ceil(n / k_max) chunks, and Σ n ≤ k·B. `hist`:
    positive_histogram(acts, 0, 0) if already computed (see encode_histogram)."""
    b, n_latents = acts.shape
    n_shards = lax.psum(1, data) if data else 1
    kb = jnp.asarray(k, jnp.int32) * b * n_shards
    t_bits, need = _kth_largest_bits(acts, kb, data, hist)
    thr = jnp.full(n_latents, lax.bitcast_convert_type(t_bits, jnp.float32))
    n_above, n_equal = _call("row_counts", acts, thr)
    n_equal = jnp.where(t_bits > 0, n_equal, 0)  # with too few positives, zeros are not taken
    ties_before = _exclusive_cumsum(n_equal) + _earlier_shards(jnp.sum(n_equal), data)
    quota = jnp.clip(need - ties_before, 0, n_equal)
    n_chunks = (n_above + quota + k_max - 1) // k_max
    row, idx = _call("compact", acts, thr, quota, _exclusive_cumsum(n_chunks), b * (1 + n_shards), k_max)
    return row, idx, lax.bitcast_convert_type(t_bits, jnp.float32)


def _earlier_shards(total: jax.Array, data: str | None) -> jax.Array:
    """Sum of `total` over the data shards before this one."""
    totals = all_gather(total[None], data, dim=0)
    return jnp.sum(jnp.where(jnp.arange(totals.shape[0]) < axis_index(data), totals, 0))


def _kth_largest_bits(acts: jax.Array, kb: jax.Array, data: str | None, hist: jax.Array | None = None):
    """(bits of the kb-th largest positive value of the global batch, or 0 if fewer are positive;
    how many entries equal to it must be taken), by a two-level 16-bit radix select: two histogram
    passes over the local entries (the first one skipped when `hist` is given), each followed by one
    psum of 65536 integers."""
    hist = _call("positive_histogram", acts, 0, 0) if hist is None else hist
    at_least_hi = _at_least(hist, kb, data)
    hi = jnp.maximum(jnp.sum(at_least_hi >= kb) - 1, 0)
    above_hi = _next(at_least_hi, hi)
    at_least_lo = _at_least(_call("positive_histogram", acts, hi, 1), kb, data)
    lo = jnp.maximum(jnp.sum(at_least_lo >= kb - above_hi) - 1, 0)
    above = above_hi + _next(at_least_lo, lo)
    enough = at_least_hi[0] >= kb
    bits = jnp.where(enough, (hi << 16) | lo, 0).astype(jnp.int32)
    return bits, jnp.where(enough, kb - above, 0)


def _at_least(hist: jax.Array, cap: jax.Array, data: str | None) -> jax.Array:
    """[65536]: entries of the global batch in bins ≥ h, saturated at `cap` (exact below it). Bins are
    clipped to `cap` before the psum and summed with saturation, so that batches of more than 2^31
    entries cannot overflow int32 (needs cap · data size < 2^31)."""
    hist = jnp.minimum(psum(jnp.minimum(hist, cap), data), cap)
    return lax.associative_scan(lambda a, b: jnp.minimum(a + b, cap), hist, reverse=True)


def _next(at_least: jax.Array, h: jax.Array) -> jax.Array:
    """at_least[h + 1], 0 past the end."""
    return jnp.where(h + 1 < at_least.shape[0], at_least[jnp.minimum(h + 1, at_least.shape[0] - 1)], 0)
