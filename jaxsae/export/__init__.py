"""Export jaxsae SAEs to the PyTorch SAE libraries' formats, and import theirs.

One module per format holds that format's key names and conventions: `saelens` (SAELens >= 6),
`dictionary_learning`, `sparsify`. Exports fold the input scale into the weights
(`jaxsae.sae.fold_input_scale`), so an exported SAE takes raw activations. batchtopk exports as a threshold
SAE (SAELens: jumprelu with θ broadcast; dictionary_learning: BatchTopKSAE); sparsify holds topk only.

    export_checkpoint("runs/x", "saelens", "out")    -> [out/seed0_k4, out/seed1_k4]
    import_sae("out/seed0_k4")                       -> (SAEConfig, params)
    import_to_checkpoint("out/seed0_k4", "runs/y")   -> runs/y, a run `jaxsae train --resume` continues
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from jaxsae.config import SAEConfig
from jaxsae.export import dictionary_learning, saelens, sparsify
from jaxsae.export._common import DTYPES, ExportError, Names, Params
from jaxsae.sae import fold_input_scale

__all__ = [
    "FORMATS",
    "ExportError",
    "detect_format",
    "export_checkpoint",
    "export_sae",
    "import_sae",
    "import_to_checkpoint",
]

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (saelens, dictionary_learning, sparsify)}
_ALIASES = {"sae_lens": "saelens", "sae-lens": "saelens", "dictionary_learning": "dictionary-learning"}


def format_module(fmt: str) -> ModuleType:
    """The module of format `fmt` (a FORMATS key or an alias such as 'dictionary_learning')."""
    name = _ALIASES.get(fmt, fmt)
    if name not in FORMATS:
        raise ExportError(f"unknown format '{fmt}' (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def export_sae(
    sae_cfg: SAEConfig,
    params: dict[str, Any],
    input_scale: float,
    fmt: str,
    out_dir: str | Path,
    *,
    hook_name: str,
    model_name: str,
    dtype: str = "float32",
    layer: int | None = None,
    batchtopk_as_topk: bool = False,
) -> Path:
    """Writes one SAE (params without the sae axis, float32, jaxsae layout) in format `fmt` under
    `out_dir`, with `input_scale` folded in; returns the folder `import_sae` reads back.

    `dtype` "float32" or "bfloat16" is the dtype of the written weights. ExportError when the format
    cannot represent `sae_cfg.architecture`, or on bad arguments. `batchtopk_as_topk` writes a batchtopk
    SAE to a format that holds only TopK (sparsify) as TopK with the same k: the same weights, but
    per-row top-k at inference instead of the batch threshold (a different encoder; opt-in)."""
    module = format_module(fmt)
    if batchtopk_as_topk and sae_cfg.architecture == "batchtopk" and "batchtopk" not in module.ARCHITECTURES:
        sae_cfg = dataclasses.replace(sae_cfg, architecture="topk")
        params = {key: v for key, v in params.items() if key != "threshold"}
    arch = sae_cfg.architecture
    if arch not in module.ARCHITECTURES:
        raise ExportError(
            f"{module.NAME} cannot represent architecture '{arch}': {module.UNSUPPORTED[arch]} "
            f"(it holds {', '.join(module.ARCHITECTURES)})"
        )
    if dtype not in DTYPES:
        raise ExportError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    params = _checked(sae_cfg, params)
    if arch == "batchtopk" and float(params["threshold"]) < 0:
        warnings.warn(
            "batchtopk threshold not set yet (trained fewer than sae.threshold_start_step steps): "
            "the export encodes like a dense ReLU SAE",
            stacklevel=2,
        )
    folded = fold_input_scale(params, np.float32(input_scale))
    names = Names(hook_name, model_name, layer, float(input_scale))
    return module.write(sae_cfg, folded, Path(out_dir), names, dtype)


def _checked(cfg: SAEConfig, params: dict[str, Any]) -> Params:
    """`params` as float32 numpy, each key present with the shape `cfg` implies."""
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in)}
    shapes["b_dec"] = (cfg.d_in,)
    if cfg.architecture == "jumprelu":
        shapes["log_threshold"] = (cfg.d_sae,)
    if cfg.architecture == "batchtopk":
        shapes["threshold"] = ()
    out = {}
    for key, shape in shapes.items():
        if key not in params:
            raise ExportError(f"params: missing key '{key}' ({cfg.architecture} SAE)")
        out[key] = np.asarray(params[key], np.float32)
        if out[key].shape != shape:
            raise ExportError(f"params: key '{key}' has shape {list(out[key].shape)}, expected {list(shape)}")
    return out


def export_checkpoint(
    ckpt_path: str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
    dtype: str = "float32",
    step: int | None = None,
    batchtopk_as_topk: bool = False,
) -> list[Path]:
    """Exports every SAE on the sae axis of a checkpoint (latest step unless `step`), one folder per SAE:
    `out_dir/seed<S>_k<K>/` (`layer<L>_seed<S>_k<K>/` when the run trained several layers); returns them.

    `batchtopk_as_topk`: see `export_sae`. `hook_name`/`model_name` (applied to every SAE) default to
    what the run's data source records (the activation store manifest's hook and encoder, per layer),
    else the source's name."""
    from jaxsae import checkpoint  # orbax: only when a checkpoint is read

    format_module(fmt)  # fail on a bad format before reading anything
    ckpt = checkpoint.load(ckpt_path, step)
    axis = _sae_axis(ckpt.config, len(ckpt.input_scale), Path(str(ckpt_path)))
    several_layers = len({layer for layer, _, _ in axis}) > 1
    folders: list[Path] = []
    for i, (layer, seed, k) in enumerate(axis):
        name = f"layer{layer}_seed{seed}_k{k}" if several_layers else f"seed{seed}_k{k}"
        if Path(out_dir, name) in folders:  # the same seed and k twice on the sae axis
            name = f"{name}_sae{i}"
        hook, model, layer_number = _run_names(ckpt.config.data.source, ckpt.meta, layer)
        folder = export_sae(
            dataclasses.replace(ckpt.config.sae, k=k),
            {key: value[i] for key, value in ckpt.params.items()},
            float(ckpt.input_scale[i]),
            fmt,
            Path(out_dir, name),
            hook_name=hook_name or hook,
            model_name=model_name or model,
            dtype=dtype,
            layer=layer_number,
            batchtopk_as_topk=batchtopk_as_topk,
        )
        folders.append(folder)
    return folders


