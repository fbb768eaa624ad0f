"""The benchmark's inputs, identical in every process (numpy only, so the torch peers share them).

Rows are Gaussian noise plus a few planted directions with sparse non-negative coefficients, scaled so
that E‖x‖² ≈ d_in: roughly what an SAE sees after input scaling, with some structure to select.
"""

from __future__ import annotations

import numpy as np

SEED = 0
N_PLANTED = 64  # planted directions
ACTIVE = 4  # planted directions per row (on average)
DEAD_BIAS = -100.0  # encoder bias that keeps a latent from ever firing (pre-activations have RMS ≈ 1)


def make_batch(d_in: int, batch: int, seed: int = SEED) -> np.ndarray:
    """[batch, d_in] float32 rows with E‖x‖² ≈ d_in."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((N_PLANTED, d_in)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    on = rng.random((batch, N_PLANTED)) < ACTIVE / N_PLANTED
    coef = np.where(on, rng.exponential(1.0, (batch, N_PLANTED)), 0.0).astype(np.float32)
    x = 0.5 * rng.standard_normal((batch, d_in)).astype(np.float32) + coef @ atoms * np.sqrt(d_in / 4)
    return (x * np.sqrt(d_in / np.mean(np.sum(x**2, axis=1)))).astype(np.float32)


def dead_latents(d_sae: int, fraction: float, seed: int = SEED) -> np.ndarray:
    """Sorted indices of the latents made dead (at least one when `fraction` > 0), so that aux-k runs."""
    n = int(round(d_sae * fraction))
    n = max(n, 1) if fraction > 0 else 0
    return np.sort(np.random.default_rng(seed + 1).choice(d_sae, size=n, replace=False))
