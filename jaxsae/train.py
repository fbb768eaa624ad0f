"""The training loop: grain batches -> jitted sharded step -> progress bar, JSONL metrics, checkpoints.

Run folder: `config.yaml`, `metrics.jsonl` (one record per SAE per log step), `checkpoints/<step>/`
(train state, loader state, config and metadata), `.lock` (one trainer per run folder, see jaxsae.lock).

Faults: a non-finite loss or gradient never reaches the saved state (the step keeps that SAE's state);
the run stops with TrainingError naming the step, the batch and the last good checkpoint, or, with
`train.skip_nonfinite`, goes on and counts the skipped batches (`skipped_batches` in the metrics). A resumed
run drops the metrics records written after its checkpoint, so each step is logged once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxsae import checkpoint, lock
from jaxsae.config import ConfigError, RunConfig, save_config
from jaxsae.data import Source, load_source, sample_rows
from jaxsae.loader import batch_dataset, batch_iterator
from jaxsae.sae import estimate_input_scale
from jaxsae.sharding import BATCH, make_mesh, named
from jaxsae.step import TrainState, init_states, make_train_step
from jaxsae.synthetic import atoms_recovered

# Firing-rate histogram bins (log10 of the fraction of tokens a latent fires on); "never" counted apart.
RATE_BINS = np.arange(-8.0, 0.5, 1.0)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a failed write); one line naming the step or file and
    the last good checkpoint."""


@dataclass
class TrainResult:
    state: TrainState  # leaves with a leading [S] sae axis
    metrics: list[dict]  # the last logged record of each SAE
    atoms_recovered: list[float] | None  # per SAE, when the source is a planted dictionary


def train(cfg: RunConfig, source: Source | None = None, *, resume: bool = False) -> TrainResult:
    """Trains every SAE of `cfg` (each layer of the source × each seed, on the `sae` axis)."""
    source = source or load_source(cfg.data, cfg.sae.d_in)
    cfg = _with_layers(cfg, source)
    out = Path(cfg.train.out_dir)
    try:
        # process 0 holds the run folder's lock; the other processes of a multi-process run share it
        with lock.acquire(out, "trainer") if jax.process_index() == 0 else contextlib.nullcontext():
            return _train(cfg, source, out, resume)
    except OSError as e:  # a full disk, a lost mount or no permission, writing config or metrics
        steps = checkpoint.complete_steps(out / "checkpoints")
        last = f"step {steps[-1]}" if steps else "none"
        raise TrainingError(
            f"{e.filename or out}: {e.strerror or e} (training stopped); last complete checkpoint: {last}"
        ) from None


def _train(cfg: RunConfig, source: Source, out: Path, resume: bool) -> TrainResult:
    save_config(cfg, out / "config.yaml")
    mesh = make_mesh(cfg.mesh)
    check_divisible(cfg, mesh, len(source.layers))
    samples = [
        sample_rows(rows, cfg.train.scale_sample_rows, cfg.data.seed, _where(source, name))
        for rows, name in zip(source.layers, source.layer_names, strict=True)
    ]
    scales = [estimate_input_scale(s) for s in samples]
    state = init_states(cfg, np.stack(samples), scales, mesh)
    batches = batch_iterator(_dataset(cfg, source))
    mgr = checkpoint.manager(out / "checkpoints")
    skipped = [0] * int(state.step.shape[0])
    try:
        if resume:
            state, skipped = _resume(cfg, mgr, state, batches, skipped, out / "metrics.jsonl")
        state, last = _loop(cfg, mesh, source, state, batches, mgr, out / "metrics.jsonl", skipped)
        if int(np.asarray(state.step)[0]) != mgr.latest_step():
            _save(mgr, state, cfg, batches, skipped)
    except BaseException:
        with contextlib.suppress(Exception):  # let the saves in flight land, without hiding the error
            mgr.wait_until_finished()
        with contextlib.suppress(Exception):  # and stop orbax's threads before the process exits
            mgr.close()
        raise
    checkpoint.finish(mgr)
    mgr.close()
    found = None
    if source.atoms is not None:
        found = [atoms_recovered(source.atoms, np.asarray(w)) for w in state.params["W_dec"]]
    return TrainResult(state, last, found)


