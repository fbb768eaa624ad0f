"""Unlearning a class: zero the features with the top one-vs-rest Fisher scores for it and see how far a
probe's accuracy on that class falls, against zeroing as many random features.

The probe is a logistic regression on all of the SAE's features (scaled, not centred, so a zeroed feature
reads as "off"), trained once on the train clips; features are removed from the test rows only.
Random features are drawn from the features that fire on the train rows, never from the top-n.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from jaxsae.analysis.features import class_fisher_scores
from jaxsae.analysis.probing import Split, fit_probe


def zero_features(x: sp.csr_matrix, features: np.ndarray) -> sp.csr_matrix:
    """x [N, F] with the columns `features` set to 0."""
    keep = np.ones(x.shape[1])
    keep[np.asarray(features, np.int64)] = 0.0
    return sp.csr_matrix(x @ sp.diags(keep))


def unlearn_class(
    codes, labels: np.ndarray, split: Split, cls: str, n: int = 10, draws: int = 5, seed: int = 0, model=None
) -> dict:
    """Accuracy on the test rows of class `cls` before and after zeroing its top-n Fisher features (by
    one-vs-rest Fisher score on the train rows), and after zeroing n random features (`draws` times).
    Also the accuracy on the other classes' test rows, before and after (the side effect).

    Returns {"class", "n", "base", "top", "drop_top", "random_mean", "random_sd", "drop_random_mean",
    "drop_random_sd", "others_base", "others_top", "top_features"}."""
    x = sp.csr_matrix(codes, dtype=np.float64)
    model = model or fit_probe(x, labels, split)
    target = split.test & (labels == cls)
    others = split.test & (labels != cls) & np.asarray([v is not None for v in labels])
    top = np.argsort(-class_fisher_scores(x, np.where(split.train, labels, None), cls), kind="stable")[:n]
    pool = np.setdiff1d(np.nonzero(x[np.nonzero(split.train)[0]].getnnz(axis=0))[0], top)
    rng = np.random.default_rng(seed)
    randoms = [
        _accuracy(model, zero_features(x, rng.choice(pool, min(n, pool.size), replace=False)), labels, target)
        for _ in range(draws)
    ]
    base, removed = (
        _accuracy(model, x, labels, target),
        _accuracy(model, zero_features(x, top), labels, target),
    )
    return {
        "class": cls,
        "n": int(n),
        "base": base,
        "top": removed,
        "drop_top": base - removed,
        "random_mean": float(np.mean(randoms)),
        "random_sd": float(np.std(randoms)),
        "drop_random_mean": base - float(np.mean(randoms)),
        "drop_random_sd": float(np.std(randoms)),
        "others_base": _accuracy(model, x, labels, others),
        "others_top": _accuracy(model, zero_features(x, top), labels, others),
        "top_features": top.tolist(),
    }


def unlearn_label(
    codes, labels: np.ndarray, split: Split, n: int = 10, draws: int = 5, seed: int = 0
) -> list[dict]:
    """`unlearn_class` for every class of `labels` with test rows, sharing one probe."""
    x = sp.csr_matrix(codes, dtype=np.float64)
    if not split.test.any() or len(set(labels[split.train].tolist())) < 2:
        return []
    model = fit_probe(x, labels, split)
    classes = sorted(set(labels[split.test].tolist()) - {None})
    return [unlearn_class(x, labels, split, c, n, draws, seed, model) for c in classes]


def _accuracy(model, x: sp.csr_matrix, labels: np.ndarray, rows: np.ndarray) -> float:
    if not rows.any():
        return float("nan")
    idx = np.nonzero(rows)[0]
    return float(np.mean(model.predict(x[idx]) == labels[idx].astype(str)))