def _sae_axis(cfg: Any, n: int, path: Path) -> list[tuple[int | None, int, int]]:
    """(layer, seed, k) of each of the `n` SAEs on the sae axis: layer-major, then the seeds (as
    RunConfig.sae_grid orders them); layer is the number in data.layers, its position when the config
    names none, and None for a single unnamed layer."""
    per_layer = list(zip(cfg.train.seeds, cfg.sae_ks(), strict=True))
    if n % len(per_layer):
        raise ExportError(f"{path}: {n} SAEs on the sae axis do not fit {len(per_layer)} seeds per layer")
    n_layers = n // len(per_layer)
    numbers = tuple(getattr(cfg.data, "layers", ()))
    layers = numbers if len(numbers) == n_layers else tuple(range(n_layers))
    if n_layers == 1 and not numbers:
        layers = (None,)
    return [(layer, seed, k) for layer in layers for seed, k in per_layer]


def _run_names(source: str, meta: dict, layer: int | None) -> tuple[str, str, int | None]:
    """(hook name, model name, layer number) of one layer of a run: from the checkpoint metadata, else from
    the activation-store manifest of that layer, else the source's name ('planted' for synthetic rows)."""
    path = Path(source)
    manifest: dict = {}
    candidates = [path / f"layer_{layer}" / "manifest.json"] if layer is not None else []
    for file in [*candidates, path / "manifest.json"]:
        if source != "planted" and file.is_file():
            try:
                manifest = json.loads(file.read_text())
            except (OSError, ValueError):
                continue  # names are metadata only: a bad manifest falls back to the source's name
            break
    fallback = "planted" if source == "planted" else path.stem
    if layer is not None and not manifest:
        fallback = f"{fallback}.layer_{layer}"
    hook = meta.get("hook_name") or manifest.get("hook") or fallback
    model = meta.get("model_name") or manifest.get("encoder") or fallback
    number = manifest.get("layer", layer)
    return str(hook), str(model), number if isinstance(number, int) else None