def _resume(cfg: RunConfig, mgr, state: TrainState, batches, skipped: list[int], metrics_path: Path):
    """The state and skipped-batch counts of the latest checkpoint (after checking it fits this run),
    with the loader put back where it was; metrics records past it are dropped."""
    step = mgr.latest_step()
    if step is not None:
        meta = checkpoint.check_resumable(mgr, step, cfg, state)
        state = checkpoint.restore(mgr, state, batches, step)
        skipped = list(meta.get("skipped_batches", skipped))
    if jax.process_index() == 0:
        trim_metrics(metrics_path, step or 0)
    return state, skipped


def trim_metrics(path: Path, step: int) -> None:
    """Keeps the records of `path` up to `step`: those past it (logged after the checkpoint a resumed run
    restarts from) and a line torn by a kill would otherwise appear twice or break the file."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def _where(source: Source, layer_name: str) -> str:
    return source.description if len(source.layers) == 1 else f"{source.description}: {layer_name}"


def _with_layers(cfg: RunConfig, source: Source) -> RunConfig:
    """The config with the source's layers written in (store sources: the ones found)."""
    numbers = tuple(int(n.split("_")[-1]) for n in source.layer_names if n.startswith("layer_"))
    if len(numbers) != len(source.layer_names):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, layers=numbers))


def _dataset(cfg: RunConfig, source: Source):
    return batch_dataset(
        source,
        cfg.train.batch_size,
        cfg.data.seed,
        cfg.data.mix_blocks,
        jax.process_index(),
        jax.process_count(),
    )


def check_divisible(cfg: RunConfig, mesh, n_layers: int) -> None:
    """The mesh must split the SAEs, the batch and the latents evenly."""
    for what, n, axis in (
        ("SAEs (layers × train.seeds)", n_layers * cfg.train.n_seeds, "sae"),
        ("train.batch_size", cfg.train.batch_size, "data"),
        ("sae.d_sae", cfg.sae.d_sae, "model"),
    ):
        if n % mesh.shape[axis]:
            raise ConfigError(f"{what} = {n} is not divisible by the mesh's {axis} axis ({mesh.shape[axis]})")
    if cfg.train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size must be divisible by the {jax.process_count()} processes")


def _save(mgr, state: TrainState, cfg: RunConfig, batches, skipped: list[int]) -> None:
    step = int(np.asarray(state.step)[0])
    extra = {"tokens_seen": step * cfg.train.batch_size, "skipped_batches": [int(n) for n in skipped]}
    checkpoint.save(mgr, state, cfg, batches, extra)


def _global_batch(mesh, local: np.ndarray, batch_size: int) -> jax.Array:
    """This process's rows [L, b, d] -> the global batch [L, B, d] sharded over `data`."""
    shape = (local.shape[0], batch_size, local.shape[2])
    return jax.make_array_from_process_local_data(named(mesh, BATCH), local, shape)


class _NonFiniteWatch:
    """Reads each step's `nonfinite` flags [S] once the step is done (the loop keeps one step in flight,
    so this waits for nothing) and stops the run, or counts the skipped batch per SAE in `skipped`."""

    def __init__(self, cfg: RunConfig, grid, names: list[str], mgr, skipped: list[int], start: int):
        self.cfg, self.grid, self.names, self.mgr = cfg, grid, names, mgr
        self.skipped, self.checked = skipped, start

    def check(self, metrics: dict | None, step: int) -> None:
        """`metrics` of update number `step` (1-based; it read loader batch step - 1)."""
        if metrics is None or step <= self.checked:
            return
        self.checked = step
        bad = np.asarray(jax.device_get(metrics["nonfinite"])).reshape(-1)
        if not bad.any():
            return
        if not self.cfg.train.skip_nonfinite:
            raise TrainingError(self._message(np.flatnonzero(bad), step))
        for i in np.flatnonzero(bad):
            self.skipped[i] += 1

    def _message(self, bad: np.ndarray, step: int) -> str:
        which = ", ".join(f"SAE {i} ({self.names[i]}, seed {self.grid[i][1]})" for i in bad)
        last = self.mgr.latest_step()
        good = f"step {last} ({Path(self.mgr.directory) / str(last)})" if last is not None else "none yet"
        return (
            f"non-finite loss at step {step} in {which}, on loader batch {step - 1} "
            f"(data.seed {self.cfg.data.seed}); the update was not applied; last good checkpoint: {good}; "
            "resume with --resume, or set --train.skip_nonfinite=true to skip such batches"
        )


