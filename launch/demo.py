"""`jaxsae demo --out DIR`: the whole pipeline on the built-in demo corpus, resumable at every stage.

1. corpus: labelled speech, music, sounds and silence synthesised offline -> DIR/corpus/
2. activations: real Whisper tiny.en, encoder layers 2 and 4 -> DIR/store/layer_<n>/
3. training: a BatchTopK SAE (4x, k 32) per layer × 2 seeds, in one pass -> DIR/checkpoints/, metrics.jsonl
4. report: reconstruction figures per SAE -> DIR/report/figures.json, index.html
5. PyTorch export -> DIR/export/<format>/<layer>_seed<s>_k<k>/
Re-running the same command skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from jaxsae.config import DataConfig, RunConfig, SAEConfig, TrainConfig
from jaxsae.data import load_source, sample_rows

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

    result = train(cfg, resume=True)
    print(f"[4/5] report -> {out / 'report'}")
    figures = _report(cfg, result, out / "report")
    print(f"[5/5] PyTorch export -> {out / 'export'}")
    figures["exports"] = _export(out)
    (out / "report" / "figures.json").write_text(json.dumps(figures, indent=2))
    return figures


def _report(cfg: RunConfig, result, report: Path) -> dict:
    """Reconstruction of every SAE (inference mode) on rows sampled from its layer's store."""
    from jaxsae.evaluate import evaluate

    source = load_source(cfg.data, cfg.sae.d_in)
    rows = {
        n: sample_rows(r, 8192, seed=1, where=n)
        for n, r in zip(source.layer_names, source.layers, strict=True)
    }
    saes = []
    for i, (layer, seed, k) in enumerate(cfg.sae_grid(len(source.layers))):
        params = {name: np.asarray(v[i]) for name, v in result.state.params.items()}
        name = source.layer_names[layer]
        metrics = evaluate(cfg.sae, params, float(result.state.input_scale[i]), rows[name])
        saes.append({"layer": name, "seed": seed, "k": k, "architecture": cfg.sae.architecture, **metrics})
        print(
            f"  {name} seed {seed}: FVE {metrics['fve']:.3f}, L0 {metrics['l0']:.1f}, "
            f"dead {100 * metrics['dead_fraction']:.1f}%"
        )
    report.mkdir(parents=True, exist_ok=True)
    figures = {"source": source.description, "steps": cfg.train.steps, "saes": saes}
    (report / "index.html").write_text(_html(figures))
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


def _html(figures: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(s['layer'])}</td><td>{s['seed']}</td><td>{s['k']}</td><td>{s['fve']:.3f}</td>"
        f"<td>{s['l0']:.1f}</td><td>{100 * s['dead_fraction']:.1f}%</td></tr>"
        for s in figures["saes"]
    )
    return (
        "<!doctype html><meta charset=utf-8><title>jaxsae demo</title>"
        f"<h1>jaxsae demo</h1><p>{html.escape(figures['source'])}, {figures['steps']} steps.</p>"
        "<table border=1><tr><th>layer</th><th>seed</th><th>k</th><th>FVE</th><th>L0</th><th>dead</th></tr>"
        f"{rows}</table>"
    )
