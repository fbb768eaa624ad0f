"""Run configuration: one frozen dataclass per concern, loaded from YAML with `--key=value` overrides.

A YAML file mirrors `RunConfig`: top-level sections `sae`, `data`, `train`, each a mapping of fields.
Command-line overrides use dotted keys: `--train.lr=1e-3 --sae.k=16`. Every problem (unknown key,
wrong type, bad value) raises `ConfigError` with one line that names the key at fault.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")


class ConfigError(ValueError):
    """A configuration problem; its message is one line naming the key or file at fault."""


@dataclass(frozen=True)
class SAEConfig:
    """Shape and activation function of one SAE (or of every SAE on the `sae` axis)."""

    d_in: int = 64
    d_sae: int = 512
    architecture: str = "topk"  # topk | batchtopk | jumprelu | relu
    k: int = 8  # topk: active latents per row; batchtopk: mean active latents per row
    # Compute dtype of the training step's matmuls (mixed precision: params, gradients and Adam state
    # stay float32, products accumulate in float32): the encoder's and, in the dense step, the
    # decoder's. The sparse step's decode and gradients touch k entries per row and stay float32.
    dtype: str = "float32"
    # jumprelu
    # In scaled units (E‖x‖² = d_in, coordinates of RMS 1): ε 0.001 at E‖x‖² = 1 and d_in 768 is ≈ 0.03 here.
    jumprelu_bandwidth: float = 0.1  # ε of the rectangle kernel
    jumprelu_init_threshold: float = 1.0
    sparsity_mode: str = "l0"  # jumprelu: l0 | tanh
    tanh_scale: float = 4.0  # jumprelu tanh mode: c in tanh(c · f · ‖W_dec‖)
    # batchtopk
    threshold_beta: float = 0.999  # EMA of the smallest kept value
    threshold_start_step: int = 1000

    def __post_init__(self) -> None:
        _check(self.architecture in ARCHITECTURES, "sae.architecture", f"must be one of {ARCHITECTURES}")
        _check(self.d_in > 0 and self.d_sae > 0, "sae.d_in/d_sae", "must be positive")
        _check(0 < self.k <= self.d_sae, "sae.k", f"must be in 1..d_sae ({self.d_sae})")
        _check(self.sparsity_mode in ("l0", "tanh"), "sae.sparsity_mode", "must be l0 or tanh")
        _check(self.dtype in ("float32", "bfloat16"), "sae.dtype", "must be float32 or bfloat16")
        _check(self.jumprelu_bandwidth > 0, "sae.jumprelu_bandwidth", "must be positive")


@dataclass(frozen=True)
class DataConfig:
    """Where training rows come from: `planted` (synthetic, known dictionary), a `.npy` file [N, d_in],
    or an activation store folder (`layer_<n>/` stores; `layers` picks some, default all)."""

    source: str = "planted"
    layers: tuple[int, ...] = ()
    mix_blocks: int = 16  # aligned 1024-row blocks whose rows are shuffled together into batches
    # planted dictionary (see jaxsae.synthetic)
    n_atoms: int = 512
    active: int = 8
    noise: float = 0.01
    n_rows: int = 200_000
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.n_rows > 0, "data.n_rows", "must be positive")
        _check(0 < self.active <= self.n_atoms, "data.active", "must be in 1..n_atoms")


KERNELS = ("auto", "dense", "sparse")  # TrainConfig.kernels


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, losses and logging of a training run."""

    steps: int = 1500
    batch_size: int = 4096
    lr: float = 1e-3
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # linear decay to 0 over this last fraction of the steps
    max_grad_norm: float = 0.0  # 0: no clipping
    seeds: tuple[int, ...] = (0,)  # one SAE per seed (and per layer) on the `sae` axis ...
    ks: tuple[int, ...] = ()  # ... or one per k (same length as seeds, or empty: sae.k for all)
    sparsity_coefficient: float = 0.0  # λ: L1 (relu) or L0/tanh (jumprelu)
    sparsity_warmup_steps: int = 0
    aux_k_coefficient: float = 1 / 32
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    scale_sample_rows: int = 16_384  # rows used to estimate the input scale
    log_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end
    skip_nonfinite: bool = False  # a non-finite loss: false stops the run, true skips that batch's update
    out_dir: str = "runs/train"
    progress: bool = True
    kernels: str = "auto"  # auto: sparse kernels where they apply (model axis 1); dense; sparse

    def __post_init__(self) -> None:
        _check(self.steps > 0, "train.steps", "must be positive")
        _check(self.kernels in KERNELS, "train.kernels", f"must be one of {', '.join(KERNELS)}")
        _check(self.batch_size > 0, "train.batch_size", "must be positive")
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(0 <= self.decay_fraction <= 1, "train.decay_fraction", "must be in [0, 1]")
        _check(len(self.seeds) > 0, "train.seeds", "needs at least one seed")
        _check(
            not self.ks or len(self.ks) == len(self.seeds),
            "train.ks",
            f"needs one k per seed ({len(self.seeds)}), or none",
        )
        _check(self.log_every > 0, "train.log_every", "must be positive")
        _check(
            self.checkpoint_every % self.log_every == 0,
            "train.checkpoint_every",
            f"must be a multiple of train.log_every ({self.log_every})",
        )

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh ('sae', 'data', 'model'): SAEs, batch rows and latents split over devices.
    The product must equal the number of devices used (default: 1 × all × 1)."""

    sae: int = 1
    data: int = 0  # 0: every device not used by `sae` and `model`
    model: int = 1

    def __post_init__(self) -> None:
        _check(self.sae > 0 and self.model > 0 and self.data >= 0, "mesh", "axis sizes must be positive")


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; saved beside its checkpoints."""

    sae: SAEConfig = field(default_factory=SAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self) -> None:
        for k in self.train.ks:
            _check(0 < k <= self.sae.d_sae, "train.ks", f"each k must be in 1..d_sae ({self.sae.d_sae})")

    def sae_ks(self) -> tuple[int, ...]:
        """k of each seed's SAE (per layer)."""
        return self.train.ks or (self.sae.k,) * self.train.n_seeds

    def sae_grid(self, n_layers: int) -> list[tuple[int, int, int]]:
        """(layer position, seed, k) of every SAE on the `sae` axis: each layer × each seed."""
        return [
            (layer, seed, k)
            for layer in range(n_layers)
            for seed, k in zip(self.train.seeds, self.sae_ks(), strict=True)
        ]


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def to_dict(cfg: Any) -> dict:
    """A config dataclass as plain nested dicts and lists (YAML- and JSON-safe)."""
    out = dataclasses.asdict(cfg)
    return _listify(out)


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_listify(v) for v in value]
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Builds `cls` from nested dicts, checking every key and type. Raises ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key '{path}'{_suggest(str(key), names, prefix)}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except TypeError as e:  # should not happen: keys were checked
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """Converts a YAML or command-line value to the field's type, or raises ConfigError."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{path}.")
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]  # `--train.seeds=3` reads as one number
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_coerce(item, v, path) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{path}: unsupported type {hint}")
    return _scalar(hint, value, path)


def _scalar(hint: type, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _bad(path, "an integer", value)
            except ValueError:
                pass
        _bad(path, "an integer", value)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        _bad(path, "a number", value)
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        _bad(path, "a string", value)
    raise ConfigError(f"{path}: unsupported type {hint}")


def _bad(path: str, expected: str, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{path}: expected {expected}, got {value!r}")


def parse_overrides(args: list[str]) -> dict:
    """`['--train.lr=1e-3', '--sae.k', '16']` -> `{'train': {'lr': '1e-3'}, 'sae': {'k': '16'}}`."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}' (overrides look like --section.key=value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"option '--{key}' needs a value")
            value, i = args[i + 1], i + 1
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"option '--{key}': expected --section.key=value, e.g. --train.lr=1e-3")
        out.setdefault(parts[0], {})[parts[1]] = _yaml_value(value)
        i += 1
    return out


def _yaml_value(value: str) -> Any:
    """A command-line value read as YAML (`1e-3`, `[1, 2]`, `true`), or the text itself where it is not
    YAML (`[1`, `@x`): the field's type check then names the key."""
    if not value:
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Reads a YAML config (optional), applies `--section.key=value` overrides, validates everything."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(RunConfig, data)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path`, or ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"{p}: cannot read config ({type(e).__name__}: {reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (sae, data, train)")
    return data


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
