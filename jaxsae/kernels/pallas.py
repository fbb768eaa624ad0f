"""Pallas kernels for the sparse SAE ops on GPU (Triton) and TPU (Mosaic); semantics: `reference.py`.

Same signatures as the reference plus `interpret` (run on the CPU through Pallas' interpreters, for tests)
and `platform` ("gpu"/"cuda"/"rocm" or "tpu"; default `jax.default_backend()`, and the GPU variant when
interpreting on the CPU). Outputs are float32; W and y may be float32 or bfloat16. No atomics anywhere.

gather_sum / gather_dot: a grid over blocks of chunks. GPU: one masked pointer load gathers the W rows of
[chunks, slots, columns] (Triton block shapes are powers of two, so K is padded to one and d is masked).
TPU: W stays in HBM; a step copies the rows its slots name into VMEM with one small DMA per row,
double-buffered across grid steps (block i + 1's copies fly while block i computes), then multiplies on
the MXU. Slot ids reach the scalar core as SMEM blocks, this step's and the next's (not one scalar-prefetch
array, which would have to fit SMEM whole). gather_sum's kernel sums per chunk; XLA adds the chunks of a
row (sorted segment sum over the small [C, d]).
scatter_rows: XLA sorts the C·K slots by latent (one argsort), so every output row has one owner. GPU: one
program per (latent, column block) sums its slots' val · y[row] exactly. TPU: the grouped-matmul layout
(megablox style): each block of latents owns whole tiles of sorted slots, a step DMAs a tile's y rows and
adds onehot(latent) · val @ rows into the output block, which stays in VMEM across the block's tiles.
vmap (e.g. over the `sae` axis) folds the batch into the chunk axis, shifting indices into stacked tables:
one kernel launch for all SAEs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
_HIGHEST = jax.lax.Precision.HIGHEST
# Block sizes: untuned starting points, no device has timed them. Tests shrink the TPU ones.
_GPU_TILE = 4096  # elements of one gathered [.., .., columns] tile held in registers
_GPU_COLS = 128  # columns per program / per step on GPU (512 B of float32 per gathered row)
_TPU_ROWS = 128  # minimum slots per TPU gather step (rank-1 SMEM blocks need a power of two ≥ 128)
_TPU_LATENTS = 128  # latents per output block of the TPU scatter
_TPU_SLOTS = 128  # slots per tile of the TPU scatter


def supported(platform: str) -> bool:
    """Whether a compiled (non-interpreted) variant exists for `platform` (e.g. "cpu", "cuda", "tpu")."""
    return platform.lower() in (*_GPU_PLATFORMS, "tpu")


def _variant(platform: str | None, interpret: bool) -> str:
    """'gpu' or 'tpu': the kernel family to run."""
    platform = (platform or jax.default_backend()).lower()
    if platform in _GPU_PLATFORMS:
        return "gpu"
    if platform == "tpu":
        return "tpu"
    if interpret:
        return "gpu"
    raise ValueError(f"no Pallas kernel for platform {platform!r}; use interpret=True or the reference")


def _interpret_arg(variant: str, interpret: bool) -> object:
    """pallas_call's `interpret`: the TPU interpreter (DMAs, semaphores, SMEM) for the TPU variant."""
    if not interpret:
        return False
    return pltpu.InterpretParams() if variant == "tpu" else True


def _pow2(n: int) -> int:
    """Smallest power of two ≥ max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _pad_chunks(
    row: jax.Array, idx: jax.Array, val: jax.Array, n_chunks: int, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pads the chunked ELL to [n_chunks, k] with empty slots (idx -1, val 0) on the last row."""
    c, k0 = idx.shape
    idx = jnp.pad(idx.astype(jnp.int32), ((0, n_chunks - c), (0, k - k0)), constant_values=-1)
    val = jnp.pad(val, ((0, n_chunks - c), (0, k - k0)))
    row = jnp.pad(row.astype(jnp.int32), (0, n_chunks - c), mode="edge")
    return row, idx, val


# ---------------------------------------------------------------- GPU (Triton) -------------------------


