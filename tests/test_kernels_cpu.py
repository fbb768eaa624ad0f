"""The C++ CPU kernels (jaxsae.kernels.cpu) against the pure-JAX reference: integers exactly, floats to
rounding; under jit, vmap (sequential) and shard_map on a 2-device mesh."""

from __future__ import annotations

import contextlib
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxsae.kernels import cpu, ops
from jaxsae.kernels import reference as ref

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no CPU kernels (no g++ or a failed build)")

# The reference, jitted whole (op-by-op dispatch compiles every small op separately: slow).
R = {
    "gather_sum": jax.jit(ref.gather_sum, static_argnums=4),
    "gather_dot": jax.jit(ref.gather_dot),
    "scatter_rows": jax.jit(ref.scatter_rows, static_argnums=4),
    "topk_rows": jax.jit(ref.topk_rows, static_argnums=3),
    "positive_histogram": jax.jit(ref.positive_histogram, static_argnums=2),
    "row_counts": jax.jit(ref.row_counts),
    "compact": jax.jit(ref.compact, static_argnums=(4, 5)),
    "encode_topk": jax.jit(ref.encode_topk, static_argnums=(5, 8)),
}
SHAPES = [(5, 17, 3, 4), (64, 512, 48, 16)]  # b, F, d, K


def codes(rng: np.random.Generator, b: int, n_latents: int, size: int, max_per_row: int, spare: int = 3):
    """Chunked ELL with rows of 0..max_per_row latents (several chunks when > size), some holes (-1) inside
    chunks, and `spare` unused trailing chunks (row b - 1, idx -1). Returns row, idx, val."""
    rows, chunks = [], []
    for r in range(b):
        n = int(rng.integers(0, max_per_row + 1)) if r % 4 else 0  # every 4th row has no entries
        ids = np.sort(rng.choice(n_latents, n, replace=False)).astype(np.int32)
        for start in range(0, n, size):
            chunk = np.full(size, -1, np.int32)
            part = ids[start : start + size]
            chunk[: len(part)] = part
            rows.append(r)
            chunks.append(chunk)
    for _ in range(spare):
        rows.append(b - 1)
        chunks.append(np.full(size, -1, np.int32))
    idx = np.stack(chunks)
    idx[rng.random(idx.shape) < 0.1] = -1  # empty slots between entries
    val = (rng.standard_normal(idx.shape) * (idx >= 0)).astype(np.float32)
    return np.asarray(rows, np.int32), idx, val


