"""Pallas kernels (jaxsae/kernels/pallas.py) against the pure-JAX reference, run on the CPU through Pallas'
interpreters (HLO interpreter for the GPU variant, the TPU interpreter for the TPU variant), and lowered for
cuda and tpu without a device. Tiny shapes: the interpreters are slow (the TPU one ~10 s a compile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae.kernels import pallas as pk
from jaxsae.kernels import reference as ref

B, F, K, C = 5, 37, 5, 12  # rows, latents, slots per chunk (not a power of two), chunks (some unused)
TOL = dict(rtol=1e-5, atol=1e-5)


def _layout(seed: int, n_chunks: int = C) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chunked ELL: row 0 spans 3 chunks (last one part-empty), row 1 has no entries, the rest 0..K+2
    entries, unused chunks at the end on row B - 1."""
    rng = np.random.default_rng(seed)
    rows, idxs = [], []
    for r in range(B):
        n = 2 * K + 1 if r == 0 else 0 if r == 1 else int(rng.integers(0, K + 3))
        lat = np.sort(rng.choice(F, n, replace=False))
        for c in range(-(-n // K)):
            part = lat[c * K : (c + 1) * K]
            idxs.append(np.pad(part, (0, K - len(part)), constant_values=-1))
            rows.append(r)
    assert len(rows) < n_chunks
    idxs += [np.full(K, -1)] * (n_chunks - len(rows))
    rows += [B - 1] * (n_chunks - len(rows))
    idx = jnp.asarray(np.stack(idxs), jnp.int32)
    val = jnp.where(idx >= 0, jnp.asarray(rng.normal(size=idx.shape), jnp.float32), 0.0)
    return jnp.asarray(rows, jnp.int32), idx, val


def _layouts(n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """n layouts stacked on a leading axis."""
    return tuple(jnp.stack(x) for x in zip(*(_layout(s) for s in range(n)), strict=True))


def _tables(d: int, n: int | None = None) -> tuple[jax.Array, jax.Array]:
    """w [(n,) F, d] and y [(n,) B, d], standard normal."""
    lead = () if n is None else (n,)
    w = jax.random.normal(jax.random.key(1), (*lead, F, d), jnp.float32)
    return w, jax.random.normal(jax.random.key(2), (*lead, B, d), jnp.float32)


def _ops(variant: str) -> dict:
    """name → (kernel(row, idx, val, w, y), reference(row, idx, val, w, y))."""
    kw = dict(interpret=True, platform=variant)
    return {
        "gather_sum": (
            lambda r, i, v, w, y: pk.gather_sum(r, i, v, w, B, **kw),
            lambda r, i, v, w, y: ref.gather_sum(r, i, v, w, B),
        ),
        "gather_dot": (
            lambda r, i, v, w, y: pk.gather_dot(r, i, y, w, **kw),
            lambda r, i, v, w, y: ref.gather_dot(r, i, y, w),
        ),
        "scatter_rows": (
            lambda r, i, v, w, y: pk.scatter_rows(r, i, v, y, F, **kw),
            lambda r, i, v, w, y: ref.scatter_rows(r, i, v, y, F),
        ),
    }


@pytest.fixture
def small_tpu_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Smaller TPU blocks so the interpreter runs several steps (double buffering, output revisits,
    several latent blocks) with fewer simulated DMAs."""
    monkeypatch.setattr(pk, "_TPU_ROWS", 64)
    monkeypatch.setattr(pk, "_TPU_SLOTS", 16)
    monkeypatch.setattr(pk, "_TPU_LATENTS", 16)


OPS = ["gather_sum", "gather_dot", "scatter_rows"]


@pytest.mark.parametrize("op", OPS)
def test_gpu_variant_plain(op: str) -> None:
    """d = 150: two column blocks on GPU, the second part-masked."""
    kernel, reference = _ops("gpu")[op]
    args = (*_layout(0), *_tables(150))
    np.testing.assert_allclose(kernel(*args), reference(*args), **TOL)


@pytest.mark.parametrize("op", OPS)
def test_tpu_variant_jit_vmap(op: str, small_tpu_blocks: None) -> None:
    """jit(vmap) over 3 layouts with shared tables: the batch folds into 36 chunks, several grid steps."""
    kernel, reference = _ops("tpu")[op]
    layouts, in_axes = _layouts(3), (0, 0, 0, None, None)
    got = jax.jit(jax.vmap(kernel, in_axes=in_axes))(*layouts, *_tables(20))
    np.testing.assert_allclose(got, jax.vmap(reference, in_axes=in_axes)(*layouts, *_tables(20)), **TOL)


@pytest.mark.parametrize("op", OPS)
def test_gpu_variant_jit_nested_vmap(op: str) -> None:
    """jit(vmap(vmap)): outer axis with its own bfloat16 tables (like the sae axis), inner one sharing
    them, so the batch folds twice, once with shifted table indices and once without."""
    kernel, reference = _ops("gpu")[op]
    layouts = tuple(x.reshape(2, 2, *x.shape[1:]) for x in _layouts(4))
    tables = tuple(t.astype(jnp.bfloat16) for t in _tables(20, 2))

    def nest(f):
        return jax.vmap(jax.vmap(f, in_axes=(0, 0, 0, None, None)))

    got = jax.jit(nest(kernel))(*layouts, *tables)
    np.testing.assert_allclose(got, nest(reference)(*layouts, *tables), **TOL)


def test_supported() -> None:
    assert pk.supported("cuda") and pk.supported("gpu") and pk.supported("tpu")
    assert not pk.supported("cpu")
    with pytest.raises(ValueError, match="no Pallas kernel"):
        pk.gather_sum(*_layout(0), _tables(8)[0], B, platform="cpu")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers(platform: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pallas → Triton IR / Mosaic MLIR for realistic block sizes, bfloat16 tables. The TPU lowering asks
    for the device's chip info; on the CPU we register a v5e's (private JAX API, test only)."""
    from jax._src.pallas.mosaic import tpu_info

    chip = tpu_info.ChipVersion.TPU_V5E
    monkeypatch.setitem(tpu_info.registry, "cpu", lambda: tpu_info.get_tpu_info_for_chip(chip, 1))
    b, k, n_latents, d = 64, 50, 512, 200
    s = jax.ShapeDtypeStruct
    row, idx, val = s((b,), jnp.int32), s((b, k), jnp.int32), s((b, k), jnp.float32)
    w, y = s((n_latents, d), jnp.bfloat16), s((b, d), jnp.bfloat16)
    calls = [
        (lambda r, i, v, w: pk.gather_sum(r, i, v, w, b, platform=platform), (row, idx, val, w)),
        (lambda r, i, y, w: pk.gather_dot(r, i, y, w, platform=platform), (row, idx, y, w)),
        (lambda r, i, v, y: pk.scatter_rows(r, i, v, y, n_latents, platform=platform), (row, idx, val, y)),
    ]
    for f, args in calls:
        text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert ("__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call") in text