def _gpu_params() -> plgpu.CompilerParams:
    """Triton lowering (pallas_call otherwise picks Mosaic GPU in this JAX)."""
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _gpu_gather(ref: jax.Array, rows: jax.Array, cols: jax.Array, ok: jax.Array, d: int) -> jax.Array:
    """ref[rows[..., None], cols] as float32 [*rows.shape, len(cols)], 0 where ~ok or col ≥ d.
    One masked pointer load; indices are clamped because the interpreter gathers before masking."""
    shape = (*rows.shape, cols.shape[0])
    r = jnp.broadcast_to(jnp.maximum(rows, 0)[..., None], shape)
    c = jnp.broadcast_to(jnp.minimum(cols, d - 1), shape)
    mask = ok[..., None] & (cols < d)
    return plgpu.load(ref.at[r, c], mask=mask, other=0).astype(jnp.float32)


def _gpu_gather_sum_kernel(idx_ref, val_ref, w_ref, out_ref, *, bc: int, kt: int, bd: int, d: int) -> None:
    """Program (i, j): out[i·bc:(i+1)·bc, j·bd:(j+1)·bd] = Σ_slots val · W[idx, cols], kt slots a step."""
    i, j = pl.program_id(0), pl.program_id(1)
    chunks, cols = pl.ds(i * bc, bc), j * bd + jnp.arange(bd)

    def step(t: jax.Array, acc: jax.Array) -> jax.Array:
        ids = idx_ref[chunks, pl.ds(t * kt, kt)]
        v = jnp.where(ids >= 0, val_ref[chunks, pl.ds(t * kt, kt)].astype(jnp.float32), 0.0)
        return acc + jnp.sum(v[:, :, None] * _gpu_gather(w_ref, ids, cols, ids >= 0, d), axis=1)

    acc = jax.lax.fori_loop(0, idx_ref.shape[1] // kt, step, jnp.zeros((bc, bd), jnp.float32))
    out_ref[chunks, pl.ds(j * bd, bd)] = acc


def _gpu_chunk_sums(idx: jax.Array, val: jax.Array, w: jax.Array, interpret: object) -> jax.Array:
    """[C, d] float32 per-chunk sums Σ_j val[c, j] · w[idx[c, j]]."""
    c, k = idx.shape
    d = w.shape[1]
    kp, bd = _pow2(k), min(_GPU_COLS, _pow2(d))
    bc = max(1, 32 // kp)  # at least 32 gathered rows per program
    kt = min(kp, max(1, _GPU_TILE // (bc * bd)))
    cp, nd = pl.cdiv(c, bc) * bc, pl.cdiv(d, bd)
    _, idx, val = _pad_chunks(jnp.zeros(c, jnp.int32), idx, val, cp, kp)
    out = pl.pallas_call(
        functools.partial(_gpu_gather_sum_kernel, bc=bc, kt=kt, bd=bd, d=d),
        out_shape=jax.ShapeDtypeStruct((cp, nd * bd), jnp.float32),
        grid=(cp // bc, nd),
        compiler_params=_gpu_params(),
        interpret=interpret,
    )(idx, val, w)
    return out[:c, :d]


def _gpu_gather_dot_kernel(row_ref, idx_ref, y_ref, w_ref, out_ref, *, bc: int, bd: int, d: int) -> None:
    """Program i: out[i·bc:(i+1)·bc] = y[row] · W[idx], bd columns a step."""
    chunks = pl.ds(pl.program_id(0) * bc, bc)
    rows, ids = row_ref[chunks], idx_ref[chunks, :]

    def step(t: jax.Array, acc: jax.Array) -> jax.Array:
        cols = t * bd + jnp.arange(bd)
        yr = _gpu_gather(y_ref, rows, cols, rows >= 0, d)  # [bc, bd]
        return acc + jnp.sum(_gpu_gather(w_ref, ids, cols, ids >= 0, d) * yr[:, None, :], axis=2)

    out_ref[chunks, :] = jax.lax.fori_loop(0, pl.cdiv(d, bd), step, jnp.zeros(ids.shape, jnp.float32))


def _gpu_gather_dot(
    row: jax.Array, idx: jax.Array, y: jax.Array, w: jax.Array, interpret: object
) -> jax.Array:
    """[C, K] float32 y[row[c]] · w[idx[c, j]] (GPU variant)."""
    c, k = idx.shape
    d = w.shape[1]
    kp = _pow2(k)
    bc = max(1, 32 // kp)
    bd = min(_GPU_COLS, _pow2(d), max(16, _GPU_TILE // (bc * kp)))
    cp = pl.cdiv(c, bc) * bc
    row, idx, _ = _pad_chunks(row, idx, jnp.zeros(idx.shape, jnp.float32), cp, kp)
    out = pl.pallas_call(
        functools.partial(_gpu_gather_dot_kernel, bc=bc, bd=bd, d=d),
        out_shape=jax.ShapeDtypeStruct((cp, kp), jnp.float32),
        grid=(cp // bc,),
        compiler_params=_gpu_params(),
        interpret=interpret,
    )(row, idx, y, w)
    return out[:c, :k]


def _sort_by_latent(
    row: jax.Array, idx: jax.Array, val: jax.Array, empty: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Slots flattened, stably sorted by latent (empty slots last with key `empty`): key, row, val [C·K]."""
    key = jnp.where(idx >= 0, idx, empty).reshape(-1).astype(jnp.int32)
    order = jnp.argsort(key, stable=True)
    rows = jnp.broadcast_to(row.astype(jnp.int32)[:, None], idx.shape).reshape(-1)
    return key[order], rows[order], val.reshape(-1)[order]


def _gpu_scatter_kernel(ptr_ref, srow_ref, sval_ref, y_ref, out_ref, *, st: int, bd: int, d: int) -> None:
    """Program (f, j): out[f, j·bd:(j+1)·bd] = Σ over latent f's sorted slots of val · y[row], st a step."""
    f, j = pl.program_id(0), pl.program_id(1)
    start, end = ptr_ref[f], ptr_ref[f + 1]
    cols, n_slots = j * bd + jnp.arange(bd), srow_ref.shape[0]

    def step(t: jax.Array, acc: jax.Array) -> jax.Array:
        s = start + t * st + jnp.arange(st)
        ok = s < end
        s = jnp.minimum(s, n_slots - 1)
        r = plgpu.load(srow_ref.at[s], mask=ok, other=0)
        v = plgpu.load(sval_ref.at[s], mask=ok, other=0).astype(jnp.float32)
        return acc + jnp.sum(v[:, None] * _gpu_gather(y_ref, r, cols, ok, d), axis=0)

    n_steps = (end - start + st - 1) // st
    out_ref[f, pl.ds(j * bd, bd)] = jax.lax.fori_loop(0, n_steps, step, jnp.zeros(bd, jnp.float32))


def _gpu_scatter_rows(
    row: jax.Array, idx: jax.Array, val: jax.Array, y: jax.Array, n_latents: int, interpret: object
) -> jax.Array:
    """[n_latents, d] float32 (GPU variant): CSC by latent, one program per (latent, column block)."""
    key, srow, sval = _sort_by_latent(row, idx, val, n_latents)
    ptr = jnp.searchsorted(key, jnp.arange(n_latents + 1, dtype=jnp.int32)).astype(jnp.int32)
    d = y.shape[1]
    bd = min(2 * _GPU_COLS, _pow2(d))
    st, nd = max(1, _GPU_TILE // bd), pl.cdiv(d, bd)
    out = pl.pallas_call(
        functools.partial(_gpu_scatter_kernel, st=st, bd=bd, d=d),
        out_shape=jax.ShapeDtypeStruct((n_latents, nd * bd), jnp.float32),
        grid=(n_latents, nd),
        compiler_params=_gpu_params(),
        interpret=interpret,
    )(ptr, srow, sval, y)
    return out[:, :d]


# ---------------------------------------------------------------- TPU (Mosaic) -------------------------


def _tpu_copy(src_hbm, buf, sem, ids, slot: jax.Array, s: jax.Array):
    """DMA descriptor: src row ids[s] → buf[slot, s]."""
    return pltpu.make_async_copy(src_hbm.at[pl.ds(ids[s], 1)], buf.at[slot, pl.ds(s, 1)], sem.at[slot])


def _tpu_fetch(src_hbm, buf, sem, ids, slot: jax.Array) -> None:
    """Starts the row copies of one block; rows of empty slots (id < 0) are zeroed instead."""

    def body(s: jax.Array, carry: None) -> None:
        @pl.when(ids[s] >= 0)
        def _() -> None:
            _tpu_copy(src_hbm, buf, sem, ids, slot, s).start()

        @pl.when(ids[s] < 0)
        def _() -> None:
            buf[slot, pl.ds(s, 1), :] = jnp.zeros((1, buf.shape[2]), buf.dtype)

    jax.lax.fori_loop(0, ids.shape[0], body, None)


def _tpu_wait(src_hbm, buf, sem, ids, slot: jax.Array) -> None:
    """Waits for the copies `_tpu_fetch` started (all rows have one size, so any descriptor fits)."""

    def body(s: jax.Array, carry: None) -> None:
        @pl.when(ids[s] >= 0)
        def _() -> None:
            _tpu_copy(src_hbm, buf, sem, ids, slot, s).wait()

    jax.lax.fori_loop(0, ids.shape[0], body, None)


def _tpu_rows(ids_cur, ids_next, src_hbm, buf, sem) -> jax.Array:
    """Double-buffered gather: returns the slot of buf holding this step's rows, prefetching the next
    step's. Needs a sequential ("arbitrary") grid axis 0."""
    i, n = pl.program_id(0), pl.num_programs(0)
    slot = i % 2

    @pl.when(i == 0)
    def _() -> None:
        _tpu_fetch(src_hbm, buf, sem, ids_cur, slot)

    @pl.when(i + 1 < n)
    def _() -> None:
        _tpu_fetch(src_hbm, buf, sem, ids_next, 1 - slot)

    _tpu_wait(src_hbm, buf, sem, ids_cur, slot)
    return slot


def _tpu_gather_sum_kernel(ids_cur, ids_next, val_ref, w_hbm, out_ref, buf, sem, *, kp: int) -> None:
    """Step i: out[c] = val[c] @ rows[c·kp:(c+1)·kp] for the block's chunks c (MXU, float32)."""
    slot = _tpu_rows(ids_cur, ids_next, w_hbm, buf, sem)

    def chunk(c: jax.Array, carry: None) -> None:
        v = val_ref[pl.ds(c, 1), :]
        rows = buf[slot, pl.ds(pl.multiple_of(c * kp, kp), kp), :].astype(jnp.float32)
        out_ref[pl.ds(c, 1), :] = jnp.dot(v, rows, precision=_HIGHEST, preferred_element_type=jnp.float32)

    jax.lax.fori_loop(0, val_ref.shape[0], chunk, None)


def _tpu_gather_dot_kernel(ids_cur, ids_next, yr_ref, w_hbm, out_ref, buf, sem, *, kp: int) -> None:
    """Step i: out[c] = rows[c·kp:(c+1)·kp] · y[row[c]] for the block's chunks c (MXU, float32)."""
    slot = _tpu_rows(ids_cur, ids_next, w_hbm, buf, sem)

    def chunk(c: jax.Array, carry: None) -> None:
        yr = yr_ref[pl.ds(c, 1), :]
        rows = buf[slot, pl.ds(pl.multiple_of(c * kp, kp), kp), :].astype(jnp.float32)
        dims = (((1,), (1,)), ((), ()))
        out_ref[pl.ds(c, 1), :] = jax.lax.dot_general(
            yr, rows, dims, precision=_HIGHEST, preferred_element_type=jnp.float32
        )

    jax.lax.fori_loop(0, yr_ref.shape[0], chunk, None)


def _tpu_params(vmem_bytes: int) -> pltpu.CompilerParams:
    """Sequential grid (cross-step prefetch, output revisits) and room for the row buffers."""
    limit = min(max(32 << 20, 2 * vmem_bytes), 100 << 20)
    return pltpu.CompilerParams(dimension_semantics=("arbitrary",), vmem_limit_bytes=limit)


def _tpu_gather_call(
    kernel, idx: jax.Array, blocked: jax.Array, w: jax.Array, out_cols: int, interpret: object
) -> jax.Array:
    """Runs a TPU gather kernel over blocks of bc chunks: idx [Cp, kp] (kp a power of two ≥ 8) as SMEM
    blocks (this and the next), `blocked` [Cp, *] as VMEM blocks, w in HBM; out [Cp, out_cols] float32."""
    cp, kp = idx.shape
    bc = max(8, _TPU_ROWS // kp)
    nb = cp // bc
    flat = idx.reshape(-1)

    def smem(index_map):
        return pl.BlockSpec((bc * kp,), index_map, memory_space=pltpu.SMEM)

    buf_bytes = 2 * bc * kp * w.shape[1] * w.dtype.itemsize
    return pl.pallas_call(
        functools.partial(kernel, kp=kp),
        out_shape=jax.ShapeDtypeStruct((cp, out_cols), jnp.float32),
        grid=(nb,),
        in_specs=[
            smem(lambda i: (i,)),
            smem(lambda i: (jnp.minimum(i + 1, nb - 1),)),
            pl.BlockSpec((bc, blocked.shape[1]), lambda i: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((bc, out_cols), lambda i: (i, 0)),
        scratch_shapes=[pltpu.VMEM((2, bc * kp, w.shape[1]), w.dtype), pltpu.SemaphoreType.DMA((2,))],
        compiler_params=_tpu_params(buf_bytes),
        interpret=interpret,
    )(flat, flat, blocked, w)


def _tpu_pad(
    row: jax.Array, idx: jax.Array, val: jax.Array, itemsize: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pads K to a power of two that is a whole number of sublane tiles of the row buffer (8 rows of
    float32, 16 of bfloat16), C to whole blocks of the TPU gather; val becomes float32."""
    kp = max(32 // itemsize, _pow2(idx.shape[1]))
    bc = max(8, _TPU_ROWS // kp)
    return _pad_chunks(row, idx, val.astype(jnp.float32), pl.cdiv(idx.shape[0], bc) * bc, kp)


def _tpu_chunk_sums(idx: jax.Array, val: jax.Array, w: jax.Array, interpret: object) -> jax.Array:
    """[C, d] float32 per-chunk sums (TPU variant)."""
    c, k = idx.shape
    _, idx_p, val_p = _tpu_pad(jnp.zeros(c, jnp.int32), idx, val, w.dtype.itemsize)
    out = _tpu_gather_call(_tpu_gather_sum_kernel, idx_p, val_p, w, w.shape[1], interpret)
    return out[:c]


def _tpu_gather_dot(
    row: jax.Array, idx: jax.Array, y: jax.Array, w: jax.Array, interpret: object
) -> jax.Array:
    """[C, K] float32 (TPU variant); y[row] ([C, d], small next to the C·K rows of W) is gathered by XLA."""
    c, k = idx.shape
    row_p, idx_p, _ = _tpu_pad(row, idx, jnp.zeros(idx.shape, jnp.float32), w.dtype.itemsize)
    yr = y[row_p].astype(jnp.float32)
    out = _tpu_gather_call(_tpu_gather_dot_kernel, idx_p, yr, w, idx_p.shape[1], interpret)
    return out[:c, :k]


def _tpu_scatter_kernel(blk_ref, rows_cur, rows_next, sidx_ref, sval_ref, y_hbm, out_ref, buf, sem) -> None:
    """Tile t (of _TPU_SLOTS sorted slots, all in latent block blk[t]): out block += onehot @ y rows,
    onehot[f, s] = val[s] where slot s has latent blk·bf + f. Tiles of one block are consecutive, so the
    output block stays in VMEM across them and is zeroed on its first tile."""
    t = pl.program_id(0)
    slot = _tpu_rows(rows_cur, rows_next, y_hbm, buf, sem)

    @pl.when((t == 0) | (blk_ref[t] != blk_ref[jnp.maximum(t - 1, 0)]))
    def _() -> None:
        out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

    bf, ts = out_ref.shape[0], sidx_ref.shape[-1]
    latent = jax.lax.broadcasted_iota(jnp.int32, (bf, ts), 0) + blk_ref[t] * bf
    onehot = jnp.where(sidx_ref[...] == latent, sval_ref[...], 0.0)  # [bf, ts]
    ys = buf[slot].astype(jnp.float32)
    out_ref[...] += jnp.dot(onehot, ys, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _tile_layout(key: jax.Array, n_blocks: int, n_tiles: int) -> tuple[jax.Array, jax.Array]:
    """For latent-sorted keys: each slot's position in a layout where every latent block owns whole tiles
    (at least one), and each tile's block [n_tiles]. Empty slots (key ≥ n_blocks·bf) go past the end."""
    ts, bf = _TPU_SLOTS, _TPU_LATENTS
    bounds = jnp.arange(n_blocks + 1, dtype=jnp.int32) * bf
    first = jnp.searchsorted(key, bounds).astype(jnp.int32)  # [n_blocks + 1] first slot of each block
    tiles = jnp.maximum(1, (first[1:] - first[:-1] + ts - 1) // ts)
    tile_end = jnp.cumsum(tiles)
    blk = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right"), n_blocks - 1)
    b = jnp.minimum(key // bf, n_blocks - 1)
    pos = (tile_end[b] - tiles[b]) * ts + jnp.arange(key.shape[0]) - first[b]
    return jnp.where(key < n_blocks * bf, pos, n_tiles * ts), blk.astype(jnp.int32)


def _tpu_scatter_rows(
    row: jax.Array, idx: jax.Array, val: jax.Array, y: jax.Array, n_latents: int, interpret: object
) -> jax.Array:
    """[n_latents, d] float32 (TPU variant): grouped-matmul layout, one tile of sorted slots a step."""
    ts, bf = _TPU_SLOTS, _TPU_LATENTS
    n_blocks = pl.cdiv(n_latents, bf)
    key, srow, sval = _sort_by_latent(row, idx, val, n_blocks * bf)
    n_tiles = pl.cdiv(key.shape[0], ts) + n_blocks  # static bound: each block rounds up by < one tile
    pos, blk = _tile_layout(key, n_blocks, n_tiles)

    def place(x: jax.Array, fill: float) -> jax.Array:
        return jnp.full(n_tiles * ts, fill, x.dtype).at[pos].set(x, mode="drop")

    prow = place(srow, -1)
    pidx = place(key, -1).reshape(n_tiles, 1, ts)
    pval = place(sval.astype(jnp.float32), 0).reshape(n_tiles, 1, ts)
    d = y.shape[1]

    def smem(index_map):
        return pl.BlockSpec((ts,), index_map, memory_space=pltpu.SMEM)

    def lane(index_map):
        return pl.BlockSpec((None, 1, ts), index_map)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(n_tiles,),
        in_specs=[
            smem(lambda t, b: (t,)),
            smem(lambda t, b: (jnp.minimum(t + 1, n_tiles - 1),)),
            lane(lambda t, b: (t, 0, 0)),
            lane(lambda t, b: (t, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((bf, d), lambda t, b: (b[t], 0)),
        scratch_shapes=[pltpu.VMEM((2, ts, d), y.dtype), pltpu.SemaphoreType.DMA((2,))],
    )
    out = pl.pallas_call(
        _tpu_scatter_kernel,
        out_shape=jax.ShapeDtypeStruct((n_blocks * bf, d), jnp.float32),
        grid_spec=grid_spec,
        compiler_params=_tpu_params(2 * ts * d * y.dtype.itemsize + 2 * bf * d * 4),
        interpret=interpret,
    )(blk, prow, prow, pidx, pval, y)
    return out[:n_latents]


# ---------------------------------------------------------------- vmap: fold the batch into chunks -------


def _stack(x: jax.Array, batched: bool, n: int) -> jax.Array:
    """x with a leading batch axis of n, then that axis merged into the next: [n·x.shape[0], ...]."""
    x = x if batched else jnp.broadcast_to(x, (n, *x.shape))
    return x.reshape(n * x.shape[1], *x.shape[2:])


def _shift(ids: jax.Array, batched: bool, n: int, size: int) -> jax.Array:
    """ids [n, ...] of batch element i offset by i·size (empty -1 kept), to index n stacked tables."""
    ids = ids if batched else jnp.broadcast_to(ids, (n, *ids.shape))
    off = (jnp.arange(n, dtype=jnp.int32) * size).reshape(n, *(1,) * (ids.ndim - 1))
    return jnp.where(ids >= 0, ids + off, ids)


def _table(x: jax.Array, batched: bool) -> jax.Array:
    """A batched table [n, F, d] as one [n·F, d]; an unbatched one as is."""
    return x.reshape(-1, x.shape[-1]) if batched else x


def _custom_vmap(impl, rule, **static):
    """impl(*arrays, **static) whose vmap is rule(axis_size, in_batched, *arrays, **static): the batch is
    folded into the chunk axis (indices shifted into stacked tables), so vmap (e.g. over the `sae` axis)
    runs one kernel on one grid instead of adding a grid axis the kernels do not expect."""
    f = jax.custom_batching.custom_vmap(functools.partial(impl, **static))
    f.def_vmap(functools.partial(rule, **static))
    return f


def _gather_sum(row, idx, val, w, *, n_rows: int, variant: str, interpret: bool) -> jax.Array:
    run = _gpu_chunk_sums if variant == "gpu" else _tpu_chunk_sums
    per_chunk = run(idx, val, w, _interpret_arg(variant, interpret))
    return jax.ops.segment_sum(per_chunk, row, n_rows, indices_are_sorted=True)


def _gather_sum_vmap(n, batched, row, idx, val, w, *, n_rows: int, **static):
    rb, ib, vb, wb = batched
    flat = (
        _stack(_shift(row, rb, n, n_rows), True, n),
        _stack(_shift(idx, ib, n, w.shape[-2]), True, n) if wb else _stack(idx, ib, n),
        _stack(val, vb, n),
        _table(w, wb),
    )
    out = _custom_vmap(_gather_sum, _gather_sum_vmap, n_rows=n * n_rows, **static)(*flat)
    return out.reshape(n, n_rows, -1), True


def _gather_dot(row, idx, y, w, *, variant: str, interpret: bool) -> jax.Array:
    run = _gpu_gather_dot if variant == "gpu" else _tpu_gather_dot
    return run(row, idx, y, w, _interpret_arg(variant, interpret))


def _gather_dot_vmap(n, batched, row, idx, y, w, **static):
    rb, ib, yb, wb = batched
    c, k = idx.shape[-2:]
    flat = (
        _stack(_shift(row, rb, n, y.shape[-2]), True, n) if yb else _stack(row, rb, n),
        _stack(_shift(idx, ib, n, w.shape[-2]), True, n) if wb else _stack(idx, ib, n),
        _table(y, yb),
        _table(w, wb),
    )
    out = _custom_vmap(_gather_dot, _gather_dot_vmap, **static)(*flat)
    return out.reshape(n, c, k), True


def _scatter_rows(row, idx, val, y, *, n_latents: int, variant: str, interpret: bool) -> jax.Array:
    run = _gpu_scatter_rows if variant == "gpu" else _tpu_scatter_rows
    return run(row, idx, val, y, n_latents, _interpret_arg(variant, interpret))


def _scatter_rows_vmap(n, batched, row, idx, val, y, *, n_latents: int, **static):
    rb, ib, vb, yb = batched
    flat = (
        _stack(_shift(row, rb, n, y.shape[-2]), True, n) if yb else _stack(row, rb, n),
        _stack(_shift(idx, ib, n, n_latents), True, n),
        _stack(val, vb, n),
        _table(y, yb),
    )
    out = _custom_vmap(_scatter_rows, _scatter_rows_vmap, n_latents=n * n_latents, **static)(*flat)
    return out.reshape(n, n_latents, -1), True


# ---------------------------------------------------------------- public API ---------------------------


def gather_sum(
    row: jax.Array,
    idx: jax.Array,
    val: jax.Array,
    w: jax.Array,
    n_rows: int,
    *,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """[n_rows, d] float32: out[r] = Σ over the slots (c, j) of row r of val[c, j] · w[idx[c, j]].
    row [C] int32, idx [C, K] int32 (-1 empty), val [C, K], w [F, d]. The kernel sums each chunk; rows
    are sorted, so XLA finishes with a sorted segment sum over the small [C, d]."""
    static = dict(variant=_variant(platform, interpret), interpret=interpret)
    return _custom_vmap(_gather_sum, _gather_sum_vmap, n_rows=n_rows, **static)(row, idx, val, w)


def gather_dot(
    row: jax.Array,
    idx: jax.Array,
    y: jax.Array,
    w: jax.Array,
    *,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """[C, K] float32: y[row[c]] · w[idx[c, j]], 0 in empty slots (y [b, d], w [F, d])."""
    static = dict(variant=_variant(platform, interpret), interpret=interpret)
    return _custom_vmap(_gather_dot, _gather_dot_vmap, **static)(row, idx, y, w)


def scatter_rows(
    row: jax.Array,
    idx: jax.Array,
    val: jax.Array,
    y: jax.Array,
    n_latents: int,
    *,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """[n_latents, d] float32: out[f] = Σ over slots with idx = f of val[c, j] · y[row[c]] (y [b, d]).
    Slots are sorted by latent in XLA (argsort of C·K keys), so each output row has one owner: no atomics,
    deterministic summation order."""
    static = dict(variant=_variant(platform, interpret), interpret=interpret)
    return _custom_vmap(_scatter_rows, _scatter_rows_vmap, n_latents=n_latents, **static)(row, idx, val, y)


def scatter_cols(row: jax.Array, idx: jax.Array, val: jax.Array, y: jax.Array, n_latents: int, **kw):
    """[d, n_latents] float32: scatter_rows transposed (XLA transposes; the encoder's gradient layout)."""
    return scatter_rows(row, idx, val, y, n_latents, **kw).T
