"""`jaxsae export-activations`: a PyTorch audio encoder's layers into one activation store per layer.

    jaxsae export-activations --model whisper-tiny.en --layers 2,4 --audio corpus/manifest.jsonl \\
        --out runs/acts/whisper-tiny.en

writes runs/acts/whisper-tiny.en/layer_2/ and layer_4/. Run the same command again to resume after a kill.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-activations",
        help="export an audio encoder's layer activations into activation stores (resumable)",
        description="Runs audio through a PyTorch encoder with hooks on the given layers and writes one "
        "shuffled activation store per layer under OUT/layer_<n>/. Re-running the same command resumes.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="whisper-tiny.en, a local transformers checkpoint folder, or package.module:callable",
    )
    p.add_argument(
        "--layers",
        required=True,
        help="comma-separated layers, 1-based (e.g. 2,4), or 'all'; "
        "EnCodec: encoder, quantized, quantized@<kbps>",
    )
    p.add_argument(
        "--audio",
        required=True,
        help="folder of audio files, or a manifest (.jsonl / .csv with "
        "a path column; other columns become labels)",
    )
    p.add_argument("--out", required=True, help="output folder; one store per layer goes under it")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the grouping and row shuffle (default 0)")
    p.add_argument(
        "--shuffle-buffer-rows", type=int, default=65536, help="rows per shuffled group (default 65536)"
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float16", "float32"),
        help="stored dtype (default bfloat16)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from encoders.export import export_activations
    from encoders.models import EncoderError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        res = export_activations(
            args.model,
            args.layers,
            args.audio,
            args.out,
            batch_size=args.batch_size,
            shuffle_buffer_rows=args.shuffle_buffer_rows,
            seed=args.seed,
            dtype=args.dtype,
            device=device,
            progress=not args.no_progress,
        )
    except EncoderError as e:  # cli.py maps StoreError / AudioError; this one is the model's
        print(f"jaxsae: error: {e}", file=sys.stderr)
        return 2
    for layer, path in res.stores.items():
        print(
            f"layer {layer}: {res.rows[layer]} rows, {res.clips_done[layer]}/{res.clips_total} clips, "
            f"{res.clips_failed[layer]} failed, {res.nonfinite_rows[layer]} non-finite rows -> {path}"
        )
    rate = res.frames_computed / max(res.seconds, 1e-9)
    print(f"{res.frames_computed} frames computed in {res.seconds:.1f} s ({rate:,.0f} frames/s)")
    return 0