def close(a: jax.Array, b: jax.Array, rtol: float = 1e-5) -> None:
    """Equal within rtol, relative to each entry or (for cancellation near 0) to the largest entry."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b).max(initial=0))))


def tied_acts(rng: np.random.Generator, b: int, n_latents: int) -> np.ndarray:
    """Pre-activations on a coarse grid (many exact ties), one all-negative row and one all-zero row."""
    acts = np.round(rng.standard_normal((b, n_latents)) * 4) / 4
    acts[1 % b] = -np.abs(acts[1 % b]) - 0.5
    acts[2 % b] = 0.0
    return acts.astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_products(shape):
    b, n_latents, d, size = shape
    rng = np.random.default_rng(0)
    row, idx, val = codes(rng, b, n_latents, size, max_per_row=3 * size)
    w = rng.standard_normal((n_latents, d)).astype(np.float32)
    y = rng.standard_normal((b, d)).astype(np.float32)
    close(cpu.gather_sum(row, idx, val, w, b), R["gather_sum"](row, idx, val, w, b))
    close(cpu.gather_dot(row, idx, y, w), R["gather_dot"](row, idx, y, w))
    close(cpu.scatter_rows(row, idx, val, y, n_latents), R["scatter_rows"](row, idx, val, y, n_latents))
    close(cpu.scatter_cols(row, idx, val, y, n_latents), R["scatter_rows"](row, idx, val, y, n_latents).T)
    assert np.all(np.asarray(cpu.gather_dot(row, idx, y, w))[idx < 0] == 0)



def test_sparse_products_with_dense_latents():
    """Latents in at least a quarter of the rows (aux-k's dead latents are in all) take a GEMM in the
    scatters and gathers, more than one block of them (256) and of rows (512) here, beside light ones in
    the same rows and chunks; against numpy, slot by slot."""
    rng = np.random.default_rng(3)
    b, n_latents, d, size = 1100, 700, 8, 48
    dense = rng.choice(n_latents, 300, replace=False)
    light = np.setdiff1d(np.arange(n_latents), dense)
    rows, chunks = [], []
    for r in range(b):
        ids = np.sort(np.concatenate([dense[rng.random(300) < 0.5], rng.choice(light, 3, replace=False)]))
        for start in range(0, len(ids), size):
            chunk = np.full(size, -1, np.int32)
            chunk[: len(ids[start : start + size])] = ids[start : start + size]
            rows.append(r)
            chunks.append(chunk)
    row, idx = np.asarray(rows, np.int32), np.stack(chunks)
    val = (rng.standard_normal(idx.shape) * (idx >= 0)).astype(np.float32)
    y = rng.standard_normal((b, d)).astype(np.float32)
    want = np.zeros((n_latents, d), np.float32)  # numpy, slot by slot
    slot_rows = np.broadcast_to(row[:, None], idx.shape)[idx >= 0]
    np.add.at(want, idx[idx >= 0], val[idx >= 0][:, None] * y[slot_rows])
    close(cpu.scatter_rows(row, idx, val, y, n_latents), jnp.asarray(want), rtol=1e-4)
    close(cpu.scatter_cols(row, idx, val, y, n_latents), jnp.asarray(want.T), rtol=1e-4)
    w = rng.standard_normal((n_latents, d)).astype(np.float32)
    decoded = np.zeros((b, d), np.float32)
    np.add.at(decoded, slot_rows, val[idx >= 0][:, None] * w[idx[idx >= 0]])
    close(cpu.gather_sum(row, idx, val, w, b), jnp.asarray(decoded), rtol=1e-4)
    dots = np.where(idx >= 0, np.einsum("cd,cjd->cj", y[row], w[np.maximum(idx, 0)]), 0).astype(np.float32)
    close(cpu.gather_dot(row, idx, y, w), jnp.asarray(dots), rtol=1e-4)

def test_sparse_products_bfloat16_inputs():
    """bfloat16 values are cast to float32 by the wrapper, as the reference does before accumulating."""
    rng = np.random.default_rng(1)
    row, idx, val = codes(rng, 8, 40, 4, max_per_row=9)
    w = jnp.asarray(rng.standard_normal((40, 16)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((8, 16)), jnp.bfloat16)
    val = jnp.asarray(val, jnp.bfloat16)
    close(cpu.gather_sum(row, idx, val, w, 8), R["gather_sum"](row, idx, val, w, 8))
    close(cpu.gather_dot(row, idx, y, w), R["gather_dot"](row, idx, y, w))
    close(cpu.scatter_rows(row, idx, val, y, 40), R["scatter_rows"](row, idx, val, y, 40))


@pytest.mark.parametrize("shape", SHAPES)
def test_topk_rows(shape):
    b, n_latents, _, size = shape
    rng = np.random.default_rng(2)
    acts = tied_acts(rng, b, n_latents)
    mask = rng.random(n_latents) < 0.8
    topk = jax.jit(cpu.topk_rows, static_argnums=3)
    for k in (0, 1, size // 2, size):  # k traced, below and at the static size
        np.testing.assert_array_equal(topk(acts, k, mask, size), R["topk_rows"](acts, k, mask, size))
    np.testing.assert_array_equal(
        cpu.topk_rows(acts, size, np.ones(n_latents, bool), n_latents),  # everything positive, sorted
        R["topk_rows"](acts, size, np.ones(n_latents, bool), n_latents),
    )


def test_topk_rows_large_rows():
    """Wide rows take the block-maximum bound (blocks of 16); narrow ones fall back to smaller blocks."""
    rng = np.random.default_rng(3)
    for n_latents, k in ((4096, 50), (300, 50), (40, 12)):
        acts = np.round(rng.standard_normal((6, n_latents)) * 64).astype(np.float32) / 64
        acts[0, ::7] = 3.0  # a tie larger than k
        mask = rng.random(n_latents) < 0.9
        np.testing.assert_array_equal(cpu.topk_rows(acts, k, mask, k), R["topk_rows"](acts, k, mask, k))


def test_topk_rows_with_few_allowed_latents():
    """aux-k's mask allows a few dead latents: the kernel visits only those (a different code path)."""
    rng = np.random.default_rng(5)
    acts = np.round(rng.standard_normal((9, 2048)) * 16).astype(np.float32) / 16  # ties
    for n_allowed, k in ((40, 12), (100, 64), (1, 3), (0, 4)):
        mask = np.zeros(2048, bool)
        mask[rng.choice(2048, n_allowed, replace=False)] = True
        np.testing.assert_array_equal(cpu.topk_rows(acts, k, mask, 64), R["topk_rows"](acts, k, mask, 64))


def test_encode_equals_numpy_over_several_row_blocks():
    """x·w + b by OpenBLAS in row blocks (256 rows each at F 512): 600 rows span three, the last partial."""
    rng = np.random.default_rng(8)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((600, 24), (24, 512), (512,)))
    close(cpu.encode(x, w, b), (x.astype(np.float64) @ w + b).astype(np.float32), rtol=1e-5)


