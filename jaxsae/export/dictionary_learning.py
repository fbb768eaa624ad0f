"""dictionary_learning: `trainer_0/ae.pt` (a torch state dict) + `trainer_0/config.json` ({"trainer": {...}}),
as its `trainSAE` saves them; read by `<dict_class>.from_pretrained(".../trainer_0/ae.pt")`, the class that
config["trainer"]["dict_class"] names. AudioSAE published its SAEs in this format.

Conventions checked against dictionary-learning 0.1.0 (dictionary.py, trainers/top_k.py, batch_top_k.py,
jumprelu.py, standard.py, training.py):
- AutoEncoderTopK (topk) and BatchTopKSAE (batchtopk): encoder.weight [F, d], encoder.bias [F],
  decoder.weight [d, F], b_dec [d], buffers k (int32 []) and threshold (float32 []). Both encode
  f = ReLU((x − b_dec) encoder.weightᵀ + encoder.bias); AutoEncoderTopK keeps the top k of each row,
  BatchTopKSAE (by default, at inference) keeps f > threshold, exactly jaxsae's batchtopk.
- JumpReluAutoEncoder (jumprelu): W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d], threshold [F];
  encode ReLU(pre·H(pre − θ)), pre = x W_enc + b_enc: `apply_b_dec_to_input` is a plain attribute, False
  after from_pretrained, so b_dec·W_enc is folded into b_enc both ways.
- AutoEncoder (relu): bias [d] (the b_dec), encoder.weight [F, d], encoder.bias [F], decoder.weight [d, F];
  encode ReLU((x − bias) encoder.weightᵀ + encoder.bias). Its from_pretrained renormalises decoder columns
  to unit norm by default (norms moved into the encoder: same reconstructions, codes times the norms), so
  an exported relu SAE with input_scale s != 1 loads with codes ÷ s; the importer renormalises the same way.
Only `ae.pt` needs torch, imported inside the two functions that touch it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxsae.config import SAEConfig
from jaxsae.export._common import (
    DTYPES,
    ExportError,
    Names,
    Params,
    b_dec_folded_into_b_enc,
    cast,
    field,
    jaxsae_params,
    one_line,
    read_json,
    sae_config,
    take,
    this_or_only_subfolder,
    thresholds,
    write_json,
)

NAME = "dictionary-learning"
TRAINER = "trainer_0"
WEIGHTS = "ae.pt"
CFG = "config.json"
LAYOUT = f"{TRAINER}/{WEIGHTS} + {TRAINER}/{CFG}"
ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
UNSUPPORTED: dict[str, str] = {}
# architecture -> (dict_class, trainer_class), as the library's trainers name them in config.json.
_CLASSES = {
    "topk": ("AutoEncoderTopK", "TopKTrainer"),
    "batchtopk": ("BatchTopKSAE", "BatchTopKTrainer"),
    "jumprelu": ("JumpReluAutoEncoder", "JumpReluTrainer"),
    "relu": ("AutoEncoder", "StandardTrainer"),
}


def write(cfg: SAEConfig, params: Params, out_dir: Path, names: Names, dtype: str) -> Path:
    """Writes folded float32 `params` into `out_dir/trainer_0/`; returns `out_dir`."""
    folder = out_dir / TRAINER
    _save_torch(folder / WEIGHTS, _state_dict(cfg, params, dtype))
    provenance = {"architecture": cfg.architecture, "k": cfg.k, "input_scale_folded": names.input_scale}
    write_json(folder / CFG, {"trainer": _trainer_config(cfg, names), "jaxsae": provenance})
    return out_dir


def _state_dict(cfg: SAEConfig, p: Params, dtype: str) -> dict[str, np.ndarray]:
    """The state dict of the matching dictionary class, as numpy arrays (weights in `dtype`)."""
    arch = cfg.architecture
    if arch in ("topk", "batchtopk"):
        threshold = p["threshold"] if arch == "batchtopk" else -1.0  # -1: the classes' "not set"
        return {
            "b_dec": cast(p["b_dec"], dtype),
            "k": np.asarray(cfg.k, np.int32),
            "threshold": np.asarray(threshold, np.float32),  # a float32 buffer in both classes
            "decoder.weight": cast(p["W_dec"].T, dtype),
            "encoder.weight": cast(p["W_enc"].T, dtype),
            "encoder.bias": cast(p["b_enc"], dtype),
        }
    if arch == "jumprelu":
        b_enc = b_dec_folded_into_b_enc(p["W_enc"], p["b_enc"], p["b_dec"], -1)
        tensors = {"W_enc": p["W_enc"], "b_enc": b_enc, "W_dec": p["W_dec"], "b_dec": p["b_dec"]}
        tensors["threshold"] = thresholds(cfg, p)
        return {k: cast(v, dtype) for k, v in tensors.items()}
    tensors = {"bias": p["b_dec"], "encoder.weight": p["W_enc"].T, "encoder.bias": p["b_enc"]}
    tensors["decoder.weight"] = p["W_dec"].T
    return {k: cast(v, dtype) for k, v in tensors.items()}


def _trainer_config(cfg: SAEConfig, names: Names) -> dict:
    dict_class, trainer_class = _CLASSES[cfg.architecture]
    out = {
        "trainer_class": trainer_class,
        "dict_class": dict_class,
        "activation_dim": cfg.d_in,
        "dict_size": cfg.d_sae,
    }
    if cfg.architecture in ("topk", "batchtopk"):
        out["k"] = cfg.k
    if cfg.architecture == "batchtopk":
        out.update(threshold_beta=cfg.threshold_beta, threshold_start_step=cfg.threshold_start_step)
    out.update(device="cpu", layer=names.layer, lm_name=names.model_name, submodule_name=names.hook_name)
    return out


def _save_torch(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import torch  # only here: jaxsae never imports torch at module level

    def tensor(a: np.ndarray) -> torch.Tensor:
        a = np.asarray(a).copy(order="C")  # keeps 0-d buffers (k, threshold) 0-d
        if a.dtype == DTYPES["bfloat16"]:  # torch.from_numpy rejects ml_dtypes' bfloat16: go through bits
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: tensor(v) for k, v in arrays.items()}, path)


def _is_trainer_folder(path: Path) -> bool:
    if (path / WEIGHTS).is_file():
        return True
    try:
        return "trainer" in read_json(path / CFG)
    except ExportError:
        return False


def find(path: Path) -> Path | None:
    """The trainer folder: `path` itself, or its only `trainer_*` subfolder."""

    def matches(p: Path) -> bool:
        return (p == path or p.name.startswith("trainer_")) and _is_trainer_folder(p)

    return this_or_only_subfolder(path, matches, "dictionary_learning trainers")


def read(path: Path) -> tuple[SAEConfig, Params]:
    """The SAEConfig and float32 params (jaxsae layout) of a dictionary_learning trainer folder."""
    cfg_path, w_path = path / CFG, path / WEIGHTS
    trainer = read_json(cfg_path).get("trainer")
    if not isinstance(trainer, dict):
        raise ExportError(f"{cfg_path}: missing key 'trainer' (a JSON object)")
    dict_class = field(trainer, "dict_class", cfg_path, str)
    readers = {
        "AutoEncoderTopK": _read_topk,
        "BatchTopKSAE": _read_topk,
        "JumpReluAutoEncoder": _read_jumprelu,
    }
    readers["AutoEncoder"] = _read_relu
    if dict_class not in readers:
        raise ExportError(
            f"{cfg_path}: key 'dict_class' is '{dict_class}'; jaxsae can import {', '.join(readers)}"
        )
    return readers[dict_class](_load_torch(w_path), trainer, w_path, cfg_path)


def _dims(trainer: dict, state: dict, key: str, transposed: bool, path: Path) -> tuple[int, int]:
    """(d_in, d_sae) from config.json, else (like from_pretrained) from the shape of weight `key`."""
    if "activation_dim" in trainer and "dict_size" in trainer:
        return field(trainer, "activation_dim", path), field(trainer, "dict_size", path)
    if key not in state or np.ndim(state[key]) != 2:
        raise ExportError(f"{path}: missing key '{key}' (a 2-d weight)")
    rows, cols = np.shape(state[key])
    return (cols, rows) if transposed else (rows, cols)


def _read_topk(state: dict, trainer: dict, w_path: Path, cfg_path: Path) -> tuple[SAEConfig, Params]:
    d_in, d_sae = _dims(trainer, state, "encoder.weight", True, cfg_path)
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "decoder.weight": (d_in, d_sae)}
    t = take(state, {**shapes, "b_dec": (d_in,), "k": (), "threshold": ()}, w_path)
    k = int(t["k"])
    if "k" in trainer and field(trainer, "k", cfg_path) != k:  # from_pretrained(k=config k) raises too
        raise ExportError(f"{w_path}: key 'k' is {k}, but {cfg_path} says k = {trainer['k']}")
    arch = "batchtopk" if trainer["dict_class"] == "BatchTopKSAE" else "topk"
    params = jaxsae_params(
        arch, t["encoder.weight"].T, t["encoder.bias"], t["decoder.weight"].T, t["b_dec"], t["threshold"]
    )
    return sae_config(arch, d_in, d_sae, k, cfg_path), params


def _read_jumprelu(state: dict, trainer: dict, w_path: Path, cfg_path: Path) -> tuple[SAEConfig, Params]:
    d_in, d_sae = _dims(trainer, state, "W_enc", False, cfg_path)
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    t = take(state, {**shapes, "threshold": (d_sae,)}, w_path)
    b_enc = b_dec_folded_into_b_enc(t["W_enc"], t["b_enc"], t["b_dec"], +1)
    params = jaxsae_params("jumprelu", t["W_enc"], b_enc, t["W_dec"], t["b_dec"], t["threshold"])
    return sae_config("jumprelu", d_in, d_sae, None, cfg_path), params


def _read_relu(state: dict, trainer: dict, w_path: Path, cfg_path: Path) -> tuple[SAEConfig, Params]:
    d_in, d_sae = _dims(trainer, state, "encoder.weight", True, cfg_path)
    shapes = {"bias": (d_in,), "encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,)}
    t = take(state, {**shapes, "decoder.weight": (d_in, d_sae)}, w_path)
    w_enc, b_enc, w_dec = t["encoder.weight"].T, t["encoder.bias"], t["decoder.weight"].T
    # As AutoEncoder.from_pretrained(normalize_decoder=True): unit decoder columns unless already allclose.
    norms = np.linalg.norm(w_dec.astype(np.float64), axis=1)
    if not np.allclose(norms, 1.0, rtol=1e-5, atol=1e-8):
        w_enc, b_enc, w_dec = w_enc * norms[None, :], b_enc * norms, w_dec / norms[:, None]
    params = jaxsae_params("relu", w_enc, b_enc, w_dec, t["bias"])
    return sae_config("relu", d_in, d_sae, None, cfg_path), params


def _load_torch(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a torch state-dict file as numpy (floats as float32), or ExportError."""
    if not path.is_file():
        raise ExportError(f"{path}: file not found")
    try:
        import torch  # only here: jaxsae never imports torch at module level
    except ImportError:
        raise ExportError(f"{path}: reading dictionary_learning's ae.pt needs torch") from None
    try:  # weights_only: a state dict of tensors needs no pickled code, and runs none
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # torch raises RuntimeError, UnpicklingError, EOFError...: one line naming the file
        raise ExportError(f"{path}: corrupt or truncated torch file ({one_line(e)})") from None
    if not isinstance(state, dict):
        raise ExportError(f"{path}: expected a state dict, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"{path}: key '{key}' is not a tensor")
        value = value.detach().cpu()
        out[key] = (value.float() if value.is_floating_point() else value).numpy()
    return out
