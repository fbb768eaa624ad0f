"""Checkpoints with orbax: the train state (all SAEs on the `sae` axis) plus the run's config and metadata.

Layout: `<run>/checkpoints/<step>/{state,meta,data}`; `data` is the loader's iterator state; `meta` is
JSON: {"format_version": int, "config": RunConfig as dict, "step": int, "tokens_seen": int, ...}.
orbax writes each step to a temporary folder and renames it when complete, so a half-written checkpoint
is never listed (a kill at any moment leaves the previous one loadable). A checkpoint of another format
version or of other shapes is refused with a message saying what differs; a failed write (a full disk)
raises CheckpointError naming the step and the last complete checkpoint.
"""

from __future__ import annotations

import errno
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxsae.config import RunConfig, from_dict, to_dict
from jaxsae.step import TrainState

# 2: meta carries format_version (and skipped_batches); 1: checkpoints written before it was recorded.
CHECKPOINT_VERSION = 2
# Config keys that decide the shapes and structure of the saved state.
SHAPE_KEYS = (
    ("sae", "d_in"),
    ("sae", "d_sae"),
    ("sae", "architecture"),
    ("sae", "dtype"),
    ("data", "layers"),
    ("train", "seeds"),
    ("train", "max_grad_norm"),
)


class CheckpointError(ValueError):
    """A missing, unreadable, unwritable or mismatched checkpoint; the message names the path."""


@dataclass
class Checkpoint:
    config: RunConfig
    params: dict[str, np.ndarray]  # leaves with a leading [S] sae axis
    input_scale: np.ndarray  # [S]
    step: int
    meta: dict


def manager(directory: str | Path, max_to_keep: int = 3) -> ocp.CheckpointManager:
    logging.getLogger("absl").addFilter(_ORBAX_FILTER)  # once: a logger holds a filter at most once
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(
    mgr: ocp.CheckpointManager, state: TrainState, cfg: RunConfig, batches, extra: dict | None = None
) -> None:
    """Saves `state` and the loader iterator `batches` at the state's step, asynchronously (call
    `finish(mgr)` before exiting). CheckpointError if this save, or the previous one still in flight,
    fails."""
    step = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])
    previous = mgr.latest_step()
    meta = {"format_version": CHECKPOINT_VERSION, "config": to_dict(cfg), "step": step, **(extra or {})}
    try:  # also raises the error of the previous async save, if it failed
        mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state._asdict()),
                meta=ocp.args.JsonSave(meta),
                data=grain.checkpoint.CheckpointSave(batches),
            ),
        )
    except Exception as e:
        in_flight = previous is not None and previous not in complete_steps(mgr.directory)
        raise write_error(mgr, previous if in_flight else step, e) from None


def finish(mgr: ocp.CheckpointManager) -> None:
    """Waits for the last async save; CheckpointError (one line) if it failed."""
    try:
        mgr.wait_until_finished()
    except Exception as e:
        raise write_error(mgr, mgr.latest_step(), e) from None


def write_error(mgr: ocp.CheckpointManager, step: int | None, e: BaseException) -> CheckpointError:
    """One line: which checkpoint could not be written (an async save fails while the next one starts:
    the step comes from the failing path when it names one), why (the root cause, e.g. a full disk),
    and the last complete checkpoint, which is intact."""
    directory = Path(mgr.directory)
    cause = root_cause(e)
    failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", cause)
    step = int(failed.group(1)) if failed else step
    steps = complete_steps(directory)
    last = f"step {steps[-1]} ({directory / str(steps[-1])})" if steps else "none"
    which = f"checkpoint {step}" if step is not None else "a checkpoint"
    return CheckpointError(f"{directory}: cannot write {which} ({cause}); last complete checkpoint: {last}")


def root_cause(e: BaseException) -> str:
    """The innermost cause of `e` on one line: "No space left on device: <file>" for a full disk (an
    OSError, or tensorstore's error for orbax's array files), else "Type: message" (<= 300 chars)."""
    seen = {id(e)}
    while (e.__cause__ or e.__context__) is not None and id(e.__cause__ or e.__context__) not in seen:
        e = e.__cause__ or e.__context__
        seen.add(id(e))
    text = " ".join(str(e).split())
    if getattr(e, "errno", None) == errno.ENOSPC or "os_error_code='28'" in text:
        file = getattr(e, "filename", None) or re.search(r'writing local file "([^"]+)"', text)
        file = file if isinstance(file, str | None) else file.group(1)
        return f"No space left on device: {file}" if file else "No space left on device"
    return f"{type(e).__name__}: {text}"[:300]