def exact_encoder(rng: np.random.Generator, rows: int, d: int, n_latents: int):
    """x, w, b on a grid of quarters: every product and sum is exact in float32, whatever the summation
    order, so any two matmuls agree bit for bit and ties among pre-activations are exact ties."""
    x, w = (rng.integers(-2, 3, s).astype(np.float32) / 4 for s in ((rows, d), (d, n_latents)))
    return x, w, rng.integers(-2, 3, n_latents).astype(np.float32) / 4


def wide_encoder(rng: np.random.Generator, rows: int, d: int, n_latents: int, top: int = 999):
    """As exact_encoder (sums exact in float32 while d·top² < 2²⁴), but with integers up to `top`, which
    bfloat16 (8 significant bits) mostly cannot hold: the screen's approximations are off by far more than
    the gaps between pre-activations (many exact ties), so its selections hold only if the exact
    refinement covers every entry its bound does not rule out."""
    x, w = (rng.integers(-top, top + 1, s).astype(np.float32) for s in ((rows, d), (d, n_latents)))
    return x, w, rng.integers(-3, 4, n_latents).astype(np.float32)


needs_screen = pytest.mark.skipif(not cpu.available() or not cpu.can_screen(), reason="no AVX512-BF16 screen")


@contextlib.contextmanager
def screen_groups(latents: int):
    """The screen's column groups: 0 (the default) makes one at these shapes; 48 latents several, where a
    row's floor tightens from group to group (the first groups' extra candidates dropped)."""
    cpu.set_screen_group(latents)
    try:
        yield
    finally:
        cpu.set_screen_group(0)


@pytest.fixture(params=[0, 48], ids=["one column group", "groups of 48 latents"])
def screen_group(request):
    with screen_groups(request.param):
        yield


@pytest.fixture
def screen_group_48():
    with screen_groups(48):
        yield


@needs_screen
@pytest.mark.parametrize("rows,n_latents,k,size", [(600, 512, 16, 20), (300, 1000, 50, 50), (7, 10, 9, 9)])
def test_screened_encode_topk_equals_reference(rows, n_latents, k, size, screen_group):
    """encode_topk with the bfloat16 screen required (an error if it fell back) selects as on float32
    values: ids and values bit for bit, on inputs that bfloat16 rounds (see wide_encoder); aux-k's mask
    with few latents and with many; in one column group and in several."""
    rng = np.random.default_rng(11)
    x, w, b = wide_encoder(rng, rows, 8, n_latents)
    mask = rng.random(n_latents) < 0.9
    fused = jax.jit(partial(cpu.encode_topk, screen="required"), static_argnums=(5, 8))
    for aux_share, k_aux in ((0.02, 3), (0.5, 5)):
        aux = rng.random(n_latents) < aux_share
        args = (x, w, b, k, mask, size, k_aux, aux, 6)
        for got, want in zip(fused(*args), R["encode_topk"](*args), strict=True):
            np.testing.assert_array_equal(got, want)


