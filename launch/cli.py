"""The `jaxsae` command line. Each command group lives in a `launch.cmd_*` module with a
`register(subparsers)` function; those modules import heavy libraries inside their handlers only,
so `jaxsae --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys
import typing

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "launch.cmd_corpus",
    "launch.cmd_export_activations",
    "launch.cmd_train",
    "launch.cmd_export",
    "launch.cmd_analyze",
    "launch.cmd_bench",
)

# Errors that are the user's input, not our bug: one line, exit code 2.
_USER_ERRORS = (
    "ConfigError",
    "DataError",
    "CheckpointError",
    "StoreError",
    "ExportError",
    "AudioError",
    "EncoderError",
    "CorpusError",
    "TrainingError",
    "AnalysisError",
    "LockError",
    "BenchError",
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (`jaxsae: error: ...`, exit code 2), not
    usage plus message; sub-command parsers inherit it."""

    def error(self, message: str) -> typing.NoReturn:
        where = self.prog.removeprefix("jaxsae").strip()
        print(f"jaxsae: error: {where + ': ' if where else ''}{one_line(message)}", file=sys.stderr)
        sys.exit(2)


def one_line(message: str) -> str:
    """`message` on one line: unprintable characters (a form feed in a file name, say) escaped, so that
    a user's input cannot split the error line, then runs of whitespace made one space."""
    text = "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in message)
    return " ".join(text.split())


def entry() -> int:
    """The `jaxsae` console script: `main` in a process with the training allocator settings and JAX's
    synchronous CPU dispatch (see jaxsae.allocator; the first call re-executes the command)."""
    from jaxsae.allocator import reexec_with_tunables, synchronous_cpu_dispatch

    reexec_with_tunables()
    synchronous_cpu_dispatch()
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
            print(f"jaxsae: error: {one_line(str(e))}", file=sys.stderr)
            return 2
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxsae", description="Sparse autoencoders on audio activations, in JAX."
    )
    sub = parser.add_subparsers(title="commands")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


if __name__ == "__main__":
    sys.exit(entry())
