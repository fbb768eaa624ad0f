"""Analysis of trained SAEs on an activation store: reconstruction, features, stability across seeds and
layers, probing, disentanglement, unlearning; `pipeline.analyze` runs it all (`jaxsae analyze`).

Modules (import them directly; this package imports nothing heavy so `jaxsae --help` stays fast):
    codes           SAEs of a checkpoint, their codes on store rows (scipy CSR), per-row labels
    reconstruction  FVE, normalised MSE, L0, dead / dense latents, firing-rate histograms
    features        domain shares, Fisher scores, top activations, mean profiles (e.g. mel)
    stability       Hungarian matching of features by activation correlation (seeds, layers)
    probing         logistic-regression probes (top-k features vs dense), DCI, pitch/loudness/timbre readout
    unlearning      removing a class's top Fisher features vs as many random ones
    acoustics       per-frame f0, loudness and spectral centroid from the audio
    pipeline        `analyze(ckpt, store_dir, out_dir, ...)`: everything above, figures.json, features.json
"""


class AnalysisError(ValueError):
    """Inputs that do not fit together (a checkpoint and a store of other widths, no labels...); the
    message is one line naming what is wrong."""