@needs_screen
def test_screen_bound_is_tight_where_rounding_errors_align():
    """The worst case of the screen's bound: x = 257 everywhere (bfloat16: 256), latent A's weights 257
    (A's approximation 4104 below its value, the whole bound but 1%) and latent C's −257 with a bias
    (C's 4104 above), C's value 1 below A's. Per row the top 1 and aux-k's top 1 must be A, which takes
    every bit of the bound: with 2% less it is not a candidate (checked once by hand)."""
    rows, d, n_latents, a, c = 5, 8, 40, 7, 23
    x = np.full((rows, d), 257.0, np.float32)
    w = np.zeros((d, n_latents), np.float32)
    b = np.full(n_latents, -1.0, np.float32)
    w[:, a], w[:, c], b[a], b[c] = 257.0, -257.0, 0.0, 2 * 8 * 257.0**2 - 1
    want = np.full(rows, a, np.int32)
    aux = np.isin(np.arange(n_latents), [a, c, 30])
    all_latents = np.ones(n_latents, bool)
    idx, val, aux_idx, _ = cpu.encode_topk(x, w, b, 1, all_latents, 1, 1, aux, 1, screen="required")
    np.testing.assert_array_equal(np.asarray(idx)[:, 0], want)
    np.testing.assert_array_equal(np.asarray(aux_idx)[:, 0], want)
    np.testing.assert_array_equal(np.asarray(val)[:, 0], np.float32(8 * 257.0**2))


@needs_screen
def test_screen_is_skipped_where_its_bound_is_not_finite():
    """A NaN weight makes the screen's bound NaN: screen=auto runs unscreened (the same results as
    screen=off), screen=required reports it."""
    rng = np.random.default_rng(12)
    x, w, b = wide_encoder(rng, 40, 8, 64)
    w[3, 5] = np.nan
    args = (x, w, b, 4, np.ones(64, bool), 4, 2, np.arange(64) % 9 == 0, 2)
    auto, off = cpu.encode_topk(*args, screen="auto"), cpu.encode_topk(*args, screen="off")
    for got, want in zip(auto, off, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(Exception, match="ran unscreened"):
        jax.block_until_ready(cpu.encode_topk(*args, screen="required"))


def test_encode_histogram_equals_reference():
    """The encoder with the level-0 histogram fused in: both outputs exact (exact inputs), 3 row blocks."""
    rng = np.random.default_rng(10)
    x, w, b = exact_encoder(rng, 600, 6, 512)
    pre, hist = cpu.encode_histogram(x, w, b)
    np.testing.assert_array_equal(pre, x @ w + b)
    np.testing.assert_array_equal(hist, R["positive_histogram"](x @ w + b, 0, 0))
    assert int(np.asarray(hist).sum()) == int(((x @ w + b) > 0).sum())  # not vacuous


@pytest.mark.parametrize("rows,n_latents,k,size", [(600, 512, 16, 20), (9, 40, 12, 12), (7, 10, 9, 9)])
def test_encode_topk_equals_reference(rows, n_latents, k, size):
    """The fused encoder + selections: ids and values exactly (exact inputs, many ties); aux-k's mask with
    few latents (the visiting path) and with many; k traced; 600 rows span three row blocks."""
    rng = np.random.default_rng(9)
    x, w, b = exact_encoder(rng, rows, 6, n_latents)
    mask = rng.random(n_latents) < 0.9
    fused = jax.jit(cpu.encode_topk, static_argnums=(5, 8))
    for aux_share, k_aux in ((0.02, 3), (0.5, 5)):
        aux = rng.random(n_latents) < aux_share
        args = (x, w, b, k, mask, size, k_aux, aux, 6)
        for got, want in zip(fused(*args), R["encode_topk"](*args), strict=True):
            np.testing.assert_array_equal(got, want)


def test_positive_histogram():
    rng = np.random.default_rng(4)
    acts = (rng.standard_normal((33, 97)) * np.exp(rng.uniform(-8, 8, (33, 97)))).astype(np.float32)
    acts[0, :6] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0]
    acts[1, :20] = 1.5  # a hot bin at both levels
    hist = jax.jit(cpu.positive_histogram, static_argnums=2)
    level0 = np.asarray(hist(acts, 0, 0))
    np.testing.assert_array_equal(level0, R["positive_histogram"](acts, 0, 0))
    for prefix in (int(np.argmax(level0)), 0x3FC0, 0x7F80, 0, -5):
        np.testing.assert_array_equal(hist(acts, prefix, 1), R["positive_histogram"](acts, prefix, 1))


def thresholds(rng: np.random.Generator, acts: np.ndarray) -> np.ndarray:
    """Per-latent thresholds equal to existing entries (ties), a few ±inf and nan."""
    thr = acts[rng.integers(0, acts.shape[0], acts.shape[1]), np.arange(acts.shape[1])].copy()
    thr[:3] = [np.inf, -np.inf, np.nan]
    return thr