def detect_format(path: str | Path) -> tuple[str, Path]:
    """(format name, the folder to read) of an export at `path` (a folder, or a file in one such as
    trainer_0/ae.pt), or ExportError saying why not."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ExportError(f"{path}: not a folder" if path.exists() else f"{path}: not found")
    hits = [(name, folder) for name, m in FORMATS.items() if (folder := m.find(path)) is not None]
    if len(hits) > 1:
        raise ExportError(
            f"{path}: holds files of several formats ({', '.join(n for n, _ in hits)}); pass one"
        )
    if hits:
        return hits[0]
    exports = sorted(p.name for p in path.iterdir() if p.is_dir() and _holds_export(p))
    if exports:  # e.g. the folder export_checkpoint wrote, one sub-folder per SAE
        raise ExportError(f"{path}: holds one SAE export per sub-folder ({', '.join(exports)}); pass one")
    hint = " (it is a jaxsae run folder: use it directly)" if (path / "checkpoints").is_dir() else ""
    expected = "; ".join(f"{name}: {m.LAYOUT}" for name, m in FORMATS.items())
    raise ExportError(f"{path}: no SAE export found{hint} (expected {expected})")


def _holds_export(path: Path) -> bool:
    try:
        return any(m.find(path) is not None for m in FORMATS.values())
    except ExportError:  # several hook points or trainers: still exports
        return True


def import_sae(path: str | Path) -> tuple[SAEConfig, Params]:
    """The SAEConfig and params (float32 numpy, jaxsae layout, taking raw activations) of an SAE saved in
    any of FORMATS at `path`; the format is detected from the files."""
    name, folder = detect_format(path)
    return FORMATS[name].read(folder)


def import_to_checkpoint(path: str | Path, out_run_dir: str | Path) -> Path:
    """Imports the SAE at `path` into a new jaxsae run folder: config.yaml (the imported SAEConfig, default
    data and train sections) and a step-0 checkpoint with a sae axis of 1, fresh Adam state and the input
    scale recovered from the decoder norms (`_unfold_input_scale`; else 1), which `jaxsae.checkpoint.load`
    reads and `jaxsae.train.train(cfg, resume=True)` continues."""
    from jaxsae import checkpoint
    from jaxsae.config import RunConfig, TrainConfig, save_config

    name, folder = detect_format(path)
    sae_cfg, params = FORMATS[name].read(folder)
    out = Path(out_run_dir)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ExportError(f"{out / 'checkpoints'}: already holds checkpoints; import into a new run folder")
    cfg = RunConfig(sae=sae_cfg, train=TrainConfig(out_dir=str(out)))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    mgr = checkpoint.manager(out / "checkpoints")
    try:
        extra = {"tokens_seen": 0, "imported_from": str(Path(folder).resolve()), "imported_format": name}
        _save(checkpoint, mgr, _fresh_state(cfg, params), cfg, extra)
    finally:
        mgr.wait_until_finished()
        mgr.close()
    return out


def _fresh_state(cfg: Any, params: Params) -> Any:
    """A TrainState holding `params` with a leading sae axis of 1, as the trainer's init builds one
    (a `layer` field, where TrainState has one, is layer position 0)."""
    import jax
    import jax.numpy as jnp

    from jaxsae.step import TrainState, make_optimizer, trainable

    params, scale = _unfold_input_scale(params)
    p = {key: jnp.asarray(value, jnp.float32) for key, value in params.items()}
    fields = {
        "params": p,
        "opt_state": make_optimizer(cfg.train).init(trainable(p)),
        "tokens_since_fired": jnp.zeros(cfg.sae.d_sae, jnp.int32),
        "fire_count": jnp.zeros(cfg.sae.d_sae, jnp.int32),
        "step": jnp.zeros((), jnp.int32),
        "input_scale": jnp.asarray(scale, jnp.float32),
        "layer": jnp.zeros((), jnp.int32),
    }
    one = TrainState(**{name: fields[name] for name in TrainState._fields})
    return jax.tree.map(lambda a: a[None], one)


def _unfold_input_scale(params: Params) -> tuple[Params, float]:
    """Undoes an export's folded input scale s when every decoder row has the same norm 1/s (as ours do):
    the same function on raw inputs, unit-norm decoder rows, so further training does not jump."""
    from jaxsae.sae import fold_input_scale

    norms = np.linalg.norm(np.asarray(params["W_dec"], np.float64), axis=1)
    c = float(norms.mean())
    if c <= 0 or np.abs(norms / c - 1).max() > 1e-3:
        return params, 1.0
    return {k: np.asarray(v) for k, v in fold_input_scale(params, c).items()}, 1.0 / c


def _save(checkpoint: ModuleType, mgr: Any, state: Any, cfg: Any, extra: dict) -> None:
    """checkpoint.save with a fresh loader iterator, whose state is saved beside the train state.

    A fresh iterator's state is its start (the grain loader's state is one index), independent of the
    rows, so it is taken from a one-block placeholder source: a resumed run starts its data stream from
    the beginning, whatever data.source it is given."""
    from jaxsae.data import Source
    from jaxsae.loader import batch_dataset, batch_iterator
    from jaxsae.store import CHUNK_ROWS

    placeholder = Source([np.zeros((CHUNK_ROWS, cfg.sae.d_in), np.float32)], ["imported"], "placeholder")
    ds = batch_dataset(placeholder, cfg.train.batch_size, cfg.data.seed, cfg.data.mix_blocks)
    checkpoint.save(mgr, state, cfg, batch_iterator(ds), extra)
