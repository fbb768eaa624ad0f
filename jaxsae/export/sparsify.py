"""sparsify (PyPI eai-sparsify): `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`, read by
`sparsify.Sae.load_from_disk(folder / hookpoint)` or `Sae.load_many(folder, local=True)`.

Conventions checked against eai-sparsify 1.3.3 (sparse_coder.py, fused_encoder.py, config.py):
- Weights: encoder.weight [F, d], encoder.bias [F], W_dec [F, d], b_dec [d] (W_skip [d, d] only with
  skip_connection). The model takes the dtype of the file's first tensor; loading is strict.
- Encode: pre = ReLU((x − b_dec) encoder.weightᵀ + encoder.bias), then per row the top k of pre
  (activation "topk") or the max of each of k groups ("groupmax"); it returns (values, indices).
  Decode: Σ values·W_dec[indices] + b_dec.
- cfg.json: SparseCoderConfig fields (activation, expansion_factor, normalize_decoder, num_latents, k,
  multi_topk, skip_connection, transcode) plus d_in; num_latents 0 means d_in·expansion_factor.
So sparsify holds only per-row top-k SAEs: no per-latent or batch threshold, no dense ReLU.
"""

from __future__ import annotations

from pathlib import Path

from jaxsae.config import SAEConfig
from jaxsae.export._common import (
    ExportError,
    Names,
    Params,
    field,
    hook_folder,
    jaxsae_params,
    read_json,
    read_safetensors,
    sae_config,
    take,
    this_or_only_subfolder,
    write_json,
    write_safetensors,
)

NAME = "sparsify"
CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
LAYOUT = f"<hookpoint>/{CFG} + <hookpoint>/{WEIGHTS}"
ARCHITECTURES = ("topk",)
_WHY = "sparsify's SparseCoder only keeps the top k (or group-max) latents of each row"
UNSUPPORTED = {
    "batchtopk": f"{_WHY}; it has no threshold, and top-k per row is not batchtopk's inference function",
    "jumprelu": f"{_WHY}; it has no per-latent threshold",
    "relu": f"{_WHY}; a dense ReLU SAE has no k",
}


def write(cfg: SAEConfig, params: Params, out_dir: Path, names: Names, dtype: str) -> Path:
    """Writes folded float32 `params` into `out_dir/<hook>/`; returns `out_dir`."""
    folder = out_dir / hook_folder(names.hook_name)
    tensors = {
        "encoder.weight": params["W_enc"].T,
        "encoder.bias": params["b_enc"],
        "W_dec": params["W_dec"],
        "b_dec": params["b_dec"],
    }
    write_safetensors(folder / WEIGHTS, tensors, dtype)
    cfg_json = {
        "activation": "topk",
        "expansion_factor": cfg.d_sae // cfg.d_in if cfg.d_sae % cfg.d_in == 0 else 32,
        # A training flag in sparsify; false because the folded decoder rows have norm 1/input_scale.
        "normalize_decoder": False,
        "num_latents": cfg.d_sae,  # explicit: expansion_factor alone cannot express every width
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.d_in,
    }
    write_json(folder / CFG, cfg_json)
    return out_dir


def _is_hook_folder(path: Path) -> bool:
    if (path / WEIGHTS).is_file():
        return True
    try:
        cfg = read_json(path / CFG)
    except ExportError:
        return False
    return "num_latents" in cfg or "expansion_factor" in cfg


def find(path: Path) -> Path | None:
    """The hook-point folder: `path` itself, or its only hook-point subfolder."""
    return this_or_only_subfolder(path, _is_hook_folder, "sparsify hook points")


def read(path: Path) -> tuple[SAEConfig, Params]:
    """The SAEConfig and float32 params (jaxsae layout) of a sparsify hook-point folder."""
    cfg_path, w_path = path / CFG, path / WEIGHTS
    cfg = read_json(cfg_path)
    d_in, k = field(cfg, "d_in", cfg_path), field(cfg, "k", cfg_path)
    # As SparseCoder: num_latents 0 (or absent) means d_in · expansion_factor (default 32).
    if cfg.get("num_latents"):
        d_sae = field(cfg, "num_latents", cfg_path)
    else:
        d_sae = d_in * (field(cfg, "expansion_factor", cfg_path) if "expansion_factor" in cfg else 32)
    _check_flags(cfg, cfg_path)
    shapes = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    t = take(read_safetensors(w_path), shapes, w_path)
    params = jaxsae_params("topk", t["encoder.weight"].T, t["encoder.bias"], t["W_dec"], t["b_dec"])
    return sae_config("topk", d_in, d_sae, k, cfg_path), params


def _check_flags(cfg: dict, path: Path) -> None:
    """Refuses what jaxsae's SAE cannot compute: group-max, skip connections, transcoders."""
    if cfg.get("activation", "topk") != "topk":
        raise ExportError(f"{path}: key 'activation' is {cfg['activation']!r}; jaxsae can import 'topk' only")
    for key in ("skip_connection", "transcode"):
        if cfg.get(key, False):
            raise ExportError(f"{path}: key '{key}' is true; jaxsae SAEs have no {key.replace('_', ' ')}")