def _batchtopk_case(case: str, rng: np.random.Generator, wide: bool = False):
    """(x, w, b, k, expected encoder passes or None) of encode_batchtopk's cases: its guess holds; the
    rows of the guess's sample (each thread's first block: 256 rows at these F) are ten times smaller
    than the rest, so the pool overflows, or ten times larger, so the guess is above the threshold and
    the pool misses entries (both on ≤ 4 threads, where the sample misses most rows); every entry equal
    (the threshold's bin overflows the pool); fewer positive entries than k·B. `wide`: wide_encoder's
    integers (sums exact, also with the eightfold rows), for the screen."""
    shapes = {
        "guess holds": (700, 16, 200, 3),
        "first rows smaller": (1100, 8, 96, 1),
        "first rows larger": (4096, 8, 96, 2),
    }
    rows, d, n_latents, k = shapes.get(case, (600, 8, 64, 2))
    if wide:
        x, w, b = wide_encoder(rng, rows, d, n_latents, top=400)
    else:
        x = rng.standard_normal((rows, d)).astype(np.float32)
        w = rng.standard_normal((d, n_latents)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n_latents)).astype(np.float32)
    passes = 1
    threads = len(os.sched_getaffinity(0))
    if case in ("first rows smaller", "first rows larger"):
        smaller = case == "first rows smaller"
        x[: 256 * threads] *= (0.125 if wide else 0.1) if smaller else (8 if wide else 10)
        passes = 2 if threads <= 4 else None
    elif case == "all equal":
        w[:] = 0
        b[:] = 0.5
        passes = 3
    elif case == "few positives":
        b[:] = -50
        b[:3] = 0
    return x, w, b, k, passes


BATCHTOPK_CASES = ["guess holds", "first rows smaller", "first rows larger", "all equal", "few positives"]
# With the screen: its pool holds the pass's candidates, so only a guess above the threshold's bin
# (approximate bins below it) sends the kernel to the unscreened passes (1 + 2).
SCREENED_PASSES = {"first rows larger": 3}


@pytest.mark.parametrize("screen", ["off", "required", "required, groups of 48 latents"])
@pytest.mark.parametrize("case", BATCHTOPK_CASES)
def test_encode_batchtopk_equals_encode_then_select(case, screen, request):
    """The fused BatchTopK kernel equals the composition that defines it (encode_histogram,
    select_batchtopk, topk_rows of aux-k, values at the slots) bit for bit, in one, two or three passes;
    with the screen required, on inputs that bfloat16 rounds (the unscreened passes after a screened one
    that could not select: "required" then only asks that the screen ran), in one column group and in
    several (the guess then from group 0's columns of the sampled rows)."""
    if screen != "off" and not cpu.can_screen():
        pytest.skip("no AVX512-BF16 screen")
    if screen.endswith("groups of 48 latents"):
        request.getfixturevalue("screen_group_48")
        screen = "required"
    x, w, b, k, passes = _batchtopk_case(case, np.random.default_rng(4), wide=screen != "off")
    if screen != "off" and passes is not None:
        passes = SCREENED_PASSES.get(case, 1)
    n_latents = w.shape[1]
    for mask_aux in (np.arange(n_latents) % 40 == 3, np.arange(n_latents) % 2 == 0):  # few and many allowed
        want = jax.jit(partial(ops.encode_batchtopk, fused=False), static_argnums=(4, 5))(
            x, w, b, k, 2 * k, 4, mask_aux
        )
        got = jax.jit(partial(cpu.encode_batchtopk, screen=screen), static_argnums=(6, 7, 8))(
            x, w, b, k * x.shape[0], mask_aux, 4, 2 * x.shape[0], 2 * k, 4
        )
        names = ("row", "idx", "val", "aux_idx", "aux_val", "smallest")
        for name, g, wv in zip(names, got, want, strict=False):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(wv), err_msg=f"{case}: {name}")
        assert passes is None or int(got[6]) == passes, case
        assert int(np.sum(np.asarray(got[1]) >= 0)) == min(k * x.shape[0], int(np.sum(x @ w + b > 0)))


