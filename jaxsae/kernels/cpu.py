"""The sparse kernels as C++ custom calls on the CPU (XLA FFI, OpenMP): same functions, signatures and
results as `reference` (integers exactly, floats to rounding), built on first use by `build`.

Values are float32 inside the kernels: other float dtypes (bfloat16) are cast in these wrappers, which
is exact for the comparisons and matches the reference's float32 accumulation. Every call is a
primitive without a VJP (the training step defines the gradients), batched under `jax.vmap` by a loop
(`vmap_method="sequential"`) and usable per shard inside `jax.shard_map`.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.kernels import build, reference

_log = logging.getLogger(__name__)

# Python name -> exported handler symbol; the FFI target is "jaxsae_" + Python name.
_TARGETS = {
    "gather_sum": "JaxsaeGatherSum",
    "gather_dot": "JaxsaeGatherDot",
    "scatter_rows": "JaxsaeScatterRows",
    "scatter_cols": "JaxsaeScatterCols",
    "topk_rows": "JaxsaeTopkRows",
    "positive_histogram": "JaxsaePositiveHistogram",
    "row_counts": "JaxsaeRowCounts",
    "compact": "JaxsaeCompact",
    "encode": "JaxsaeEncode",
    "encode_topk": "JaxsaeEncodeTopk",
    "encode_histogram": "JaxsaeEncodeHistogram",
    "encode_batchtopk": "JaxsaeEncodeBatchTopk",
    "encode_above": "JaxsaeEncodeAbove",
    "adam": "JaxsaeAdam",
    "adam_rows": "JaxsaeAdamRows",
    "scatter_adam_rows": "JaxsaeScatterAdamRows",
    "scatter_adam_cols": "JaxsaeScatterAdamCols",
    "keep": "JaxsaeKeep",
    "sum_squares": "JaxsaeSumSquares",
    "reconstruction_errors": "JaxsaeReconstructionErrors",
    "scale_shift": "JaxsaeScaleShift",
}


@functools.cache
def _library() -> ctypes.CDLL:
    """Builds (or finds) the library and registers its FFI targets, once per process."""
    lib = ctypes.CDLL(str(build.build()))
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(f"jaxsae_{name}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


@functools.cache
def available() -> bool:
    """True when the library builds and loads; False (with the reason logged) means use the reference."""
    try:
        _library()
    except Exception as e:  # no compiler, a failed build, an incompatible jaxlib: fall back, never fail
        _log.warning("jaxsae CPU kernels unavailable: %s", e)
        return False
    return True


def set_tile(tile: int) -> None:
    """Floats of d per pass in gather_sum / gather_dot (tuning only; default: whole rows)."""
    _library().jaxsae_set_tile(ctypes.c_int64(tile))


def set_screen_group(latents: int) -> None:
    """Latents per column group of the bfloat16 screen (rounded down to a multiple of 48; 0: the
    default, groups of at most 10 MB of packed weights). For tests: several groups on small shapes."""
    _library().jaxsae_set_screen_group(ctypes.c_int64(latents))


# encode_topk / encode_batchtopk's `screen`: off; auto (the bfloat16 screen where the library has it and
# the inputs allow, see bf16_screen.h); required (for tests: an error when encode_topk selected without
# it, or encode_batchtopk ran no screened pass; its passes then say whether that pass selected).
SCREEN_MODES = {"off": 0, "auto": 1, "required": 2}


@functools.cache
def can_screen() -> bool:
    """Whether the library has the bfloat16 screen (built on a CPU with AVX512-BF16)."""
    return bool(_library().jaxsae_can_screen())


def _call(name: str, out: object, *args: jax.Array, **attrs: object) -> object:
    """Runs the custom call `name` with result shape(s) `out`."""
    _library()
    return jax.ffi.ffi_call(f"jaxsae_{name}", out, vmap_method="sequential")(*args, **attrs)


def keep(x: jax.Array) -> jax.Array:
    """x, materialised once: an identity custom call (result aliased to the operand) that XLA cannot fuse
    into. An elementwise [b, d] value read by several kernels, in two shapes ([b, d] and [1, b, d]),
    is otherwise recomputed in one fusion per consumer and shape, each its own buffer; XLA's CPU
    pipeline removes optimisation barriers, so they cannot stop it."""
    _library()
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return jax.ffi.ffi_call("jaxsae_keep", out, input_output_aliases={0: 0}, vmap_method="expand_dims")(x)


def sum_squares(a: jax.Array, mean: jax.Array) -> jax.Array:
    """f32[]: Σ (a[r] − mean)² over the rows of a [R, d] (mean [d]), rows summed in double; reads a once
    and writes nothing (see the kernel: XLA would write (a − mean)² out first)."""
    return _call("sum_squares", jax.ShapeDtypeStruct((), jnp.float32), _f32(a), _f32(mean))


def reconstruction_errors(
    centred: jax.Array, decoded: jax.Array, aux_hat: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(e, a, sums): e = centred − decoded [b, d] (over decoded's buffer), a = e − aux_hat (over aux_hat's;
    aux_hat [0, d]: none), sums [d + 2] = (Σ e², Σ a², Σ over rows of e), rows summed in double."""
    _library()
    out = (jax.ShapeDtypeStruct(decoded.shape, jnp.float32), jax.ShapeDtypeStruct(aux_hat.shape, jnp.float32),
           jax.ShapeDtypeStruct((decoded.shape[1] + 2,), jnp.float32))
    call = jax.ffi.ffi_call("jaxsae_reconstruction_errors", out, input_output_aliases={1: 0, 2: 1},
                            vmap_method="sequential")
    return call(_f32(centred), _f32(decoded), _f32(aux_hat))


