"""Planted sparse dictionaries: synthetic activations with a known answer, to prove that training learns.

x = Σ_i c_i · atom_i + noise, with `active` atoms per row drawn uniformly from `n_atoms` unit-norm atoms
in R^d and coefficients c_i ~ U(0.5, 1.5) (positive, as SAE codes are).
"""

from __future__ import annotations

import numpy as np


def planted_dictionary(d: int, n_atoms: int, seed: int) -> np.ndarray:
    """[n_atoms, d] float32 random unit-norm atoms."""
    atoms = np.random.default_rng(seed).standard_normal((n_atoms, d)).astype(np.float32)
    return atoms / np.linalg.norm(atoms, axis=1, keepdims=True)


def planted_rows(atoms: np.ndarray, n_rows: int, active: int, noise: float, seed: int) -> np.ndarray:
    """[n_rows, d] float32 rows, each a positive combination of `active` distinct atoms plus Gaussian
    noise of standard deviation `noise` per coordinate."""
    rng = np.random.default_rng(seed + 1)
    n_atoms, d = atoms.shape
    idx = np.concatenate(
        [_distinct(rng, min(16384, n_rows - i), n_atoms, active) for i in range(0, n_rows, 16384)]
    )
    coef = rng.uniform(0.5, 1.5, (n_rows, active)).astype(np.float32)
    x = np.einsum("na,nad->nd", coef, atoms[idx])
    return (x + noise * rng.standard_normal((n_rows, d)).astype(np.float32)).astype(np.float32)


def atoms_recovered(atoms: np.ndarray, w_dec: np.ndarray, threshold: float = 0.9) -> float:
    """Fraction of planted atoms [n_atoms, d] whose best cosine with a decoder row [F, d] is ≥ threshold."""
    a = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    w = w_dec / np.maximum(np.linalg.norm(w_dec, axis=1, keepdims=True), 1e-12)
    return float(np.mean((a @ w.T).max(axis=1) >= threshold))


def _distinct(rng: np.random.Generator, rows: int, n: int, k: int) -> np.ndarray:
    """[rows, k] int: k distinct indices in 0..n-1 per row."""
    return np.argpartition(rng.random((rows, n), dtype=np.float32), k - 1, axis=1)[:, :k]
