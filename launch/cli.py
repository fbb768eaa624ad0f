"""The `jaxsae` command line. Subcommands import their modules lazily so `--help` stays fast."""

from __future__ import annotations

import argparse
import sys

# Errors that are the user's input, not our bug: one line, exit code 2.
_USER_ERRORS = ("ConfigError", "DataError", "CheckpointError", "StoreError", "ExportError")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if rest and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args, rest) or 0
    except KeyboardInterrupt:
        print("jaxsae: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if type(e).__name__ in _USER_ERRORS:
            print(f"jaxsae: error: {e}", file=sys.stderr)
            return 2
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxsae", description="Sparse autoencoders on audio activations, in JAX."
    )
    sub = parser.add_subparsers(title="commands")

    train = sub.add_parser(
        "train",
        help="train SAEs from a YAML config with --section.key=value overrides",
        description="jaxsae train [CONFIG.yaml] [--section.key=value ...] [--resume]",
    )
    train.add_argument("config", nargs="?", help="YAML config (sections sae, data, train)")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.set_defaults(func=_train, accepts_overrides=True)

    demo = sub.add_parser("demo", help="the end-to-end demo")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    demo.set_defaults(func=_demo)
    return parser


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from jaxsae.config import load_config
    from jaxsae.train import train

    if args.config and args.config.startswith("--"):
        rest, args.config = [args.config, *rest], None
    cfg = load_config(args.config, rest)
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

    run_demo(args.out, steps=args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
