"""`jaxsae corpus`: build the labelled demo corpus (speech, music, sounds, silence) into a folder."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    corpus = sub.add_parser(
        "corpus",
        help="build the labelled demo corpus: eSpeak speech, synthesised music and sounds, silence",
        description="jaxsae corpus --out DIR [--seed N] [--size small|default|large | --clips N]. "
        "Writes DIR/audio/*.wav (16-bit mono 16 kHz) and DIR/manifest.jsonl; re-running resumes.",
    )
    corpus.add_argument("--out", required=True, help="output folder (a killed build there is resumed)")
    corpus.add_argument("--seed", type=int, default=0, help="the corpus is a function of it (default 0)")
    size = corpus.add_mutually_exclusive_group()
    size.add_argument(
        "--size",
        choices=("small", "default", "large"),
        default="default",
        help="48, 240 or 960 clips (default: default)",
    )
    size.add_argument("--clips", type=int, help="any number of clips, split 40/25/25/10 %% across domains")
    corpus.add_argument("--min-seconds", type=float, default=2.0, help="shortest clip (default 2)")
    corpus.add_argument(
        "--max-seconds", type=float, default=6.0, help="longest clip (default 6; speech is never cut)"
    )
    corpus.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    corpus.add_argument("--no-progress", action="store_true", help="no progress bar")
    corpus.set_defaults(func=_corpus)


def _corpus(args: argparse.Namespace, rest: list[str]) -> int:
    import time

    from encoders.corpus import SIZES, CorpusError, build_corpus, domain_counts, read_manifest

    start = time.perf_counter()
    try:
        counts = domain_counts(args.clips if args.clips is not None else SIZES[args.size])
        out = build_corpus(
            args.out,
            seed=args.seed,
            **{f"n_{domain}": n for domain, n in counts.items()},
            clip_seconds=(args.min_seconds, args.max_seconds),
            workers=args.workers,
            progress=not args.no_progress,
        )
    except CorpusError as e:
        print(f"jaxsae: error: {e}", file=sys.stderr)
        return 2
    rows = read_manifest(out)
    minutes = sum(r["duration_s"] for r in rows) / 60
    by_domain = ", ".join(f"{d} {n}" for d, n in counts.items())
    print(f"{len(rows)} clips ({by_domain}), {minutes:.1f} min of audio, {time.perf_counter() - start:.0f} s")
    print(f"manifest: {out / 'manifest.jsonl'}")
    return 0