def _loop(cfg: RunConfig, mesh, source: Source, state: TrainState, batches, mgr, metrics_path, skipped):
    tc = cfg.train
    grid = cfg.sae_grid(len(source.layers))
    step_fn = make_train_step(cfg, mesh, state)
    ks = jnp.asarray([k for _, _, k in grid], jnp.int32)
    names = [source.layer_names[layer] for layer, _, _ in grid]
    start = int(np.asarray(state.step)[0])
    watch = _NonFiniteWatch(cfg, grid, names, mgr, skipped, start)
    last: list[dict] = []
    bar = tqdm(total=tc.steps, initial=start, unit="step", disable=not tc.progress, dynamic_ncols=True)
    t0, window_start, fire_since = time.perf_counter(), start, start
    with bar, open(metrics_path, "a") as log:
        metrics = None
        for step in range(start, tc.steps):
            previous = metrics
            state, metrics = step_fn(state, _global_batch(mesh, next(batches), tc.batch_size), ks)
            jax.block_until_ready(previous)  # at most one step in flight: an honest bar, bounded memory
            watch.check(previous, step)
            bar.update(1)
            done = step + 1
            if step == start:  # time from here: the first step includes compilation
                jax.block_until_ready(state)
                t0, window_start = time.perf_counter(), done
            if done % tc.log_every and done != tc.steps:
                continue
            jax.block_until_ready(state)
            watch.check(metrics, done)
            elapsed = time.perf_counter() - t0
            tokens_per_s = (done - window_start) * tc.batch_size / elapsed if done > window_start else 0.0
            last = _records(
                cfg, grid, names, state, metrics, done, tokens_per_s, (done - fire_since) * tc.batch_size
            )
            for rec, n in zip(last, skipped, strict=True):
                rec["skipped_batches"] = n
            log.writelines(json.dumps(_json_safe(rec)) + "\n" for rec in last)
            log.flush()
            bar.set_postfix_str(_postfix(last, tokens_per_s))
            zeros = jnp.zeros(state.fire_count.shape, state.fire_count.dtype)
            state = state._replace(fire_count=jax.device_put(zeros, state.fire_count.sharding))
            if tc.checkpoint_every and done % tc.checkpoint_every == 0:
                _save(mgr, state, cfg, batches, skipped)
            t0, window_start, fire_since = time.perf_counter(), done, done
    return state, last


def _records(
    cfg, grid, names, state, metrics, step: int, tokens_per_s: float, fire_tokens: int
) -> list[dict]:
    """One JSON-ready record per SAE: its metrics, identity and firing-rate histogram."""
    metrics = jax.device_get(metrics)
    fire_count = np.asarray(jax.device_get(state.fire_count))
    records = []
    for i, ((_, seed, k), name) in enumerate(zip(grid, names, strict=True)):
        rec = {"step": step, "sae": i, "layer": name, "seed": seed, "k": k, "tokens_per_s": tokens_per_s}
        rec.update({key: float(v[i]) for key, v in metrics.items() if key != "nonfinite"})
        rec["firing_rate_hist"] = firing_rate_histogram(fire_count[i], fire_tokens)
        records.append(rec)
    return records


def firing_rate_histogram(fire_count: np.ndarray, tokens: int) -> dict:
    """Counts of latents by log10 firing rate: {"never": n, "bins": RATE_BINS edges, "counts": [...]}."""
    rates = fire_count / max(tokens, 1)
    fired = rates > 0
    counts, _ = np.histogram(np.log10(rates[fired]), bins=np.append(RATE_BINS, 0.5))
    return {"never": int((~fired).sum()), "bins": RATE_BINS.tolist(), "counts": counts.tolist()}


def _json_safe(rec: dict) -> dict:
    """Non-finite floats (the metrics of a skipped batch) as null: metrics.jsonl stays strict JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in rec.items()}


def _postfix(records: list[dict], tokens_per_s: float) -> str:
    mean = lambda key: np.mean([r[key] for r in records])
    return (
        f"loss={mean('loss'):.4g} fve={mean('fve'):.3f} L0={mean('l0'):.1f} "
        f"dead={100 * mean('dead_fraction'):.1f}% tok/s={tokens_per_s:,.0f}"
    )
