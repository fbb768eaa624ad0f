"""SAELens >= 6: a folder with `cfg.json` + `sae_weights.safetensors`, read by `sae_lens.SAE.load_from_disk`.

Conventions checked against sae-lens 6.54.12 (saes/sae.py, topk_sae.py, jumprelu_sae.py, standard_sae.py,
loading/pretrained_sae_loaders.py):
- Weights: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]; jumprelu adds threshold
  [d_sae] (older files hold log_threshold, which the library exponentiates). Loading is strict
  (`load_state_dict`), and every tensor is cast to cfg["dtype"].
- Encode: pre = (x − b_dec·apply_b_dec_to_input) W_enc + b_enc. standard: ReLU(pre). topk: top-k of pre,
  then ReLU (pre first scaled by ‖W_dec row‖ when rescale_acts_by_decoder_norm). jumprelu:
  ReLU(pre)·H(pre − θ). Decode: f W_dec + b_dec (f/‖W_dec row‖ when rescaling).
- cfg.json as the library's own `save_model` writes it: d_in, d_sae, dtype, device, apply_b_dec_to_input,
  normalize_activations, reshape_activations, metadata {sae_lens_version, ...}, architecture, and for topk
  k and rescale_acts_by_decoder_norm. A sae_lens_version below 6 makes the loader read the config the
  pre-6 way, so it must be written.
jaxsae's batchtopk has no SAELens inference class (its BatchTopK is training-only and saves itself as
jumprelu): it exports as jumprelu with θ broadcast, and `metadata.jaxsae` lets the import restore batchtopk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxsae.config import SAEConfig
from jaxsae.export._common import (
    ExportError,
    Names,
    Params,
    b_dec_folded_into_b_enc,
    field,
    jaxsae_params,
    read_json,
    read_safetensors,
    sae_config,
    take,
    thresholds,
    write_json,
    write_safetensors,
)

NAME = "saelens"
CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
LAYOUT = f"{CFG} + {WEIGHTS}"
ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
UNSUPPORTED: dict[str, str] = {}
# The version whose conventions were checked; the loader only needs it to be >= 6.0.0.
SAE_LENS_VERSION = "6.54.12"
_TO_SAELENS = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}
_FROM_SAELENS = {"topk": "topk", "jumprelu": "jumprelu", "standard": "relu"}


def write(cfg: SAEConfig, params: Params, out_dir: Path, names: Names, dtype: str) -> Path:
    """Writes folded float32 `params` of one SAE into `out_dir` (created); returns `out_dir`."""
    arch = _TO_SAELENS[cfg.architecture]
    tensors = {key: params[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if arch == "jumprelu":
        tensors["threshold"] = thresholds(cfg, params)
    write_safetensors(out_dir / WEIGHTS, tensors, dtype)
    write_json(out_dir / CFG, _cfg_json(cfg, arch, names, dtype))
    return out_dir


def _cfg_json(cfg: SAEConfig, arch: str, names: Names, dtype: str) -> dict:
    out = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the input scale is folded into the weights
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "model_name": names.model_name,
            "hook_name": names.hook_name,
            "jaxsae": {"architecture": cfg.architecture, "k": cfg.k, "input_scale_folded": names.input_scale},
        },
    }
    if arch == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    out["architecture"] = arch
    return out


def find(path: Path) -> Path | None:
    """`path` if it looks like a SAELens folder (its weights file, or a cfg.json with d_sae)."""
    if (path / WEIGHTS).is_file():
        return path
    try:
        return path if "d_sae" in read_json(path / CFG) else None
    except ExportError:
        return None


def read(path: Path) -> tuple[SAEConfig, Params]:
    """The SAEConfig and float32 params (jaxsae layout) of the SAELens folder `path`."""
    cfg_path, w_path = path / CFG, path / WEIGHTS
    cfg = _v6_defaults(read_json(cfg_path), cfg_path)
    arch_in = field(cfg, "architecture", cfg_path, str)
    if arch_in not in _FROM_SAELENS:
        raise ExportError(
            f"{cfg_path}: key 'architecture' is '{arch_in}'; jaxsae can import {', '.join(_FROM_SAELENS)}"
        )
    if cfg.get("normalize_activations", "none") != "none":
        raise ExportError(
            f"{cfg_path}: key 'normalize_activations' is {cfg['normalize_activations']!r}; only 'none' "
            "can be imported (fold the normalisation into the weights first)"
        )
    d_in, d_sae = field(cfg, "d_in", cfg_path), field(cfg, "d_sae", cfg_path)
    t = take(_loader_renames(read_safetensors(w_path), w_path), _shapes(arch_in, d_in, d_sae), w_path)
    w_enc, b_enc, w_dec = t["W_enc"], t["b_enc"], t["W_dec"]
    if not cfg.get("apply_b_dec_to_input", True):  # pre = x W_enc + b_enc: move b_dec·W_enc into b_enc
        b_enc = b_dec_folded_into_b_enc(w_enc, b_enc, t["b_dec"], +1)
    if arch_in == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        w_enc, b_enc, w_dec = _fold_decoder_norm(w_enc, b_enc, w_dec)
    arch, k, theta = _architecture(cfg, arch_in, t.get("threshold"), cfg_path)
    params = jaxsae_params(arch, w_enc, b_enc, w_dec, t["b_dec"], theta)
    return sae_config(arch, d_in, d_sae, k, cfg_path), params


def _shapes(arch: str, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    return shapes


def _loader_renames(tensors: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """What the library does to a state dict before its strict load: log_threshold -> threshold (jumprelu);
    an all-ones `scaling_factor` is dropped, any other means an unfolded fine-tuning scale."""
    tensors = dict(tensors)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = np.exp(tensors.pop("log_threshold").astype(np.float32))
    if "scaling_factor" in tensors:
        if not np.all(tensors["scaling_factor"].astype(np.float32) == 1):
            raise ExportError(
                f"{path}: key 'scaling_factor' is not all ones (fine-tuning scale not supported)"
            )
        del tensors["scaling_factor"]
    return tensors


def _fold_decoder_norm(
    w_enc: np.ndarray, b_enc: np.ndarray, w_dec: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rescale_acts_by_decoder_norm computes pre·n (n = ‖W_dec row‖) and decodes f/n; the same function
    with unit decoder rows: W_enc·n, b_enc·n, W_dec/n (float64, then float32)."""
    n = np.maximum(np.linalg.norm(w_dec.astype(np.float64), axis=1), 1e-30)
    return (
        (w_enc * n[None, :]).astype(np.float32),
        (b_enc * n).astype(np.float32),
        (w_dec / n[:, None]).astype(np.float32),
    )


