"""Linear read-outs of SAE codes against the dense activations they came from.

- Probes: logistic regression on the top-k features by Fisher score (chosen on the training rows only)
  against the same probe on the dense activations; frame level, and clip level (mean-pooled rows).
- Splits are by clip (no clip has rows on both sides), stratified by class: each class with ≥ 2 clips
  puts round(test_fraction · its clips) of them, at least one, on the test side.
- DCI (Eastwood & Williams 2018) with Lasso importances against continuous factors (pitch, loudness,
  spectral centroid); read-outs: ridge R² for continuous targets, probe accuracy for classes.
Inputs are divided by their train-set standard deviation without centring, so sparse codes stay sparse
and a zeroed feature still reads as "off".
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from jaxsae.analysis.features import fisher_scores, one_hot

TEST_FRACTION = 0.25
DEFAULT_KS = (1, 8, 32)


# ------------------------------------------------------------------------------------------- splits


@dataclass
class Split:
    """Row masks [N] bool: train and test rows (rows without a label are in neither)."""

    train: np.ndarray
    test: np.ndarray


def split_by_clip(
    labels: np.ndarray, clip: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = 0
) -> Split:
    """Stratified split of the clips of labelled rows (labels [N] with None = unlabelled, clip [N]); a
    class with a single clip stays on the train side. Labels must be constant within a clip."""
    rng = np.random.default_rng(seed)
    known = np.asarray([v is not None for v in labels], bool)
    clip_class = dict(zip(clip[known].tolist(), labels[known].tolist(), strict=True))
    test_clips = set()
    for cls in sorted(set(clip_class.values())):
        clips = sorted(c for c, v in clip_class.items() if v == cls)
        if len(clips) < 2:
            continue
        n_test = int(np.clip(round(test_fraction * len(clips)), 1, len(clips) - 1))
        test_clips.update(rng.permutation(clips)[:n_test].tolist())
    test = known & np.isin(clip, list(test_clips))
    return Split(known & ~test, test)


def _cap(mask: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """`mask` with at most n True entries (a seeded random subset)."""
    idx = np.nonzero(mask)[0]
    if n is None or idx.size <= n:
        return mask
    out = np.zeros_like(mask)
    out[np.random.default_rng(seed).choice(idx, n, replace=False)] = True
    return out


def pool_by_clip(x, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over each clip's rows: ([C, F] float64 dense, clip ids [C] sorted)."""
    ind, order = one_hot(clip.tolist())
    counts = np.asarray(ind.sum(0)).ravel()
    pooled = sp.diags(1.0 / counts) @ (ind.T @ (sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)))
    return np.asarray(pooled.todense() if sp.issparse(pooled) else pooled), np.asarray(order)


def pooled_labels(labels: np.ndarray, clip: np.ndarray, clip_ids: np.ndarray) -> np.ndarray:
    """The label of each clip in `clip_ids` [C] (its first row's), object [C]."""
    first = {}
    for c, v in zip(clip.tolist(), labels.tolist(), strict=True):
        first.setdefault(c, v)
    return np.asarray([first[c] for c in clip_ids.tolist()], dtype=object)


# ------------------------------------------------------------------------------------------- probes


class Probe:
    """Logistic regression on inputs divided by their train-set standard deviation (no centring: sparse
    codes stay sparse and a zeroed feature reads as "off"). Scaled by hand rather than in a sklearn
    Pipeline, whose checks cost more than a small fit; Newton-Cholesky for few inputs, else L-BFGS, with
    BLAS on one thread (L-BFGS-B's small vector operations run several times slower when threaded)."""

    def __init__(self, c: float = 1.0, max_iter: int = 300):
        self.c, self.max_iter = c, max_iter
        self.model = None
        self.scale: np.ndarray | None = None

    def fit(self, x, y: np.ndarray) -> Probe:
        from sklearn.linear_model import LogisticRegression

        self.scale = column_scale(x)
        small = x.shape[1] * max(len(set(y.tolist())) - 1, 1) <= 256
        solver = "newton-cholesky" if small else "lbfgs"
        self.model = LogisticRegression(C=self.c, max_iter=self.max_iter, solver=solver)
        with one_thread():
            self.model.fit(_scaled(x, self.scale), y)
        return self

    def predict(self, x) -> np.ndarray:
        with one_thread():
            return self.model.predict(_scaled(x, self.scale))


