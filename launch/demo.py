"""`jaxsae demo --out DIR`: the whole pipeline on the built-in demo corpus, resumable at every stage.

1. corpus: labelled speech, music, sounds and silence synthesised offline -> DIR/corpus/
2. activations: real Whisper tiny.en, encoder layers 2 and 4 -> DIR/store/layer_<n>/
3. training: a BatchTopK SAE (4x, k 32) per layer × 2 seeds, in one pass -> DIR/checkpoints/, metrics.jsonl
4. analysis: reconstruction, features, seed stability, probes, unlearning, Whisper splice cost and
   steering -> DIR/report/index.html (feature browser), figures.json, features.json
5. PyTorch export -> DIR/export/<format>/<layer>_seed<s>_k<k>/
Re-running the same command skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxsae.config import DataConfig, RunConfig, SAEConfig, TrainConfig

DEMO_STEPS = 300
LAYERS = "2,4"
CORPUS_SIZES = {"small": 48, "default": 240}


def demo_config(out: Path, steps: int) -> RunConfig:
    """BatchTopK, 4x Whisper tiny.en's width (384 -> 1536), k 32, two seeds per layer."""
    return RunConfig(
        sae=SAEConfig(d_in=384, d_sae=1536, architecture="batchtopk", k=32, threshold_start_step=steps // 2),
        data=DataConfig(source=str(out / "store")),
        train=TrainConfig(
            steps=steps, batch_size=1024, lr=1e-3, warmup_steps=50, seeds=(0, 1), dead_tokens=500_000,
            log_every=25, checkpoint_every=100, out_dir=str(out),
        ),
    )  # fmt: skip


def run_demo(out: str | Path, steps: int | None = None, size: str = "default") -> dict:
    """Runs (or resumes) every stage; returns the figures written to DIR/report/figures.json."""
    from encoders.corpus import build_corpus, domain_counts
    from encoders.export import export_activations

    out = Path(out)
    print(f"[1/5] demo corpus ({CORPUS_SIZES[size]} clips) -> {out / 'corpus'}")
    corpus = build_corpus(
        out / "corpus", **{f"n_{d}": n for d, n in domain_counts(CORPUS_SIZES[size]).items()}
    )
    print(f"[2/5] Whisper tiny.en activations, layers {LAYERS} -> {out / 'store'}")
    export_activations("whisper-tiny.en", LAYERS, corpus / "manifest.jsonl", out / "store", seed=0)
    cfg = demo_config(out, steps or DEMO_STEPS)
    print(f"[3/5] training {2 * len(cfg.train.seeds)} BatchTopK SAEs in one pass -> {out / 'checkpoints'}")
    from jaxsae.train import train

    train(cfg, resume=True)
    print(f"[4/5] analysis and report -> {out / 'report'}")
    from jaxsae.analysis.pipeline import analyze

    figures = analyze(out, out / "store", out / "report", corpus_dir=corpus, model_side=True)
    print(f"[5/5] PyTorch export -> {out / 'export'}")
    figures["exports"] = _export(out)
    (out / "report" / "figures.json").write_text(json.dumps(figures, indent=2))
    _summary(figures)
    print(f"open {out / 'report' / 'index.html'}")
    return figures


def _export(out: Path) -> dict:
    """Each SAE in every format that can hold it; the reason for any that cannot."""
    from jaxsae.export import FORMATS, ExportError, export_checkpoint

    done = {}
    for fmt in FORMATS:
        try:
            # sparsify holds TopK only: the BatchTopK SAEs go there as TopK with the same k
            paths = export_checkpoint(out, fmt, out / "export" / fmt, batchtopk_as_topk=True)
            done[fmt] = [str(p) for p in paths]
            print(f"  {fmt}: {len(paths)} SAEs")
        except ExportError as e:
            done[fmt] = f"skipped: {e}"
            print(f"  {fmt}: skipped ({e})")
    return done


def _summary(figures: dict) -> None:
    """The headline figures, printed at the end of the demo."""
    for row in figures["reconstruction"]["table"]:
        dead = 100 * row["dead_fraction"]
        print(f"  {row['sae']}: FVE {row['fve']:.3f}, L0 {row['l0']:.1f}, dead {dead:.1f}%")