def _architecture(
    cfg: dict, arch_in: str, theta: np.ndarray | None, path: Path
) -> tuple[str, int | None, np.ndarray | float | None]:
    """(jaxsae architecture, k, threshold): a jumprelu that jaxsae exported from batchtopk (θ all equal,
    metadata.jaxsae says so) comes back as batchtopk with its scalar threshold and k."""
    if arch_in == "topk":
        return "topk", field(cfg, "k", path), None
    if arch_in == "standard":
        return "relu", None, None
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    ours = meta.get("jaxsae") if isinstance(meta.get("jaxsae"), dict) else {}
    k = ours.get("k")
    if ours.get("architecture") == "batchtopk" and isinstance(k, int) and np.all(theta == theta[0]):
        return "batchtopk", k, float(theta[0])
    return "jumprelu", None, theta


def _v6_defaults(cfg: dict, path: Path) -> dict:
    """A pre-6 config read the way the library's `handle_pre_6_0_config` reads it (the parts that matter
    here: architecture, topk's k, apply_b_dec_to_input, boolean normalize_activations)."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    if version and _major(str(version), path) >= 6:
        return cfg
    cfg = dict(cfg)
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    kwargs = cfg.get("activation_fn_kwargs") if isinstance(cfg.get("activation_fn_kwargs"), dict) else {}
    if activation == "topk" and kwargs.get("k") is not None:
        cfg.update(architecture="topk", k=kwargs["k"])
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg


def _major(version: str, path: Path) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise ExportError(f"{path}: key 'sae_lens_version' is not a version: {version!r}") from None
