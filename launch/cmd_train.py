"""`jaxsae train` and `jaxsae demo`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="train SAEs from a YAML config with --section.key=value overrides",
        description="jaxsae train [CONFIG.yaml] [--section.key=value ...] [--resume]",
    )
    train.add_argument("config", nargs="?", help="YAML config (sections sae, data, train)")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run (jax.distributed; TPU pods and SLURM are detected automatically)",
    )
    train.add_argument("--coordinator", help="HOST:PORT of process 0 (with --distributed, off TPU/SLURM)")
    train.add_argument("--num-processes", type=int)
    train.add_argument("--process-id", type=int)
    train.set_defaults(func=_train, accepts_overrides=True)

    demo = sub.add_parser("demo", help="the end-to-end demo")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    demo.add_argument(
        "--size", choices=("small", "default"), default="default", help="corpus size: 48 or 240 clips"
    )
    demo.set_defaults(func=_demo)


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from jaxsae.config import load_config
    from jaxsae.train import train

    if args.config and args.config.startswith("--"):
        rest, args.config = [args.config, *rest], None
    cfg = load_config(args.config, rest)
    if args.distributed:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    result = train(cfg, resume=args.resume)
    for rec in result.metrics:
        print(
            f"SAE {rec['sae']} (seed {rec['seed']}, k {rec['k']}): fve {rec['fve']:.4f}, L0 {rec['l0']:.1f}, "
            f"dead {100 * rec['dead_fraction']:.1f}%"
        )
    if result.atoms_recovered is not None:
        print(
            "planted atoms recovered (cos >= 0.9): " + ", ".join(f"{a:.1%}" for a in result.atoms_recovered)
        )
    print(f"run folder: {cfg.train.out_dir}")
    return 0


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    from launch.demo import run_demo

    run_demo(args.out, steps=args.steps, size=args.size)
    return 0
