"""The SAEs of a checkpoint, their codes on store rows, and what each row is (clip, frame, labels).

Codes are scipy CSR matrices [N, F] float32: SAE codes are sparse (L0 ≪ F), so per-feature statistics
over tens of thousands of rows stay cheap. Every SAE is folded to raw inputs (`sae.fold_input_scale`),
so it takes store rows as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from jaxsae import sae
from jaxsae.analysis import AnalysisError
from jaxsae.config import SAEConfig
from jaxsae.store import CHUNK_ROWS, ActivationStore

# Manifest keys that are not class labels: identifiers and free text.
NOT_LABELS = ("id", "path", "text", "audio", "file")
MAX_CLASSES = 64  # a string label with more distinct values is an identifier, not a class


@dataclass(frozen=True)
class SAEEntry:
    """One SAE of a checkpoint. `params` are float32 numpy arrays without the sae axis, folded to raw
    inputs; `layer` is the store layer name ("layer_2") or None when the checkpoint does not say
    (an imported SAE, a planted run); `index` is its position on the checkpoint's sae axis."""

    name: str
    layer: str | None
    seed: int
    k: int
    cfg: SAEConfig
    params: dict[str, np.ndarray]
    index: int


def load_saes(
    ckpt_path: str | Path, layers: list[str] | None = None, step: int | None = None
) -> list[SAEEntry]:
    """Every SAE of a checkpoint (a run folder, its checkpoints/ folder or a step folder; also one made
    by `jaxsae import`), in sae-axis order. `layers` names the layers of the sae axis when the run's
    config does not (`data.layers` is written by the trainer for store sources)."""
    from jaxsae.checkpoint import load

    ckpt = load(ckpt_path, step)
    cfg = ckpt.config
    n_sae = int(ckpt.input_scale.shape[0])
    n_seeds = cfg.train.n_seeds
    if n_sae % n_seeds:
        raise AnalysisError(f"{ckpt_path}: {n_sae} SAEs do not split into {n_seeds} seeds per layer")
    names = layers or [f"layer_{n}" for n in cfg.data.layers] or [None] * (n_sae // n_seeds)
    if len(names) * n_seeds != n_sae:
        raise AnalysisError(f"{ckpt_path}: {n_sae} SAEs, but {len(names)} layers × {n_seeds} seeds")
    grid = cfg.sae_grid(len(names))
    entries = []
    for i, (layer, seed, k) in enumerate(grid):
        params = {key: np.asarray(v[i], np.float32) for key, v in ckpt.params.items()}
        folded = sae.fold_input_scale(params, float(ckpt.input_scale[i]))
        layer_name = names[layer]
        entries.append(
            SAEEntry(
                name=_name(layer_name, seed, k, grid, layer),
                layer=layer_name,
                seed=seed,
                k=k,
                cfg=dataclasses.replace(cfg.sae, k=k),
                params={key: np.asarray(v, np.float32) for key, v in folded.items()},
                index=i,
            )
        )
    return entries


def _name(layer: str | None, seed: int, k: int, grid: list, layer_pos: int) -> str:
    """'layer_2_seed_0'; '_k_<k>' is added when one layer holds the same seed with several k."""
    base = f"{layer}_seed_{seed}" if layer else f"seed_{seed}"
    same = sum(1 for ly, s, _ in grid if ly == layer_pos and s == seed)
    return f"{base}_k_{k}" if same > 1 else base


def encode_rows(entry: SAEEntry, acts: np.ndarray, batch: int = 4096) -> sp.csr_matrix:
    """Codes of raw rows `acts` [N, d_in] in inference mode (batchtopk: its threshold), as CSR [N, F]
    float32, computed `batch` rows at a time through jax."""
    if acts.ndim != 2 or acts.shape[1] != entry.cfg.d_in:
        raise AnalysisError(f"{entry.name}: expects rows of width {entry.cfg.d_in}, got {list(acts.shape)}")
    params = {k: jnp.asarray(v) for k, v in entry.params.items()}
    parts = []
    for i in range(0, acts.shape[0], batch):
        x = jnp.asarray(np.asarray(acts[i : i + batch], np.float32))
        parts.append(sp.csr_matrix(np.asarray(_encode(entry.cfg, params, x))))
    if not parts:
        return sp.csr_matrix((0, entry.cfg.d_sae), dtype=np.float32)
    return sp.vstack(parts, format="csr").astype(np.float32)


@partial(jax.jit, static_argnums=0)
def _encode(cfg: SAEConfig, params: dict, x: jax.Array) -> jax.Array:
    return sae.encode(cfg, params, x)


def decode_codes(entry: SAEEntry, codes: sp.csr_matrix) -> np.ndarray:
    """Reconstruction [N, d_in] float32 (raw units) from codes [N, F]: codes W_dec + b_dec."""
    return np.asarray(codes @ entry.params["W_dec"] + entry.params["b_dec"], np.float32)


# --------------------------------------------------------------------------------------- store rows


@dataclass
class StoreRows:
    """Rows read from a store: acts [N, d] float32, clip [N] int32 (store clip ids), frame [N] int32."""

    acts: np.ndarray
    clip: np.ndarray
    frame: np.ndarray


def pick_blocks(num_rows: int, max_rows: int, seed: int) -> np.ndarray:
    """Ids of the aligned 1024-row blocks to analyse: all of them when the store holds at most
    `max_rows` rows, else a seeded random choice of ceil(max_rows / 1024), sorted (block reads are fast;
    rows are shuffled across clips at export, so blocks are a fair sample)."""
    n_blocks = -(-num_rows // CHUNK_ROWS)
    want = -(-max_rows // CHUNK_ROWS)
    if want >= n_blocks:
        return np.arange(n_blocks)
    return np.sort(np.random.default_rng(seed).choice(n_blocks, want, replace=False))


def read_store_rows(store: ActivationStore, blocks: np.ndarray, max_rows: int) -> StoreRows:
    """The rows of `blocks` (at most `max_rows`, the first ones), as float32 acts with clip and frame."""
    parts = [store.read_block(int(b)) for b in blocks]
    if not parts:
        raise AnalysisError(f"{store.path}: holds no rows")
    acts, clip, frame = (np.concatenate([p[i] for p in parts])[:max_rows] for i in range(3))
    return StoreRows(np.asarray(acts, np.float32), clip.astype(np.int32), frame.astype(np.int32))


def align_rows(per_layer: dict[str, StoreRows]) -> dict[str, StoreRows]:
    """The same (clip, frame) rows in every layer, in the first layer's order. Export writes the same
    row order to every layer, so this is a no-op unless a non-finite row was dropped from one layer."""
    first = next(iter(per_layer.values()))
    if all(
        np.array_equal(r.clip, first.clip) and np.array_equal(r.frame, first.frame)
        for r in per_layer.values()
    ):
        return per_layer
    keys = {name: r.clip.astype(np.int64) << 32 | r.frame.astype(np.int64) for name, r in per_layer.items()}
    common = set(keys[next(iter(keys))])
    for k in keys.values():
        common &= set(k.tolist())
    order = [int(k) for k in keys[next(iter(keys))] if int(k) in common]
    out = {}
    for name, r in per_layer.items():
        where = {int(k): i for i, k in enumerate(keys[name])}
        idx = np.asarray([where[k] for k in order], np.int64)
        out[name] = StoreRows(r.acts[idx], r.clip[idx], r.frame[idx])
    return out


# --------------------------------------------------------------------------------------- row labels


@dataclass
class RowTable:
    """What each analysed row is. clip / frame [N] int32 (store clip ids); clip_id [N] the corpus id of
    the clip ("speech-0003", or the store id as a string); domain [N] ("" when unknown); labels:
    name -> [N] object array of class strings (None where the clip has no such label); clips: store clip
    id -> its manifest row (id, path, domain and every label)."""

    clip: np.ndarray
    frame: np.ndarray
    clip_id: np.ndarray
    domain: np.ndarray
    labels: dict[str, np.ndarray]
    clips: dict[int, dict]

    def __len__(self) -> int:
        return int(self.clip.shape[0])


def row_labels(
    store: ActivationStore | dict, clip: np.ndarray, frame: np.ndarray, corpus_rows: list[dict] | None = None
) -> RowTable:
    """Labels of the rows (clip [N], frame [N]) of `store` (or its manifest dict). Export numbers clips
    by their position in the audio manifest, so store clip i is `corpus_rows[i]` (checked against the id
    the store recorded); without corpus rows the labels come from the store's clip records."""
    manifest = store.manifest if isinstance(store, ActivationStore) else store
    records = manifest["clips"]
    clips = {}
    for cid in np.unique(clip).tolist():
        rec = records.get(str(cid))
        if rec is None:
            raise AnalysisError(f"store clip {cid} has rows but no clip record")
        clips[cid] = _clip_row(cid, rec, corpus_rows)
    ids = np.asarray([str(clips[c].get("id", c)) for c in clip.tolist()], dtype=object)
    domain = np.asarray([str(clips[c].get("domain", "")) for c in clip.tolist()], dtype=object)
    labels = {name: _column(clips, clip, name) for name in label_names(clips.values())}
    return RowTable(clip.astype(np.int32), frame.astype(np.int32), ids, domain, labels, clips)


def _clip_row(cid: int, rec: dict, corpus_rows: list[dict] | None) -> dict:
    stored = {"path": rec.get("path"), **rec.get("labels", {})}
    if corpus_rows is None:
        return stored
    if not 0 <= cid < len(corpus_rows):
        raise AnalysisError(f"store clip {cid} is beyond the corpus manifest ({len(corpus_rows)} clips)")
    row = corpus_rows[cid]
    if "id" in stored and "id" in row and str(stored["id"]) != str(row["id"]):
        raise AnalysisError(
            f"store clip {cid} was {stored['id']!r} at export, the corpus manifest has {row['id']!r} there"
        )
    return dict(row)


def label_names(clips) -> list[str]:
    """Class labels found in clip rows: keys with string values (never identifiers or free text) taking
    2..MAX_CLASSES distinct values, sorted; `domain` first."""
    values: dict[str, set] = {}
    for row in clips:
        for key, v in row.items():
            if key not in NOT_LABELS and isinstance(v, str):
                values.setdefault(key, set()).add(v)
    names = sorted(k for k, v in values.items() if 2 <= len(v) <= MAX_CLASSES)
    return sorted(names, key=lambda n: n != "domain")


def _column(clips: dict[int, dict], clip: np.ndarray, name: str) -> np.ndarray:
    per_clip = {c: row.get(name) if isinstance(row.get(name), str) else None for c, row in clips.items()}
    return np.asarray([per_clip[c] for c in clip.tolist()], dtype=object)