class _OrbaxTracebacks(logging.Filter):
    """orbax logs the traceback of a failed background save, then raises the error to the caller, who
    reports it in one line (CheckpointError): keep orbax's log line, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "orbax" in record.pathname:
            record.exc_info, record.exc_text = None, None
        return True


_ORBAX_FILTER = _OrbaxTracebacks()


def complete_steps(directory: str | Path) -> list[int]:
    """Steps of the complete checkpoints in `directory`, ascending (temporary folders of an unfinished
    save are not digits and are never listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "meta").exists())


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON meta of checkpoint `step`; CheckpointError naming it if unreadable."""
    try:
        return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise CheckpointError(
            f"{Path(mgr.directory) / str(step)}: cannot read checkpoint ({root_cause(e)})"
        ) from None


def check_resumable(mgr: ocp.CheckpointManager, step: int, cfg: RunConfig, target: TrainState) -> dict:
    """The meta of checkpoint `step` after checking that it can continue the run `cfg` with state like
    `target`: same format version, same shapes. CheckpointError saying what differs otherwise."""
    where = Path(mgr.directory) / str(step)
    meta = read_meta(mgr, step)
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_VERSION:  # 1 and 2 hold the same state
        raise CheckpointError(
            f"{where}: checkpoint format version {version!r}, this code resumes versions 1 to "
            f"{CHECKPOINT_VERSION} (use the jaxsae that wrote it, or start a new run folder)"
        )
    diffs = config_differences(meta.get("config", {}), to_dict(cfg)) or tree_differences(where, target)
    if diffs:
        raise CheckpointError(f"{where}: checkpoint does not fit this run (saved != now): {'; '.join(diffs)}")
    return meta


def config_differences(saved: dict, now: dict) -> list[str]:
    """'section.key saved != now' for each SHAPE_KEYS entry that differs."""
    out = []
    for section, key in SHAPE_KEYS:
        a, b = saved.get(section, {}).get(key), now.get(section, {}).get(key)
        if a != b:
            out.append(f"{section}.{key} {a!r} != {b!r}")
    return out


def tree_differences(where: Path, target: TrainState, limit: int = 4) -> list[str]:
    """Leaves of the saved state missing, extra, or of another shape or dtype than in `target`."""
    if not (where / "state").is_dir():
        raise CheckpointError(f"{where}: cannot read checkpoint (no state folder)")
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that the item folder has no step metadata: it never has
    try:
        saved = ocp.StandardCheckpointer().metadata((where / "state").absolute()).item_metadata
    except Exception as e:
        raise CheckpointError(f"{where}: cannot read checkpoint ({root_cause(e)})") from None
    finally:
        absl.setLevel(level)
    have, want = _leaf_table(saved), _leaf_table(target._asdict())
    out = [f"{k}: missing" for k in want if k not in have]
    out += [f"{k}: not in this run" for k in have if k not in want]
    out += [f"{k}: {have[k]} != {want[k]}" for k in want if k in have and have[k] != want[k]]
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])


def _leaf_table(tree) -> dict[str, str]:
    """Path "a/b/0/c" -> "float32[2, 64]" of each array leaf of `tree` (arrays or orbax metadata)."""

    def name(k) -> str:
        return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    table = {
        "/".join(name(k) for k in path): f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"
        for path, leaf in flat
        if hasattr(leaf, "shape")
    }
    return dict(sorted(table.items(), key=lambda kv: (not kv[0].startswith("params/"), kv[0])))


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
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
        raise CheckpointError(
            f"{Path(mgr.directory) / str(step)}: cannot restore checkpoint ({root_cause(e)})"
        ) from None
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
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{directory / str(step)}: checkpoint format version {version!r}, "
            f"this code reads versions 1 to {CHECKPOINT_VERSION} (use the jaxsae that wrote it)"
        )
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
    steps = complete_steps(path)
    if not steps:
        raise CheckpointError(f"{path}: holds no checkpoint")
    if step is not None and step not in steps:
        raise CheckpointError(f"{path}: no checkpoint at step {step} (have {steps})")
    return path, steps[-1] if step is None else step
