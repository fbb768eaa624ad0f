"""How well each SAE reconstructs the analysed rows, and how its latents fire.

Conventions (those of `jaxsae.evaluate` and the trainer's metrics):
    FVE  = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²  over all analysed rows (x̄ their mean); normalised MSE = 1 − FVE
    MSE  = mean over rows and coordinates of (x − x̂)², in raw activation units
    L0   = mean number of non-zero codes per row
    dead = fraction of latents that never fire on the analysed rows
    dense = fraction of latents firing on more than `dense_threshold` (default 10%) of the rows
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

DENSE_THRESHOLD = 0.1
HIST_LOG10_MIN = -6.0  # firing rates below 1e-6 land in the first bin
HIST_BIN = 0.25  # log10 units


def firing_rates(codes: sp.csr_matrix) -> np.ndarray:
    """[F] float64: fraction of rows on which each latent is non-zero."""
    return np.asarray(codes.getnnz(axis=0), np.float64) / max(codes.shape[0], 1)


def firing_histogram(rates: np.ndarray) -> dict:
    """Histogram of log10 firing rates [F] of the latents that fire: {"edges": [B + 1] log10 rate,
    "counts": [B], "dead": latents that never fired}; bins of HIST_BIN from HIST_LOG10_MIN to 0."""
    edges = np.arange(HIST_LOG10_MIN, HIST_BIN / 2, HIST_BIN)
    alive = rates[rates > 0]
    counts, _ = np.histogram(np.clip(np.log10(alive), HIST_LOG10_MIN, 0.0), bins=edges)
    return {"edges": edges.round(4).tolist(), "counts": counts.tolist(), "dead": int((rates == 0).sum())}


def reconstruction_metrics(
    acts: np.ndarray, recon: np.ndarray, codes: sp.csr_matrix, dense_threshold: float = DENSE_THRESHOLD
) -> dict:
    """Metrics of one SAE on raw rows `acts` [N, d] with reconstruction `recon` [N, d] and codes [N, F]:
    fve, nmse, mse, l0, dead_fraction, dense_fraction, n_rows, firing_histogram (see the module doc)."""
    x = np.asarray(acts, np.float64)
    err = float(np.sum((x - recon) ** 2))
    var = float(np.sum((x - x.mean(0)) ** 2))
    nmse = err / max(var, 1e-30)
    rates = firing_rates(codes)
    return {
        "fve": 1.0 - nmse,
        "nmse": nmse,
        "mse": err / max(x.size, 1),
        "l0": codes.nnz / max(codes.shape[0], 1),
        "dead_fraction": float(np.mean(rates == 0)),
        "dense_fraction": float(np.mean(rates > dense_threshold)),
        "dense_threshold": dense_threshold,
        "n_rows": int(codes.shape[0]),
        "firing_histogram": firing_histogram(rates),
    }


TABLE_COLUMNS = ("sae", "layer", "seed", "k", "fve", "nmse", "mse", "l0", "dead_fraction", "dense_fraction")


def reconstruction_table(entries, metrics: dict[str, dict]) -> list[dict]:
    """One row per SAE (in `entries` order, grouped by layer as the sae axis is): TABLE_COLUMNS, from
    `metrics` keyed by SAE name."""
    rows = []
    for e in entries:
        m = metrics[e.name]
        rows.append(
            {
                "sae": e.name,
                "layer": e.layer,
                "seed": e.seed,
                "k": e.k,
                **{c: m[c] for c in TABLE_COLUMNS[4:]},
            }
        )
    return rows