@contextmanager
def one_thread():
    """BLAS on one thread and convergence warnings off (a few hundred iterations do to compare)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def column_scale(x) -> np.ndarray:
    """[F] standard deviation of each column of x [N, F] (dense or sparse), 1 where it is 0."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64)
        mean = np.asarray(x.mean(0)).ravel()
        var = np.asarray(x.multiply(x).mean(0)).ravel() - mean**2
    else:
        var = np.asarray(x, np.float64).var(0)
    sd = np.sqrt(np.maximum(var, 0.0))
    return np.where(sd > 1e-12, sd, 1.0)


def _scaled(x, scale: np.ndarray):
    if sp.issparse(x):
        return sp.csr_matrix(x @ sp.diags(1.0 / scale))
    return np.asarray(x, np.float64) / scale


def fit_probe(x, labels: np.ndarray, split: Split, c: float = 1.0) -> Probe:
    """A probe fitted on the train rows of x [N, F]."""
    return Probe(c).fit(_rows(x, split.train), labels[split.train].astype(str))


def probe_accuracy(x, labels: np.ndarray, split: Split, c: float = 1.0) -> float:
    """Test accuracy of a probe trained on the train rows of x [N, F] (NaN without test rows)."""
    if not split.test.any() or len(set(labels[split.train].tolist())) < 2:
        return float("nan")
    model = fit_probe(x, labels, split, c)
    return float(np.mean(model.predict(_rows(x, split.test)) == labels[split.test].astype(str)))


def chance(labels: np.ndarray, split: Split) -> float:
    """Test accuracy of always answering the most frequent training class."""
    if not split.test.any():
        return float("nan")
    train = labels[split.train].astype(str)
    values, counts = np.unique(train, return_counts=True)
    return float(np.mean(labels[split.test].astype(str) == values[counts.argmax()]))


def _rows(x, mask: np.ndarray):
    return x[np.nonzero(mask)[0]]


def topk_features(codes, labels: np.ndarray, split: Split, k: int) -> np.ndarray:
    """Indices [k] of the features with the highest Fisher score for `labels` on the train rows."""
    train_labels = np.where(split.train, labels, None)
    return np.argsort(-fisher_scores(codes, train_labels), kind="stable")[:k]


def topk_probes(codes, labels: np.ndarray, split: Split, ks=DEFAULT_KS) -> dict[int, float]:
    """{k: test accuracy of the probe on the top-k Fisher features} for each k in `ks`."""
    x = sp.csr_matrix(codes)
    out = {}
    for k in ks:
        cols = x[:, topk_features(x, labels, split, k)].toarray()  # a few columns: dense fits faster
        out[int(k)] = probe_accuracy(cols, labels, split)
    return out


def probe_table(codes, dense: np.ndarray, labels: np.ndarray, clip: np.ndarray, ks=DEFAULT_KS, **kw) -> dict:
    """Frame- and clip-level probes of one label: {"frame": {...}, "clip": {...}}, each with
    sae {k: accuracy}, dense (accuracy on the dense rows), chance, n_classes, n_train, n_test.
    kw: test_fraction, seed, max_rows (cap on train and on test rows at frame level, default 20000)."""
    seed, max_rows = kw.get("seed", 0), kw.get("max_rows", 20_000)
    split = split_by_clip(labels, clip, kw.get("test_fraction", TEST_FRACTION), seed)
    split = Split(_cap(split.train, max_rows, seed), _cap(split.test, max_rows, seed + 1))
    out = {"frame": _level(codes, dense, labels, split, ks)}
    pooled_codes, ids = pool_by_clip(codes, clip)
    pooled_dense, _ = pool_by_clip(dense, clip)
    test_clips = set(clip[split.test].tolist())
    train_clips = set(clip[split.train].tolist())
    clip_split = Split(np.isin(ids, list(train_clips)), np.isin(ids, list(test_clips)))
    out["clip"] = _level(pooled_codes, pooled_dense, pooled_labels(labels, clip, ids), clip_split, ks)
    return out


