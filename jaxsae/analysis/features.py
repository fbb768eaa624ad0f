"""Per-feature statistics over codes [N, F] (scipy CSR or dense numpy): domain shares, Fisher scores,
top-activating frames and clips, activation-weighted mean profiles (e.g. a mel spectrum per feature)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

SPECIALISED = 0.8  # a feature whose share of firing in one domain is at least this is specialised


def as_csr(codes) -> sp.csr_matrix:
    """Codes [N, F] as CSR float64 (sums of squares of float32 codes lose digits otherwise)."""
    return sp.csr_matrix(codes, dtype=np.float64)


def one_hot(groups: np.ndarray, order: list | None = None) -> tuple[sp.csr_matrix, list]:
    """Indicator [N, G] CSR of `groups` [N] over `order` (default: sorted unique values); rows whose value
    is None or not in `order` are all zero. Returns (indicator, order)."""
    groups = np.asarray(groups, dtype=object)
    known = np.asarray([g is not None for g in groups], bool)
    order = list(order) if order is not None else sorted(set(groups[known].tolist()))
    where = {g: i for i, g in enumerate(order)}
    col = np.asarray([where.get(g, -1) if g is not None else -1 for g in groups], np.int64)
    rows = np.nonzero(col >= 0)[0]
    data = np.ones(rows.size)
    return sp.csr_matrix((data, (rows, col[rows])), shape=(len(groups), len(order))), order


# ----------------------------------------------------------------------------------- domain shares


def domain_shares(
    codes, domains: np.ndarray, order: list | None = None, by: str = "count"
) -> tuple[np.ndarray, list]:
    """Share of each feature's firing in each domain: [F, D] float64 (rows sum to 1, or 0 for a feature
    that never fires) and the domain names (default: sorted; rows with domain None are left out).

    by="count": share of the rows on which the feature fires (what "x% of its firing is in speech"
    means; the default). by="mass": share of its summed activation. Shares are not corrected for how
    many rows each domain has: a corpus that is 40% speech pulls shares towards speech."""
    x = as_csr(codes)
    if by == "count":
        x.data = np.ones_like(x.data)
    elif by != "mass":
        raise ValueError(f"by must be 'count' or 'mass', got {by!r}")
    ind, order = one_hot(domains, order)
    per = np.asarray((ind.T @ x).todense()).T  # [F, D]
    total = per.sum(1, keepdims=True)
    return np.divide(per, total, out=np.zeros_like(per), where=total > 0), order


def specialised(shares: np.ndarray, threshold: float = SPECIALISED) -> np.ndarray:
    """[F] int: the domain index holding ≥ `threshold` of each feature's firing, or -1."""
    best = shares.argmax(1)
    return np.where(shares.max(1) >= threshold, best, -1)


# ------------------------------------------------------------------------------------ Fisher scores


def fisher_scores(codes, labels: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """[F] float64 Fisher score of each feature for the classes of `labels` [N] (None: row left out):
    between-class over within-class variance, Σ_c n_c (μ_c − μ)² / Σ_c Σ_{i∈c} (x_i − μ_c)².
    A feature that separates the classes perfectly has a huge (finite, through `eps`) score; one that
    never fires, 0."""
    ind, _ = one_hot(labels)
    keep = np.asarray(ind.sum(1)).ravel() > 0
    x, ind = as_csr(codes)[keep], ind[keep]
    n_c = np.asarray(ind.sum(0)).ravel()[:, None]  # [C, 1]
    s1 = np.asarray((ind.T @ x).todense())  # [C, F]
    s2 = np.asarray((ind.T @ x.multiply(x)).todense())
    mu_c = s1 / np.maximum(n_c, 1)
    mu = s1.sum(0) / max(n_c.sum(), 1)
    between = (n_c * (mu_c - mu) ** 2).sum(0)
    within = np.maximum(s2.sum(0) - (n_c * mu_c**2).sum(0), 0.0)
    return between / (within + eps)


def class_fisher_scores(codes, labels: np.ndarray, cls: str) -> np.ndarray:
    """[F] Fisher scores of class `cls` against the other classes of `labels` [N] (one-vs-rest)."""
    binary = np.asarray([None if v is None else v == cls for v in labels], dtype=object)
    return fisher_scores(codes, binary)


# ------------------------------------------------------------------------------------ top activations


@dataclass
class TopActivations:
    """Per feature, its strongest rows and clips, best first; -1 / NaN pad features that fire less.
    rows [F, n] int64 (row indices), row_values [F, n] float32; clips [F, m] (values of `clip` passed
    in), clip_values [F, m] float32: the clip's mean activation over its analysed rows."""

    rows: np.ndarray
    row_values: np.ndarray
    clips: np.ndarray
    clip_values: np.ndarray


def top_activations(codes, clip: np.ndarray, n_rows: int = 8, n_clips: int = 5) -> TopActivations:
    """The `n_rows` highest activations of every feature (rows) and the `n_clips` clips with the highest
    mean activation (zeros included, so a clip where a feature fires on every frame beats one burst)."""
    x = as_csr(codes)
    rows, row_vals = _top_per_column(x.tocsc(), n_rows)
    ind, order = one_hot(clip.tolist())
    counts = np.asarray(ind.sum(0)).ravel()
    means = sp.diags(1.0 / np.maximum(counts, 1)) @ (ind.T @ x)  # [C, F]
    top, clip_vals = _top_per_column(sp.csc_matrix(means), n_clips)
    ids = np.asarray(order)[np.maximum(top, 0)]
    clips = np.where(top >= 0, ids, -1)
    return TopActivations(rows, row_vals.astype(np.float32), clips, clip_vals.astype(np.float32))


def _top_per_column(m: sp.csc_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column of `m` [R, F]: row indices [F, n] (−1 padded) and values [F, n] (NaN padded) of its
    n largest positive entries, largest first (ties: lower row first)."""
    f = m.shape[1]
    idx, vals = np.full((f, n), -1, np.int64), np.full((f, n), np.nan)
    for j in range(f):
        lo, hi = m.indptr[j], m.indptr[j + 1]
        r, v = m.indices[lo:hi], m.data[lo:hi]
        pos = v > 0
        r, v = r[pos], v[pos]
        order = np.lexsort((r, -v))[:n]
        idx[j, : order.size], vals[j, : order.size] = r[order], v[order]
    return idx, vals


# ------------------------------------------------------------------------------------- mean profiles


def mean_profile(codes, values: np.ndarray) -> np.ndarray:
    """[F, M] float64: each feature's activation-weighted mean of `values` [N, M] (e.g. log-mel per row)
    over the rows where it fires: Σ_i a_if v_i / Σ_i a_if. Rows with a non-finite value are left out;
    NaN for a feature with no weight."""
    values = np.asarray(values, np.float64)
    ok = np.isfinite(values).all(1)
    x = as_csr(codes)[ok]
    num = np.asarray(x.T @ values[ok])  # [F, M]
    den = np.asarray(x.sum(0)).ravel()[:, None]
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def class_means(codes, labels: np.ndarray) -> tuple[np.ndarray, list]:
    """([C, F] float64 mean code per class of `labels` [N] (None: left out), the classes in order)."""
    ind, order = one_hot(labels)
    counts = np.asarray(ind.sum(0)).ravel()
    sums = np.asarray((ind.T @ as_csr(codes)).todense())
    return sums / np.maximum(counts, 1)[:, None], order
