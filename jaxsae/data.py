"""Training rows: where they come from and how they are batched (host side, numpy).

A source is a [N, d_in] array: the planted synthetic set, or a `.npy` file (memory-mapped).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxsae.config import DataConfig
from jaxsae.synthetic import planted_dictionary, planted_rows


class DataError(ValueError):
    """Unusable training data; the message names the file and what is wrong."""


@dataclass
class RowSource:
    rows: np.ndarray  # [N, d_in]
    description: str
    atoms: np.ndarray | None = None  # planted dictionary [n_atoms, d_in], when known


def load_source(cfg: DataConfig, d_in: int) -> RowSource:
    """The rows `cfg.source` names: 'planted' or a path to a .npy file of shape [N, d_in]."""
    if cfg.source == "planted":
        atoms = planted_dictionary(d_in, cfg.n_atoms, cfg.seed)
        rows = planted_rows(atoms, cfg.n_rows, cfg.active, cfg.noise, cfg.seed)
        desc = f"planted dictionary: {cfg.n_atoms} atoms in R^{d_in}, {cfg.active} active, noise {cfg.noise}"
        return RowSource(rows, desc, atoms)
    return RowSource(_load_npy(Path(cfg.source), d_in), f"{cfg.source}")


def _load_npy(path: Path, d_in: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path}")
    try:
        rows = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None
    if rows.ndim != 2 or rows.shape[1] != d_in:
        raise DataError(f"{path}: expected shape [N, {d_in}] (sae.d_in), got {list(rows.shape)}")
    if rows.shape[0] == 0:
        raise DataError(f"{path}: holds no rows")
    return rows


def check_finite(rows: np.ndarray, where: str, offset: int = 0) -> None:
    """Raises DataError naming the first row of `rows` [n, d] that holds NaN or Inf."""
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        raise DataError(f"{where}: row {offset + int(np.argmax(bad))} is not finite (NaN or Inf)")


def sample_rows(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """[min(n, N), d] float32 rows drawn without replacement (sorted, for fast memmap reads)."""
    idx = np.sort(np.random.default_rng(seed).permutation(rows.shape[0])[:n])
    return np.asarray(rows[idx], np.float32)


def batches(rows: np.ndarray, batch_size: int, seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
    """Endless [batch_size, d] float32 batches: each epoch a fresh permutation, batches drawn from it
    in order. Deterministic in (seed, step): starting at `start_step` yields what step `start_step` of
    an uninterrupted run would see."""
    n = rows.shape[0]
    if n < batch_size:
        raise DataError(f"data: {n} rows is fewer than one batch (train.batch_size={batch_size})")
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        for j in range(i, per_epoch):
            yield np.asarray(rows[np.sort(perm[j * batch_size : (j + 1) * batch_size])], np.float32)
            step += 1
