"""Checkpoints with orbax: the train state (all SAEs on the `sae` axis) plus the run's config and metadata.

Layout: `<run>/checkpoints/<step>/{state,meta,data}`; `data` is the loader's iterator state; `meta` is
JSON: {"config": RunConfig as dict,
"step": int, "tokens_seen": int, ...}. orbax writes each step to a temporary folder and renames it when
complete, so a half-written checkpoint is never listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsae.config import RunConfig, from_dict, to_dict
from jaxsae.step import TrainState


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint; the message names the path."""


@dataclass
class Checkpoint:
    config: RunConfig
    params: dict[str, np.ndarray]  # leaves with a leading [S] sae axis
    input_scale: np.ndarray  # [S]
    step: int
    meta: dict


def manager(directory: str | Path, max_to_keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(
    mgr: ocp.CheckpointManager, state: TrainState, cfg: RunConfig, batches, extra: dict | None = None
) -> None:
    """Saves `state` and the loader iterator `batches` at the state's step, asynchronously (call
    `mgr.wait_until_finished()` before exiting)."""
    step = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])
    meta = {"config": to_dict(cfg), "step": step, **(extra or {})}
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()),
            meta=ocp.args.JsonSave(meta),
            data=grain.checkpoint.CheckpointSave(batches),
        ),
    )


def restore(
    mgr: ocp.CheckpointManager, target: TrainState, batches=None, step: int | None = None
) -> TrainState:
    """The saved state, in the structure and shardings of `target` (so onto any mesh); also puts the
    loader iterator `batches` back where it was."""
    step = mgr.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target._asdict())
    args = {"state": ocp.args.StandardRestore(abstract)}
    if batches is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(batches)
    restored = mgr.restore(step, args=ocp.args.Composite(**args))
    return TrainState(**restored["state"])


def load(path: str | Path, step: int | None = None) -> Checkpoint:
    """Params, input scales and config of a run folder, its `checkpoints/` folder, or one step's folder
    (the latest step unless `step` is given)."""
    directory, step = _locate(Path(path), step)
    mgr = ocp.CheckpointManager(directory.absolute())
    try:
        restored = mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
    except Exception as e:  # orbax raises many types; one line that names the folder is what helps
        raise CheckpointError(
            f"{directory / str(step)}: cannot read checkpoint ({type(e).__name__}: {e})"
        ) from e
    finally:
        mgr.close()
    state, meta = restored["state"], restored["meta"]
    params = {k: np.asarray(v) for k, v in state["params"].items()}
    return Checkpoint(
        config=from_dict(RunConfig, meta["config"]),
        params=params,
        input_scale=np.asarray(state["input_scale"]),
        step=int(meta["step"]),
        meta=meta,
    )


def _locate(path: Path, step: int | None) -> tuple[Path, int]:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and (path / "meta").exists():
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "meta").exists())
    if not steps:
        raise CheckpointError(f"{path}: holds no checkpoint")
    if step is not None and step not in steps:
        raise CheckpointError(f"{path}: no checkpoint at step {step} (have {steps})")
    return path, steps[-1] if step is None else step
