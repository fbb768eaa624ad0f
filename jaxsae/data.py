"""Training rows: where they come from (host side, numpy).

A source is one or more aligned row arrays of shape [N, d_in], one per layer: the planted synthetic
set, a `.npy` file (memory-mapped), or an activation store folder (one `layer_<n>/` store per layer,
or a single store). Batches are made by jaxsae.loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxsae.config import DataConfig
from jaxsae.store import CHUNK_ROWS, ActivationStore, StoreError, open_store
from jaxsae.synthetic import planted_dictionary, planted_rows


class DataError(ValueError):
    """Unusable training data; the message names the file and what is wrong."""


class StoreRows:
    """An activation store read like an array: `shape` and row slices (float32)."""

    def __init__(self, store: ActivationStore):
        self.store = store
        self.shape = (store.num_rows, store.d)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        return np.asarray(self.store.read_rows(start, stop), np.float32)

    def read_blocks(self, blocks) -> np.ndarray:
        """Rows of the aligned 1024-row blocks `blocks`, concatenated, float32 (concurrent reads)."""
        return np.asarray(self.store.read_blocks(blocks), np.float32)


@dataclass
class Source:
    layers: list  # per layer an array-like [N, d_in] (numpy, memmap or StoreRows), rows aligned
    layer_names: list[str]
    description: str
    atoms: np.ndarray | None = None  # planted dictionary [n_atoms, d_in], when known

    @property
    def num_rows(self) -> int:
        return min(a.shape[0] for a in self.layers)


def load_source(cfg: DataConfig, d_in: int) -> Source:
    """The rows `cfg.source` names: 'planted', a .npy file [N, d_in], or a store folder."""
    if cfg.source == "planted":
        atoms = planted_dictionary(d_in, cfg.n_atoms, cfg.seed)
        rows = planted_rows(atoms, cfg.n_rows, cfg.active, cfg.noise, cfg.seed)
        desc = f"planted dictionary: {cfg.n_atoms} atoms in R^{d_in}, {cfg.active} active, noise {cfg.noise}"
        return Source([rows], ["planted"], desc, atoms)
    path = Path(cfg.source)
    if path.suffix == ".npy":
        return Source([_load_npy(path, d_in)], [path.stem], str(path))
    return _load_stores(path, cfg.layers, d_in)


def _load_npy(path: Path, d_in: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path}")
    try:
        rows = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None
    _check_shape(path, rows.shape, d_in)
    return rows


def _check_shape(path: Path, shape: tuple, d_in: int) -> None:
    if len(shape) != 2 or shape[1] != d_in:
        raise DataError(f"{path}: expected shape [N, {d_in}] (sae.d_in), got {list(shape)}")
    if shape[0] < CHUNK_ROWS:
        raise DataError(f"{path}: holds {shape[0]} rows, fewer than one block of {CHUNK_ROWS}")


def store_layers(path: Path) -> dict[str, Path]:
    """Layer name -> store folder under `path` (`layer_<n>/` sub-folders, or `path` itself)."""
    if (path / "manifest.json").is_file():
        return {path.name: path}
    found = sorted(path.glob("layer_*/manifest.json"), key=lambda p: int(p.parent.name.split("_")[-1]))
    return {p.parent.name: p.parent for p in found}


def _load_stores(path: Path, layers: tuple[int, ...], d_in: int) -> Source:
    if not path.exists():
        raise DataError(f"data.source: not found: {path}")
    available = store_layers(path)
    if not available:
        raise DataError(f"{path}: neither a .npy file nor an activation store (no manifest.json found)")
    names = [f"layer_{n}" for n in layers] if layers else list(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise DataError(f"{path}: no store for {', '.join(missing)} (have {', '.join(available)})")
    arrays = []
    for name in names:
        try:
            rows = StoreRows(open_store(available[name], read_only=True))
        except StoreError as e:
            raise DataError(str(e)) from None
        _check_shape(available[name], rows.shape, d_in)
        arrays.append(rows)
    if len({a.shape[0] for a in arrays}) > 1:
        raise DataError(f"{path}: layers hold different row counts {[a.shape[0] for a in arrays]}")
    return Source(arrays, names, f"{path} ({', '.join(names)})")


def check_finite(rows: np.ndarray, where: str, offset: int = 0) -> None:
    """Raises DataError naming the first row of `rows` [n, d] that holds NaN or Inf."""
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        raise DataError(f"{where}: row {offset + int(np.argmax(bad))} is not finite (NaN or Inf)")


def sample_rows(rows, n: int, seed: int, where: str) -> np.ndarray:
    """[≤ n, d] float32 rows from random aligned blocks of `rows` [N, d] (block reads are fast);
    DataError naming `where` and the row if one is not finite."""
    n_blocks = max(rows.shape[0] // CHUNK_ROWS, 1)
    blocks = []
    for b in np.random.default_rng(seed).permutation(n_blocks)[: -(-n // CHUNK_ROWS)]:
        block = np.asarray(rows[b * CHUNK_ROWS : (b + 1) * CHUNK_ROWS], np.float32)
        check_finite(block, where, offset=int(b) * CHUNK_ROWS)
        blocks.append(block)
    return np.concatenate(blocks)[:n]
