"""`jaxsae export` and `jaxsae import`: SAEs to and from the PyTorch SAE libraries' formats
(see jaxsae.export)."""

from __future__ import annotations

import argparse

# jaxsae.export.FORMATS, listed here so that `jaxsae --help` imports nothing heavy (a test keeps them equal).
FORMAT_CHOICES = ("saelens", "dictionary-learning", "sparsify")


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="write a checkpoint's SAEs in a PyTorch SAE library's format",
        description="jaxsae export CKPT --format saelens|dictionary-learning|sparsify --out DIR: one folder "
        "per SAE (seed<S>_k<K>), input scale folded in, so the exported SAEs take raw activations.",
    )
    export.add_argument("checkpoint", help="run folder, its checkpoints/ folder, or one step's folder")
    export.add_argument("--format", required=True, choices=FORMAT_CHOICES, help="target library")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument(
        "--hook-name",
        default=None,
        help="hook point written into the metadata (default: from the run's data)",
    )
    export.add_argument("--model-name", default=None, help="model name for the metadata (default: likewise)")
    export.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weight dtype")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    export.add_argument(
        "--batchtopk-as-topk",
        action="store_true",
        help="write BatchTopK SAEs to a TopK-only format (sparsify) as TopK with the same k",
    )
    export.set_defaults(func=_export)

    imp = sub.add_parser(
        "import",
        help="turn an SAE saved by SAELens, dictionary_learning or sparsify into a jaxsae run folder",
        description="jaxsae import DIR --out RUN_DIR (the format is detected from the files); continue "
        "training with: jaxsae train RUN_DIR/config.yaml --resume",
    )
    imp.add_argument("folder", help="folder of the exported SAE")
    imp.add_argument("--out", required=True, help="new run folder to write")
    imp.set_defaults(func=_import)


def _export(args: argparse.Namespace, rest: list[str]) -> int:
    from jaxsae.export import export_checkpoint

    folders = export_checkpoint(
        args.checkpoint,
        args.format,
        args.out,
        hook_name=args.hook_name,
        model_name=args.model_name,
        dtype=args.dtype,
        step=args.step,
        batchtopk_as_topk=args.batchtopk_as_topk,
    )
    for folder in folders:
        print(f"wrote {args.format}: {folder}")
    return 0


def _import(args: argparse.Namespace, rest: list[str]) -> int:
    from jaxsae.export import detect_format, import_to_checkpoint

    fmt, _ = detect_format(args.folder)
    run = import_to_checkpoint(args.folder, args.out)
    print(f"imported {fmt} SAE from {args.folder} into {run}")
    print(f"continue training with: jaxsae train {run / 'config.yaml'} --resume")
    return 0
