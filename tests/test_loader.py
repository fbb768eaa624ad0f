"""The grain loader over an activation store: mixing, determinism, resumable state, process shards."""

import numpy as np
import pytest

from jaxsae.config import DataConfig
from jaxsae.data import load_source
from jaxsae.loader import batch_dataset, batch_iterator
from jaxsae.store import StoreMeta, create_store

N_CLIPS, FRAMES, D = 1000, 24, 8


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """Two layers written in clip order (no export-time shuffle); columns 0, 1, 2 hold the clip id,
    the layer and the row index."""
    root = tmp_path_factory.mktemp("store")
    clip = np.repeat(np.arange(N_CLIPS, dtype=np.int32), FRAMES)
    frame = np.tile(np.arange(FRAMES, dtype=np.int32), N_CLIPS)
    for layer in (2, 4):
        meta = StoreMeta("test", "0", layer, "block", 16000, 50.0, "float32", D)
        store = create_store(root / f"layer_{layer}", meta, durable=False)
        acts = np.zeros((clip.size, D), np.float32)
        acts[:, 0], acts[:, 1], acts[:, 2] = clip, layer, np.arange(clip.size)
        records = {c: {"path": f"{c}.wav", "n_frames": FRAMES} for c in range(N_CLIPS)}
        store.append(acts, clip, frame, clips_done=list(range(N_CLIPS)), clip_records=records)
    return root


def test_a_batch_mixes_hundreds_of_clips_and_layers_stay_aligned(store_dir):
    source = load_source(DataConfig(source=str(store_dir)), D)
    assert source.layer_names == ["layer_2", "layer_4"]
    it = batch_iterator(batch_dataset(source, 4096, seed=0))
    for _ in range(3):
        batch = next(it)
        assert batch.shape == (2, 4096, D)
        assert len(np.unique(batch[0, :, 0])) >= 200
        np.testing.assert_array_equal(batch[0, :, 0], batch[1, :, 0])  # same rows in both layers
        assert (batch[0, :, 1] == 2).all() and (batch[1, :, 1] == 4).all()


def test_stream_is_deterministic_and_resumes_from_its_state(store_dir):
    source = load_source(DataConfig(source=str(store_dir), layers=(4,)), D)
    a = batch_iterator(batch_dataset(source, 1024, seed=3))
    first = [next(a) for _ in range(5)]
    b = batch_iterator(batch_dataset(source, 1024, seed=3))
    for want in first[:2]:
        np.testing.assert_array_equal(next(b), want)
    state = b.get_state()
    c = batch_iterator(batch_dataset(source, 1024, seed=3))
    c.set_state(state)
    for want in first[2:]:
        np.testing.assert_array_equal(next(c), want)
    other = next(batch_iterator(batch_dataset(source, 1024, seed=4)))
    assert not np.array_equal(other, first[0])


def test_each_process_reads_its_own_blocks(store_dir):
    source = load_source(DataConfig(source=str(store_dir), layers=(2,)), D)
    n_blocks = N_CLIPS * FRAMES // 1024
    blocks = []
    for i in range(2):  # one block per local batch: 2048 rows over 2 processes, no mixing across blocks
        ds = batch_dataset(source, 2048, seed=0, mix_blocks=1, process_index=i, process_count=2)
        ids = [np.unique(ds[j][0, :, 2] // 1024) for j in range(n_blocks // 2)]
        assert all(len(b) == 1 for b in ids)  # each local batch is one whole block
        blocks.append({int(b[0]) for b in ids})
    assert len(blocks[0]) == len(blocks[1]) == n_blocks // 2
    assert not blocks[0] & blocks[1]  # within an epoch the processes read disjoint blocks
