"""The benchmark's options, one dataclass shared by the CLI, our process and the peers' processes
(passed to a subprocess as `--field value` arguments)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from jaxsae.config import ConfigError, MeshConfig

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class BenchOptions:
    """Shapes and settings of one benchmark run (one architecture per process)."""

    d_in: int = 768
    expansion: int = 8  # d_sae = d_in × expansion
    k: int = 50
    batch: int = 4096
    architecture: str = "batchtopk"
    dtype: str = "float32"
    mesh: str = "sae=1,data=0,model=1"
    devices: int = 1  # simulated host devices (XLA_FLAGS) in our process; 1: the real device(s)
    seeds: int = 1  # SAEs on the `sae` axis
    steps: int = 10
    warmup: int = 2
    dead_fraction: float = 0.01
    breakdown: bool = True
    breakdown_steps: int = 3
    kernels: str = "auto"  # train.kernels of the step (auto | dense | sparse), where the library has it
    interleave: bool = False  # after its own measurement, time steps in rounds (jaxsae.bench.rounds)

    @property
    def d_sae(self) -> int:
        return self.d_in * self.expansion

    def to_argv(self) -> list[str]:
        """`--field value` for every field (parsed back by `from_argv`)."""
        out = []
        for f in dataclasses.fields(self):
            out += [f"--{f.name}", str(getattr(self, f.name))]
        return out

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> BenchOptions:
        parser = argparse.ArgumentParser()
        for f in dataclasses.fields(cls):
            kind = _parse_bool if f.type in (bool, "bool") else _TYPES[str(f.type)]
            parser.add_argument(f"--{f.name}", type=kind, default=f.default)
        return cls(**vars(parser.parse_args(argv)))


_TYPES = {"int": int, "float": float, "str": str}


def _parse_bool(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


def parse_mesh(text: str) -> MeshConfig:
    """`sae=1,data=8,model=1` (any subset, any order) -> MeshConfig; ConfigError on a bad spec."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name not in ("sae", "data", "model") or not value.isdigit():
            raise ConfigError(f"--mesh: expected e.g. sae=1,data=8,model=1, got {text!r}")
        sizes[name] = int(value)
    return MeshConfig(**sizes)
