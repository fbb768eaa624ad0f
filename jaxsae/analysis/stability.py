"""Are the features of two SAEs the same? Matched by the correlation of their activations on the same rows.

Decoder-free on purpose: SAEs of different layers (or of different widths) live in different spaces,
yet their activations over the same frames can be compared. Each pair is matched one-to-one by the
Hungarian algorithm on the Pearson correlation matrix [F_a, F_b] (memory: F_a·F_b float64, 19 MB at
1536 × 1536; 2 GB at 16k × 16k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from jaxsae.analysis.features import as_csr

MATCH_THRESHOLD = 0.7


def correlation_matrix(a, b) -> np.ndarray:
    """[F_a, F_b] float64 Pearson correlation between the columns of codes a [N, F_a] and b [N, F_b]
    (same rows); 0 where a column is constant (a feature that never fires)."""
    a, b = as_csr(a), as_csr(b)
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"codes cover different rows: {n} vs {b.shape[0]}")
    mu_a, mu_b = np.asarray(a.mean(0)).ravel(), np.asarray(b.mean(0)).ravel()
    cov = np.asarray((a.T @ b).todense()) / n - np.outer(mu_a, mu_b)
    sd_a, sd_b = _std(a, mu_a), _std(b, mu_b)
    denom = np.outer(sd_a, sd_b)
    return np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 1e-12)


def _std(x: sp.csr_matrix, mu: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(np.asarray(x.multiply(x).mean(0)).ravel() - mu**2, 0.0))


@dataclass
class Match:
    """A one-to-one matching of a's features to b's. `b_index` [F_a] int64: the b feature matched to
    each a feature (−1 when F_a > F_b leaves it out); `corr` [F_a]: its correlation (0 if unmatched);
    `max_corr` [F_a]: best correlation with any b feature; `alive` [F_a] bool: the a feature fires."""

    b_index: np.ndarray
    corr: np.ndarray
    max_corr: np.ndarray
    alive: np.ndarray
    threshold: float

    def summary(self) -> dict:
        """fraction_matched (corr ≥ threshold, over all of a's features), fraction_matched_alive (over the
        ones that fire), mean_max_corr and mean_matched_corr over alive features, histogram of the
        matched correlations of alive features (bins of 0.05 over [-1, 1])."""
        alive = self.alive if self.alive.any() else np.ones_like(self.alive)
        good = self.corr >= self.threshold
        counts, edges = np.histogram(self.corr[alive], bins=np.linspace(-1, 1, 41))
        return {
            "threshold": self.threshold,
            "fraction_matched": float(good.mean()),
            "fraction_matched_alive": float(good[alive].mean()),
            "mean_max_corr": float(self.max_corr[alive].mean()),
            "mean_matched_corr": float(self.corr[alive].mean()),
            "n_features": int(self.corr.size),
            "n_alive": int(self.alive.sum()),
            "histogram": {"edges": edges.round(3).tolist(), "counts": counts.tolist()},
        }


def match_features(a, b, threshold: float = MATCH_THRESHOLD) -> Match:
    """Matches the features of codes a [N, F_a] to those of b [N, F_b] (same rows): the Hungarian
    assignment that maximises the summed correlation."""
    corr = correlation_matrix(a, b)
    rows, cols = linear_sum_assignment(corr, maximize=True)
    b_index = np.full(corr.shape[0], -1, np.int64)
    b_index[rows] = cols
    matched = np.zeros(corr.shape[0])
    matched[rows] = corr[rows, cols]
    alive = np.asarray(as_csr(a).getnnz(axis=0)) > 0
    max_corr = corr.max(1) if corr.shape[1] else np.zeros(corr.shape[0])
    return Match(b_index, matched, max_corr, alive, threshold)


def pairwise_stability(codes: dict[str, object], threshold: float = MATCH_THRESHOLD) -> dict:
    """Every ordered pair of SAEs in `codes` (name -> [N, F], all on the same rows): {"names": [...],
    "fraction_matched": [S][S], "fraction_matched_alive": [S][S], "mean_max_corr": [S][S],
    "pairs": {"a|b": Match.summary()}} with a < b in name order; the matrices are filled symmetrically
    from the a→b matching (1 on the diagonal)."""
    names = list(codes)
    s = len(names)
    mats = {k: np.eye(s) for k in ("fraction_matched", "fraction_matched_alive", "mean_max_corr")}
    pairs = {}
    for i in range(s):
        for j in range(i + 1, s):
            summary = match_features(codes[names[i]], codes[names[j]], threshold).summary()
            pairs[f"{names[i]}|{names[j]}"] = summary
            for key, m in mats.items():
                m[i, j] = m[j, i] = summary[key]
    return {
        "names": names,
        "threshold": threshold,
        **{k: m.tolist() for k, m in mats.items()},
        "pairs": pairs,
    }