@pytest.mark.parametrize("fits", [True, False])
def test_encode_above_equals_encode_then_select(fits):
    """jumprelu's fused selection equals count_above + select_above + values on the encoder's output
    where the entries fit the chunks (thresholds per latent, some negative); where they do not, the
    counts still do (the step then takes the dense loss) and nothing is written out of bounds."""
    rng = np.random.default_rng(5)
    rows, d, n_latents, size = 600, 8, 150, 8
    x = rng.standard_normal((rows, d)).astype(np.float32)
    w = rng.standard_normal((d, n_latents)).astype(np.float32)
    b = (0.1 * rng.standard_normal(n_latents)).astype(np.float32)
    thr = (rng.random(n_latents) * 4 - 0.5).astype(np.float32)
    n_chunks = rows * (n_latents // size + 1) if fits else rows // 2
    compose = jax.jit(partial(ops.encode_above, fused=False), static_argnums=(4, 5))
    want = compose(x, w, b, thr, size, n_chunks)
    got = jax.jit(cpu.encode_above, static_argnums=(4, 5))(x, w, b, thr, n_chunks, size)
    np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(want[3]), err_msg="counts")
    needed = int(np.sum((np.asarray(want[3]) + size - 1) // size))
    assert (needed <= n_chunks) == fits
    if fits:
        for name, g, wv in zip(("row", "idx", "val", "counts"), got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(wv), err_msg=name)
    assert np.asarray(got[1]).shape == (n_chunks, size)

@pytest.mark.parametrize("shape", SHAPES)
def test_row_counts_and_compact(shape):
    b, n_latents, _, size = shape
    rng = np.random.default_rng(5)
    acts = tied_acts(rng, b, n_latents)
    thr = thresholds(rng, acts)
    above, equal = (np.asarray(x) for x in cpu.row_counts(acts, thr))
    ref_above, ref_equal = R["row_counts"](acts, thr)
    np.testing.assert_array_equal(above, ref_above)
    np.testing.assert_array_equal(equal, ref_equal)
    quota = rng.integers(0, 3, b).astype(np.int32)
    n = above + np.minimum(equal, quota)
    n_row_chunks = (n + size - 1) // size
    chunk_start = (np.cumsum(n_row_chunks) - n_row_chunks).astype(np.int32)
    n_chunks = int(n_row_chunks.sum()) + 2  # unused trailing chunks
    compact = jax.jit(cpu.compact, static_argnums=(4, 5))
    got = compact(acts, thr, quota, chunk_start, n_chunks, size)
    want = R["compact"](acts, thr, quota, chunk_start, n_chunks, size)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # Too few chunks: writes past the end are dropped, as in the reference.
    got = cpu.compact(acts, thr, quota, chunk_start, n_chunks // 2, size)
    want = R["compact"](acts, thr, quota, chunk_start, n_chunks // 2, size)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_vmap_over_saes():
    """A leading `sae` axis on every operand (k too) runs the kernel once per SAE."""
    rng = np.random.default_rng(6)
    n_sae, b, n_latents, d, size = 3, 12, 64, 8, 5
    acts = np.stack([tied_acts(rng, b, n_latents) for _ in range(n_sae)])
    mask = rng.random((n_sae, n_latents)) < 0.9
    ks = np.array([1, 3, 5], np.int32)
    idx = jax.vmap(cpu.topk_rows, (0, 0, 0, None))(acts, ks, mask, size)
    want = jnp.stack([R["topk_rows"](acts[i], ks[i], mask[i], size) for i in range(n_sae)])
    np.testing.assert_array_equal(idx, want)
    row = np.arange(b, dtype=np.int32)
    val = rng.standard_normal(idx.shape).astype(np.float32) * (np.asarray(idx) >= 0)
    w = rng.standard_normal((n_sae, n_latents, d)).astype(np.float32)
    y = rng.standard_normal((n_sae, b, d)).astype(np.float32)
    got = jax.jit(
        jax.vmap(
            lambda i, v, w, y: (
                cpu.gather_sum(row, i, v, w, b),  # row is shared: a mix of batched and unbatched operands
                cpu.gather_dot(row, i, y, w),
                cpu.scatter_rows(row, i, v, y, n_latents),
            )
        )
    )(idx, val, w, y)
    for s in range(n_sae):
        close(got[0][s], R["gather_sum"](row, idx[s], val[s], w[s], b))
        close(got[1][s], R["gather_dot"](row, idx[s], y[s], w[s]))
        close(got[2][s], R["scatter_rows"](row, idx[s], val[s], y[s], n_latents))
    hist = jax.vmap(lambda a: cpu.positive_histogram(a, 0, 0))(acts)
    for i in range(n_sae):
        np.testing.assert_array_equal(hist[i], R["positive_histogram"](acts[i], 0, 0))


def test_keep_is_the_identity_in_value_and_gradient():
    """`keep` returns its operand (under vmap too) and `keep_cotangent` passes the cotangent unchanged
    (their effect on the step's buffers: tests/test_fused_step.py)."""
    x = np.random.default_rng(11).standard_normal((256, 64)).astype(np.float32)
    np.testing.assert_array_equal(jax.jit(cpu.keep)(x), x)
    np.testing.assert_array_equal(jax.vmap(cpu.keep)(np.stack([x, -x])), np.stack([x, -x]))
    grad = jax.grad(lambda v: jnp.sum(jnp.sin(ops.keep_cotangent(v * 2.0))))(x)
    np.testing.assert_allclose(grad, 2.0 * np.cos(2.0 * x), rtol=1e-6)


def test_shard_map_two_devices():
    """Per-shard calls on a 2-device mesh: rows of the batch split across devices."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    rng = np.random.default_rng(7)
    b, n_latents, d, size = 16, 96, 8, 6
    acts = tied_acts(rng, b, n_latents)
    mask = rng.random(n_latents) < 0.9
    w = rng.standard_normal((n_latents, d)).astype(np.float32)
    rows_spec = P("data")

    def local(a: jax.Array, m: jax.Array, w: jax.Array, k: jax.Array):
        idx = cpu.topk_rows(a, k, m, size)
        row = jnp.arange(a.shape[0], dtype=jnp.int32)
        vals = jnp.take_along_axis(a, jnp.maximum(idx, 0), axis=1) * (idx >= 0)
        recon = cpu.gather_sum(row, idx, vals, w, a.shape[0])
        grad_w = jax.lax.psum(cpu.scatter_rows(row, idx, vals, recon, n_latents), "data")
        hist = jax.lax.psum(cpu.positive_histogram(a, 0, 0), "data")
        return idx, recon, grad_w, hist

    sharded = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(rows_spec, P(), P(), P()), out_specs=(rows_spec, rows_spec, P(), P())
        )
    )
    idx, recon, grad_w, hist = sharded(acts, mask, w, jnp.int32(4))
    want_idx = R["topk_rows"](acts, 4, mask, size)
    np.testing.assert_array_equal(idx, want_idx)
    row = np.arange(b, dtype=np.int32)
    vals = np.take_along_axis(acts, np.maximum(np.asarray(want_idx), 0), axis=1) * (np.asarray(want_idx) >= 0)
    want_recon = R["gather_sum"](row, want_idx, vals, w, b)
    close(recon, want_recon)
    close(grad_w, R["scatter_rows"](row, want_idx, vals, want_recon, n_latents))
    np.testing.assert_array_equal(hist, R["positive_histogram"](acts, 0, 0))


def test_primitives_have_no_gradient():
    """The kernels are bare custom calls: differentiating them needs the caller's custom_vjp."""
    rng = np.random.default_rng(8)
    row, idx, val = codes(rng, 4, 10, 3, max_per_row=3)
    w = rng.standard_normal((10, 5)).astype(np.float32)
    with pytest.raises(Exception):  # noqa: B017 - JAX's error type for a missing JVP rule is internal
        jax.grad(lambda w: cpu.gather_sum(row, idx, val, w, 4).sum())(w)


def test_sum_squares_equals_float64():
    """sum_squares (rows in float32 lanes, summed in double) against numpy in float64, with a mean
    shift and rows of 13 (the eight-lane loop and its tail); and its gradient against autodiff's."""
    rng = np.random.default_rng(8)
    a = rng.normal(3.0, 1.0, (301, 13)).astype(np.float32)
    mean = a.mean(axis=0)
    want = np.sum((a.astype(np.float64) - mean) ** 2)
    np.testing.assert_allclose(float(cpu.sum_squares(a, mean)), want, rtol=1e-6)
    got = jax.grad(ops.sum_squares, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(mean))
    want = jax.grad(lambda a, m: jnp.sum((a - m) ** 2), argnums=(0, 1))(jnp.asarray(a), jnp.asarray(mean))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