def _level(codes, dense, labels: np.ndarray, split: Split, ks) -> dict:
    return {
        "sae": topk_probes(codes, labels, split, ks),
        "dense": probe_accuracy(np.asarray(dense), labels, split),
        "chance": chance(labels, split),
        "n_classes": len(set(labels[split.train | split.test].tolist())),
        "n_train": int(split.train.sum()),
        "n_test": int(split.test.sum()),
    }


# ------------------------------------------------------------------------------------ DCI and read-outs


def dci(codes, factors: np.ndarray, split: Split, alpha: float = 0.01) -> dict:
    """Disentanglement, completeness and informativeness (Eastwood & Williams 2018) of codes [N, F] with
    respect to factors [N, K] (K ≥ 2; standardised per factor on the train rows).

    Importance R [F, K]: |Lasso coefficient| of each (scaled) code for each factor, fitted on the train
    rows. D_i = 1 − H_K(R_i· / Σ_k R_ik), D = Σ_i ρ_i D_i with ρ_i = Σ_k R_ik / Σ R;
    C_j = 1 − H_F(R_·j / Σ_i R_ij), C = mean_j C_j; I = mean test R² of the Lasso fits.
    Returns those plus per-factor completeness and r2, and `importance` [F, K] (numpy)."""
    x = sp.csr_matrix(codes)
    z = np.asarray(factors, np.float64)
    mu, sd = z[split.train].mean(0), z[split.train].std(0)
    z = (z - mu) / np.where(sd > 0, sd, 1.0)
    importance, r2 = np.zeros((x.shape[1], z.shape[1])), []
    for j in range(z.shape[1]):
        model, coef = _lasso(x[split.train], z[split.train, j], alpha)
        importance[:, j] = np.abs(coef)
        r2.append(_r2(z[split.test, j], model(x[split.test])))
    return {
        **dci_scores(importance),
        "r2": r2,
        "informativeness": float(np.mean(r2)),
        "importance": importance,
    }


def dci_scores(importance: np.ndarray) -> dict:
    """Disentanglement and completeness of an importance matrix R [F, K] (see `dci`)."""
    r = np.abs(np.asarray(importance, np.float64))
    f, k = r.shape
    total = r.sum()
    if total <= 0:
        return {"disentanglement": 0.0, "completeness": 0.0, "completeness_per_factor": [0.0] * k}
    per_code = r.sum(1)
    d_i = 1.0 - _entropy(r, per_code[:, None], k)
    c_j = 1.0 - _entropy(r.T, r.sum(0)[:, None], f)
    return {
        "disentanglement": float(np.sum(per_code / total * d_i)),
        "completeness": float(c_j.mean()),
        "completeness_per_factor": c_j.tolist(),
    }


def _entropy(r: np.ndarray, sums: np.ndarray, base: int) -> np.ndarray:
    """Entropy (log base `base`) of each row of r normalised by `sums`; 1 for an all-zero row."""
    p = np.divide(r, sums, out=np.zeros_like(r), where=sums > 0)
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    h = -(p * logp).sum(1) / np.log(max(base, 2))
    return np.where(sums.ravel() > 0, h, 1.0)


def _lasso(x, y: np.ndarray, alpha: float):
    """(predict function, coefficients on the scaled codes) of a Lasso fit of y [n] on x [n, F]."""
    from sklearn.linear_model import Lasso

    scale = column_scale(x)
    with one_thread():
        model = Lasso(alpha=alpha, max_iter=2000).fit(_scaled(x, scale), y)
    return (lambda new: model.predict(_scaled(new, scale))), model.coef_


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(np.sum((y - y.mean()) ** 2))
    return float(1.0 - np.sum((y - pred) ** 2) / ss) if ss > 0 else float("nan")


def ridge_r2(x, target: np.ndarray, split: Split, alpha: float = 1.0) -> float:
    """Test R² of a ridge regression from x [N, F] (scaled, not centred) to target [N] (NaN rows out)."""
    from sklearn.linear_model import Ridge

    ok = np.isfinite(target)
    train, test = split.train & ok, split.test & ok
    if train.sum() < 2 or test.sum() < 2:
        return float("nan")
    xs = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    scale = column_scale(_rows(xs, train))
    with one_thread():
        model = Ridge(alpha=alpha).fit(_scaled(_rows(xs, train), scale), target[train])
    return _r2(target[test], model.predict(_scaled(_rows(xs, test), scale)))
