"""The grain loader: random aligned blocks of rows, mixed in a shuffle buffer, cut into batches.

Block-level then row-level mixing (aligned 1024-row block reads are fast; random single rows are not):
blocks are shuffled per epoch, each process takes every process_count-th, groups of `mix_blocks`
blocks are read and their rows permuted together, and each group is cut into batches. Every batch is a
pure function of (seed, index), so the iterator state (one index, saved with each checkpoint) resumes
the exact stream. A batch is float32 [L, b, d_in]: the same rows of every layer, b = B / process_count.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict

import grain
import numpy as np

from jaxsae.data import Source
from jaxsae.store import CHUNK_ROWS


class _MixBlocks(grain.transforms.RandomMap):
    """Block ids [G] -> rows [L, G·1024, d] of every layer, permuted together."""

    def __init__(self, source: Source):
        self.layers = source.layers

    def random_map(self, block_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        rows = np.stack([_read_blocks(layer, block_ids) for layer in self.layers])
        return rows[:, rng.permutation(rows.shape[1])]


def _read_blocks(layer, block_ids: np.ndarray) -> np.ndarray:
    if hasattr(layer, "read_blocks"):  # a store: all reads in flight at once
        return layer.read_blocks(block_ids)
    blocks = [np.asarray(layer[b * CHUNK_ROWS : (b + 1) * CHUNK_ROWS], np.float32) for b in block_ids]
    return np.concatenate(blocks)


class _CutBatches(grain.MapDataset):
    """Element j: batch j % per_group of group j // per_group, [L, batch_rows, d]. The last few groups
    are kept, so each is looked up, read and permuted once (grain's FlatMap recomputes its parent for
    every split)."""

    def __init__(self, groups: grain.MapDataset, batch_rows: int, per_group: int, keep: int = 4):
        super().__init__(groups)
        self.batch_rows, self.per_group, self.keep = batch_rows, per_group, keep
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return min(sys.maxsize, len(self._parent) * self.per_group)

    def __str__(self) -> str:
        return f"CutBatches(batch_rows={self.batch_rows}, per_group={self.per_group})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        group, part = divmod(index, self.per_group)
        rows = self._group(group)
        return rows[:, part * self.batch_rows : (part + 1) * self.batch_rows]

    def _group(self, group: int) -> np.ndarray:
        with self._lock:
            if group not in self._recent:
                self._recent[group] = self._parent[group]
                if len(self._recent) > self.keep:
                    self._recent.popitem(last=False)
            return self._recent[group]

    def __getstate__(self) -> dict:  # a copy in another process builds its own cache and lock
        state = dict(self.__dict__)
        del state["_recent"], state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _recent=OrderedDict(), _lock=threading.Lock())


def batch_dataset(
    source: Source,
    batch_size: int,
    seed: int,
    mix_blocks: int = 16,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Endless MapDataset of this process's batches [L, batch_size / process_count, d_in] float32.
    Rows of a block past the last full block are not used."""
    n_blocks = source.num_rows // CHUNK_ROWS
    local = batch_size // process_count
    group = max(mix_blocks, -(-local // CHUNK_ROWS))
    ds = grain.MapDataset.range(n_blocks).seed(seed).shuffle().repeat()
    ds = ds[process_index::process_count].batch(group).random_map(_MixBlocks(source))
    return _CutBatches(ds, local, group * CHUNK_ROWS // local)


def batch_iterator(ds: grain.MapDataset, threads: int = 2) -> grain.DatasetIterator:
    """A prefetching iterator with `get_state()` / `set_state()` (saved in checkpoints)."""
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
    return iter(ds.to_iter_dataset(options))
