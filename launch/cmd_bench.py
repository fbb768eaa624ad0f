"""`jaxsae bench`: our training step timed against its floor and the PyTorch peers (jaxsae.bench)."""

from __future__ import annotations

import argparse

_ALL_PEERS = "saelens,sparsify,dictionary-learning"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time the training step: tokens/s, floor ratio, breakdown, memory, peers",
        description="jaxsae bench --d-in 768 --expansion 8 --k 50 --batch 4096 --architecture batchtopk "
        "--compare saelens,sparsify,dictionary-learning [--json] [--out bench/results/NAME.json]",
    )
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--expansion", type=int, default=8, help="d_sae = d_in × expansion")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--architecture", default="batchtopk", help="one or more of batchtopk,jumprelu,topk,relu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mesh", default="sae=1,data=0,model=1", help="axis sizes, e.g. sae=1,data=8,model=1")
    p.add_argument("--devices", type=int, default=1, help="simulated host devices for our step (CPU)")
    p.add_argument("--seeds", type=int, default=1, help="SAEs on the sae axis")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (ours: the first compiles)")
    p.add_argument("--dead-fraction", type=float, default=0.01, help="latents made dead so that aux-k runs")
    p.add_argument("--kernels", default="auto", help="train.kernels of our step: auto, dense or sparse")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-piece breakdown")
    p.add_argument(
        "--compare", nargs="?", const=_ALL_PEERS, default="", help=f"peer libraries (bare: {_ALL_PEERS})"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--out", help="also write the JSON result here (e.g. bench/results/NAME.json)")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    import json
    from pathlib import Path

    from jaxsae.bench.options import BenchOptions, parse_mesh
    from jaxsae.bench.peers import LIBRARIES
    from jaxsae.bench.report import table
    from jaxsae.bench.runner import run_bench
    from jaxsae.config import ARCHITECTURES, ConfigError

    archs = [a.strip() for a in args.architecture.split(",") if a.strip()]
    libraries = tuple(lib.strip() for lib in args.compare.split(",") if lib.strip())
    if bad := [a for a in archs if a not in ARCHITECTURES] or not archs:
        raise ConfigError(f"--architecture: {bad or 'none given'}; choose from {', '.join(ARCHITECTURES)}")
    if bad := [lib for lib in libraries if lib not in LIBRARIES]:
        raise ConfigError(f"--compare: unknown {', '.join(bad)}; choose from {', '.join(LIBRARIES)}")
    parse_mesh(args.mesh)  # a bad mesh stops here, not in a subprocess
    opts = BenchOptions(
        d_in=args.d_in,
        expansion=args.expansion,
        k=args.k,
        batch=args.batch,
        dtype=args.dtype,
        mesh=args.mesh,
        devices=args.devices,
        seeds=args.seeds,
        steps=args.steps,
        warmup=args.warmup,
        dead_fraction=args.dead_fraction,
        breakdown=not args.no_breakdown,
        kernels=args.kernels,
    )
    result = run_bench(opts, archs, libraries)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text if args.json else table(result))
    return 0
