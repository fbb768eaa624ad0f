"""What the format modules share: the error type, file reading and writing with one-line errors naming the
file and key, dtype casts, and the jaxsae side of every conversion (thresholds, bias folds, SAEConfig).

Params here are numpy dicts in jaxsae's layout (see jaxsae.sae): `W_enc` [d_in, d_sae], `b_enc` [d_sae],
`W_dec` [d_sae, d_in], `b_dec` [d_in], plus `log_threshold` [d_sae] (jumprelu) or `threshold` [] (batchtopk).
Exported params are already folded (`jaxsae.sae.fold_input_scale`): they take raw activations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from jaxsae.config import ConfigError, SAEConfig

Params = dict[str, np.ndarray]
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# jaxsae's JumpReLU is pre·H(pre − θ), the libraries' ReLU(pre)·H(pre − θ): equal for θ >= 0 only. An
# imported θ <= 0 becomes this floor (the smallest normal float32), equal to ReLU up to denormal inputs.
THRESHOLD_FLOOR = float(np.finfo(np.float32).tiny)


class ExportError(ValueError):
    """An export or import that cannot be done; the message is one line naming the file (and key)."""


@dataclass(frozen=True)
class Names:
    """What an export records about where the SAE reads its activations (metadata only)."""

    hook_name: str
    model_name: str
    layer: int | None = None
    input_scale: float = 1.0  # provenance: already folded into the weights


def one_line(e: BaseException) -> str:
    """`e` as one short line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` (any float dtype) as a C-contiguous array of `dtype` ("float32" or "bfloat16"), same shape
    (np.ascontiguousarray would turn a 0-d array into shape [1])."""
    return np.asarray(a, np.float32).astype(DTYPES[dtype], order="C")


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or ExportError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not readable JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file (bf16 comes back as ml_dtypes.bfloat16), or ExportError."""
    if not path.is_file():
        raise ExportError(f"{path}: file not found")
    try:
        return safetensors.numpy.load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ExportError(f"{path}: corrupt or truncated safetensors file ({one_line(e)})") from None


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """Writes `tensors` cast to `dtype` (safetensors.numpy: BF16 that safetensors.torch reads exactly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file({k: cast(v, dtype) for k, v in tensors.items()}, str(path))


def field(cfg: dict, key: str, path: Path, kind: type = int) -> Any:
    """`cfg[key]` checked to be of `kind` (an int for int, any number for float), or ExportError."""
    if key not in cfg:
        raise ExportError(f"{path}: missing key '{key}'")
    value = cfg[key]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise ExportError(f"{path}: key '{key}' must be {kind.__name__}, got {value!r}")
    return value


def take(
    tensors: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], path: Path
) -> dict[str, np.ndarray]:
    """Exactly the keys of `shapes` from `tensors`, checked for shape and finiteness, as float32 numpy.

    Strict like the libraries' loaders: a missing or an unexpected key is an ExportError."""
    for key in shapes:
        if key not in tensors:
            raise ExportError(f"{path}: missing key '{key}'")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise ExportError(f"{path}: unexpected key '{extra[0]}' (expected {', '.join(shapes)})")
    out = {}
    for key, shape in shapes.items():
        a = np.asarray(tensors[key])
        if a.shape != tuple(shape):
            raise ExportError(f"{path}: key '{key}' has shape {list(a.shape)}, expected {list(shape)}")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ExportError(f"{path}: key '{key}' holds NaN or Inf")
        out[key] = a
    return out


def thresholds(cfg: SAEConfig, params: Params) -> np.ndarray:
    """The per-latent JumpReLU threshold θ [d_sae] float32 of a jumprelu or batchtopk SAE
    (batchtopk: its scalar inference threshold broadcast to every latent)."""
    if cfg.architecture == "jumprelu":
        return np.exp(np.asarray(params["log_threshold"], np.float32))
    return np.full(cfg.d_sae, np.asarray(params["threshold"], np.float32))


def b_dec_folded_into_b_enc(w_enc: np.ndarray, b_enc: np.ndarray, b_dec: np.ndarray, sign: int) -> np.ndarray:
    """b_enc + sign · (b_dec W_enc) [d_sae], in float64 then float32: converts between encoders that
    subtract b_dec from the input (jaxsae) and ones that do not (sign −1 exports, +1 imports)."""
    w64, b64 = np.asarray(w_enc, np.float64), np.asarray(b_dec, np.float64)
    return (np.asarray(b_enc, np.float64) + sign * (b64 @ w64)).astype(np.float32)


def jaxsae_params(
    architecture: str,
    w_enc: np.ndarray,
    b_enc: np.ndarray,
    w_dec: np.ndarray,
    b_dec: np.ndarray,
    theta: np.ndarray | float | None = None,
) -> Params:
    """Params in jaxsae's layout (float32); `theta` is θ [d_sae] for jumprelu, a scalar for batchtopk."""
    params = {
        "W_enc": np.asarray(w_enc, np.float32),
        "b_enc": np.asarray(b_enc, np.float32),
        "W_dec": np.asarray(w_dec, np.float32),
        "b_dec": np.asarray(b_dec, np.float32),
    }
    if architecture == "jumprelu":
        theta = np.maximum(np.asarray(theta, np.float32), THRESHOLD_FLOOR)
        params["log_threshold"] = np.log(theta).astype(np.float32)
    if architecture == "batchtopk":
        params["threshold"] = np.asarray(theta, np.float32).reshape(())
    return params


def sae_config(architecture: str, d_in: int, d_sae: int, k: int | None, path: Path) -> SAEConfig:
    """The SAEConfig of an imported SAE (k: the file's, or SAEConfig's default capped at d_sae when the
    architecture has none); an impossible combination is an ExportError naming `path`."""
    k = k if k is not None else min(SAEConfig.k, d_sae)
    try:
        return SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, dtype="float32")
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from None


def hook_folder(hook_name: str) -> str:
    """A folder name for a hook point (path separators would nest folders)."""
    name = hook_name.replace("/", ".").replace("\\", ".").strip(". ")
    return name or "sae"


def this_or_only_subfolder(path: Path, matches, what: str) -> Path | None:
    """`path` if `matches(path)`, else its only subfolder that matches (None if none; ExportError naming
    them if several: the user must pick one)."""
    if matches(path):
        return path
    subs = sorted(p for p in path.iterdir() if p.is_dir() and matches(p)) if path.is_dir() else []
    if len(subs) > 1:
        raise ExportError(
            f"{path}: holds several {what} ({', '.join(p.name for p in subs)}); pass one of them"
        )
    return subs[0] if subs else None
