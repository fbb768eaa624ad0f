"""`jaxsae analyze CKPT --store STORE --out DIR`: every analysis of a checkpoint's SAEs (jaxsae.analysis)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="analyse a checkpoint's SAEs on their activation stores: figures, features, report",
        description="jaxsae analyze CKPT --store STORE --out DIR: reconstruction, domain specialisation, "
        "Fisher scores, seed and layer stability, probes, DCI, unlearning, and (unless --no-model) Whisper's "
        "cost of each splice and the steering sweep; writes DIR/figures.json, DIR/features.json, the report.",
    )
    p.add_argument("checkpoint", help="run folder, its checkpoints/ folder, one step's folder, or an import")
    p.add_argument("--store", required=True, help="activation store folder (layer_<n>/ stores, or one store)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--corpus", default=None, help="corpus folder with manifest.jsonl (default: found from the store)"
    )
    p.add_argument("--no-model", action="store_true", help="skip the Whisper studies (splice cost, steering)")
    p.add_argument("--max-rows", type=int, default=20_000, help="rows analysed per layer (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample and the splits")
    p.add_argument("--layer", default=None, help="store layer of an SAE whose checkpoint does not name one")
    p.set_defaults(func=_analyze)


def _analyze(args: argparse.Namespace, rest: list[str]) -> int:
    from jaxsae.analysis import AnalysisError
    from jaxsae.analysis.pipeline import analyze

    if args.max_rows < 1:
        raise AnalysisError(f"--max-rows must be positive, got {args.max_rows}")
    figures = analyze(
        args.checkpoint, args.store, args.out, args.corpus, model_side=not args.no_model,
        layer=args.layer, max_rows=args.max_rows, seed=args.seed,
    )  # fmt: skip
    for row in figures["reconstruction"]["table"]:
        print(
            f"{row['sae']}: FVE {row['fve']:.3f}, L0 {row['l0']:.1f}, "
            f"dead {100 * row['dead_fraction']:.1f}%, dense {100 * row['dense_fraction']:.1f}%"
        )
    print(f"wrote {args.out}/figures.json and features.json")
    return 0