def scale_shift(a: jax.Array, s: jax.Array, v: jax.Array) -> jax.Array:
    """s · a + v (a [R, d], s [], v [d]), written over a's buffer."""
    _library()
    out = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    call = jax.ffi.ffi_call("jaxsae_scale_shift", out, input_output_aliases={0: 0}, vmap_method="sequential")
    return call(_f32(a), _f32(s), _f32(v))


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _i32(x: jax.Array | int) -> jax.Array:
    return jnp.asarray(x, jnp.int32)


def gather_sum(row: jax.Array, idx: jax.Array, val: jax.Array, w: jax.Array, n_rows: int) -> jax.Array:
    """[n_rows, d] float32: out[r] = Σ over the slots (c, j) of row r of val[c, j] · w[idx[c, j]].
    row [C] int32 (sorted), idx [C, K] int32 (-1 empty), val [C, K], w [F, d]."""
    out = jax.ShapeDtypeStruct((n_rows, w.shape[1]), jnp.float32)
    return _call("gather_sum", out, _i32(row), _i32(idx), _f32(val), _f32(w))


def gather_dot(row: jax.Array, idx: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    """[C, K] float32: y[row[c]] · w[idx[c, j]], 0 in empty slots (y [b, d], w [F, d])."""
    out = jax.ShapeDtypeStruct(idx.shape, jnp.float32)
    return _call("gather_dot", out, _i32(row), _i32(idx), _f32(y), _f32(w))


def scatter_rows(row: jax.Array, idx: jax.Array, val: jax.Array, y: jax.Array, n_latents: int) -> jax.Array:
    """[n_latents, d] float32: out[f] = Σ over slots with idx = f of val[c, j] · y[row[c]] (y [b, d])."""
    out = jax.ShapeDtypeStruct((n_latents, y.shape[1]), jnp.float32)
    return _call("scatter_rows", out, _i32(row), _i32(idx), _f32(val), _f32(y))


def scatter_cols(row: jax.Array, idx: jax.Array, val: jax.Array, y: jax.Array, n_latents: int) -> jax.Array:
    """[d, n_latents] float32: scatter_rows(...) transposed, written in that layout directly."""
    out = jax.ShapeDtypeStruct((y.shape[1], n_latents), jnp.float32)
    return _call("scatter_cols", out, _i32(row), _i32(idx), _f32(val), _f32(y))


def topk_rows(acts: jax.Array, k: jax.Array | int, mask: jax.Array, size: int) -> jax.Array:
    """idx [..., size] int32: per row of acts [..., F], the k largest entries among latents with mask[f]
    and acts > 0 (ties: lower latent id first), ascending, then -1. k ≤ size may be traced."""
    lead, n_latents = acts.shape[:-1], acts.shape[-1]
    flat = _f32(acts).reshape(-1, n_latents)
    out = jax.ShapeDtypeStruct((flat.shape[0], size), jnp.int32)
    idx = _call("topk_rows", out, flat, _i32(k), jnp.asarray(mask, jnp.bool_))
    return idx.reshape(*lead, size)


def positive_histogram(acts: jax.Array, prefix: jax.Array | int, level: int) -> jax.Array:
    """[65536] int32 counts of the float32 bit patterns of the positive entries of acts: level 0 bins
    the high 16 bits; level 1 the low 16 bits of the entries whose high 16 bits equal `prefix`."""
    out = jax.ShapeDtypeStruct((65536,), jnp.int32)
    level = np.int32(0 if level == 0 else 1)  # as the reference: any other level is level 1
    return _call("positive_histogram", out, _f32(acts), _i32(prefix), level=level)


def row_counts(acts: jax.Array, thr: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(n_above [b], n_equal [b]) int32: per row, entries with acts[r, f] > thr[f] and == thr[f]."""
    counts = jax.ShapeDtypeStruct((acts.shape[0],), jnp.int32)
    return tuple(_call("row_counts", (counts, counts), _f32(acts), _f32(thr)))


def compact(
    acts: jax.Array, thr: jax.Array, quota: jax.Array, chunk_start: jax.Array, n_chunks: int, size: int
) -> tuple[jax.Array, jax.Array]:
    """Chunked ELL (row [n_chunks], idx [n_chunks, size]) int32 of the entries with acts[r, f] > thr[f],
    plus the first quota[r] entries of row r with acts[r, f] == thr[f], row r filling the chunks from
    chunk_start[r] on (acts [b, F], thr [F], quota and chunk_start [b] int32); as `reference.compact`."""
    out = (jax.ShapeDtypeStruct((n_chunks,), jnp.int32), jax.ShapeDtypeStruct((n_chunks, size), jnp.int32))
    row, idx = _call("compact", out, _f32(acts), _f32(thr), _i32(quota), _i32(chunk_start))
    return row, idx


def encode(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """[R, F] float32 pre-activations x·w + b (x [R, d], w [d, F], b [F]) by OpenBLAS in row blocks."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    return _call("encode", out, _f32(x), _f32(w), _f32(b))


def encode_histogram(x: jax.Array, w: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(encode(x, w, b) [R, F], positive_histogram of it at level 0 [65536]), the histogram taken while
    each row block is in cache."""
    pre = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    out = (pre, jax.ShapeDtypeStruct((65536,), jnp.int32))
    return tuple(_call("encode_histogram", out, _f32(x), _f32(w), _f32(b)))


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
    screen: str = "auto",
):
    """As `reference.encode_topk`, without ever holding more than one block of rows of x·w + b. With the
    screen (`SCREEN_MODES`) the values are float32 sums as well and the selections those on them."""
    rows = x.shape[0]
    out = (
        jax.ShapeDtypeStruct((rows, size), jnp.int32),
        jax.ShapeDtypeStruct((rows, size), jnp.float32),
        jax.ShapeDtypeStruct((rows, size_aux), jnp.int32),
        jax.ShapeDtypeStruct((rows, size_aux), jnp.float32),
    )
    mask, mask_aux = jnp.asarray(mask, jnp.bool_), jnp.asarray(mask_aux, jnp.bool_)
    args = (_f32(x), _f32(w), _f32(b), mask, _i32(k), mask_aux, _i32(k_aux))
    return tuple(_call("encode_topk", out, *args, screen=np.int32(SCREEN_MODES[screen])))


def encode_batchtopk(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    kb: jax.Array | int,
    mask_aux: jax.Array,
    k_aux: jax.Array | int,
    n_chunks: int,
    size: int,
    size_aux: int,
    screen: str = "auto",
):
    """One shard's BatchTopK of pre = x·w + b (x [R, d], w [d, F], b [F]) without holding pre: the kb
    largest positive entries (ties by row-major order) as chunked ELL (row [n_chunks], idx [n_chunks,
    size] int32, pre at the slots), the top k_aux of each row among latents with mask_aux (idx [R,
    size_aux], pre at idx), the smallest kept value (its bits as select_batchtopk's threshold) and the
    number of encoder passes it took (1 when its guess of the threshold held, up to 4 with a screened
    pass that did not). The first six equal ops.encode_batchtopk's composition on one shard. `screen`:
    as encode_topk's."""
    rows = x.shape[0]
    out = (
        jax.ShapeDtypeStruct((n_chunks,), jnp.int32),
        jax.ShapeDtypeStruct((n_chunks, size), jnp.int32),
        jax.ShapeDtypeStruct((n_chunks, size), jnp.float32),
        jax.ShapeDtypeStruct((rows, size_aux), jnp.int32),
        jax.ShapeDtypeStruct((rows, size_aux), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    mask_aux = jnp.asarray(mask_aux, jnp.bool_)
    args = (_f32(x), _f32(w), _f32(b), _i32(kb), mask_aux, _i32(k_aux))
    return tuple(_call("encode_batchtopk", out, *args, screen=np.int32(SCREEN_MODES[screen])))


def encode_above(x: jax.Array, w: jax.Array, b: jax.Array, thr: jax.Array, n_chunks: int, size: int):
    """The entries of pre = x·w + b above thr [F] (x [R, d], w [d, F]) without holding pre: chunked ELL
    (row [n_chunks], idx [n_chunks, size] int32, pre at the slots) and each row's count [R] int32, as
    ops.encode_above's composition where the entries fit (else the codes are incomplete)."""
    rows = x.shape[0]
    out = (
        jax.ShapeDtypeStruct((n_chunks,), jnp.int32),
        jax.ShapeDtypeStruct((n_chunks, size), jnp.int32),
        jax.ShapeDtypeStruct((n_chunks, size), jnp.float32),
        jax.ShapeDtypeStruct((rows,), jnp.int32),
    )
    return tuple(_call("encode_above", out, _f32(x), _f32(w), _f32(b), _f32(thr)))


def adam(
    param: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    grad: jax.Array,
    hyper: jax.Array,
    flags: jax.Array,
    rows: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """As `reference.adam`, in one pass over the four arrays, writing param, mu and nu in place (their
    buffers are aliased to the results). float32 [S, R, C] leaves only; others run the reference."""
    if param.ndim != 3 or any(a.dtype != jnp.float32 for a in (param, mu, nu, grad)):
        return reference.adam(param, mu, nu, grad, hyper, flags, rows)
    name = "adam_rows" if rows else "adam"
    return _in_place(name, param, mu, nu, grad, _f32(hyper), _i32(flags))


def _in_place(name: str, param: jax.Array, mu: jax.Array, nu: jax.Array, *args: jax.Array, **attrs: object):
    """Runs the custom call `name` whose results (param, mu, nu) are written over those inputs."""
    _library()
    out = (jax.ShapeDtypeStruct(param.shape, jnp.float32),) * 3
    call = jax.ffi.ffi_call(f"jaxsae_{name}", out, input_output_aliases={0: 0, 1: 1, 2: 2})
    return tuple(call(param, mu, nu, *args, **attrs))


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
    """As `reference.scatter_adam`, the gradient accumulated tile by tile and applied at once: never held
    whole; param, mu and nu written in place. float32 parameters only (else the reference)."""
    if any(a.dtype != jnp.float32 for a in (param, mu, nu)):
        return reference.scatter_adam(param, mu, nu, codes_a, codes_b, y_a, y_b, hyper, flags, transposed)
    codes = [f(a) for row, idx, val in (codes_a, codes_b) for f, a in ((_i32, row), (_i32, idx), (_f32, val))]
    name = "scatter_adam_cols" if transposed else "scatter_adam_rows"
    return _in_place(name, param, mu, nu, *codes, _f32(y_a), _f32(y_b), _f32(hyper), _i32(flags))
