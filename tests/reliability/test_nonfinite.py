"""NaN and Inf. Export: a frame non-finite in any layer is skipped in every layer (the stores stay aligned
row for row) and counted per clip, per store and in the result. Training: a batch with a NaN or Inf row
stops the run with one line naming the step, the loader batch and the last good checkpoint (which holds
finite parameters), or, with train.skip_nonfinite, is skipped (parameters unchanged) and counted."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from jaxsae import checkpoint
from jaxsae.config import load_config
from jaxsae.data import load_source
from jaxsae.loader import batch_dataset
from jaxsae.store import open_store

from .common import TRAIN_ARGS, write_clips

EVERY = 7  # tiny_encoder: layer 1 NaN at frames t % 7 == 3, layer 2 +Inf at t % 7 == 5


def test_export_skips_and_counts_nonfinite_rows_keeping_layers_aligned(tmp_path):
    from encoders.export import export_activations

    from .tiny_encoder import HOP, TinyEncoder

    audio = write_clips(tmp_path / "audio", 12)
    res = export_activations(
        TinyEncoder(EVERY), "1,2", audio, tmp_path / "out", shuffle_buffer_rows=100, progress=False
    )
    stores = {ly: open_store(tmp_path / "out" / f"layer_{ly}", read_only=True) for ly in ("1", "2")}
    frames = {int(cid): rec["n_frames"] for cid, rec in stores["1"].manifest["clips"].items()}
    bad = {cid: sum(t % EVERY in (3, 5) for t in range(n)) for cid, n in frames.items()}
    assert sum(frames.values()) == sum(n // HOP for n in _lengths(audio))
    for ly, s in stores.items():
        clip, frame = s.read_clip_frame(0, s.num_rows)
        assert not np.isin(frame % EVERY, (3, 5)).any()  # skipped in both layers, whichever was bad
        assert np.isfinite(s.read_rows(0, s.num_rows).astype(np.float32)).all()
        recs = s.manifest["clips"]
        assert {int(c): r["nonfinite_rows"] for c, r in recs.items()} == bad
        assert res.nonfinite_rows[ly] == sum(bad.values()) and res.rows[ly] == s.num_rows
        assert s.num_rows == sum(frames.values()) - sum(bad.values())
    c1, f1 = stores["1"].read_clip_frame(0, stores["1"].num_rows)
    c2, f2 = stores["2"].read_clip_frame(0, stores["2"].num_rows)
    np.testing.assert_array_equal(c1, c2)  # row i of each layer is the same frame
    np.testing.assert_array_equal(f1, f2)


def _lengths(audio) -> list[int]:
    import soundfile as sf

    return [sf.info(p).frames for p in sorted(audio.iterdir())]


# ------------------------------------------------------------------------------------------ training
def _nan_rows(tmp_path):
    """A .npy of 8 blocks of 1024 rows [8192, 16] with one NaN row and one Inf row in a block the
    input-scale sample does not read (so training starts, then meets them)."""
    rows = np.random.default_rng(0).standard_normal((8192, 16)).astype(np.float32)
    sampled = int(np.random.default_rng(0).permutation(8)[0])  # jaxsae.data.sample_rows, 1 block, seed 0
    block = (sampled + 3) % 8
    rows[block * 1024 + 17, 5] = np.nan
    rows[block * 1024 + 900, 2] = np.inf
    np.save(tmp_path / "rows.npy", rows)
    return tmp_path / "rows.npy"


def _args(path, out, steps: int, *extra: str) -> list[str]:
    """The small run of TRAIN_ARGS on the rows of `path` (one layer, "rows"), as CLI overrides."""
    over = [a for a in TRAIN_ARGS if not a.startswith("--data.")]
    return [
        *over, f"--data.source={path}", "--train.scale_sample_rows=1024", "--data.mix_blocks=2",
        f"--train.steps={steps}", f"--train.out_dir={out}", *extra,
    ]  # fmt: skip


def _cfg(path, out, steps: int, *extra: str):
    return load_config(None, _args(path, out, steps, *extra))


def _bad_batches(cfg, steps: int) -> list[int]:
    """Indices (0-based) of the loader batches that hold a non-finite row."""
    ds = batch_dataset(load_source(cfg.data, cfg.sae.d_in), cfg.train.batch_size, cfg.data.seed, 2)
    return [j for j in range(steps) if not np.isfinite(ds[j]).all()]


def test_nonfinite_loss_stops_naming_step_batch_and_last_good_checkpoint(tmp_path, capsys):
    import launch.cli as cli

    path = _nan_rows(tmp_path)
    cfg = _cfg(path, tmp_path / "run", 40)
    first = _bad_batches(cfg, 40)[0]
    assert cli.main(["train", *_args(path, tmp_path / "run", 40)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("jaxsae: error: non-finite loss"), err
    step = first + 1
    assert f"at step {step} in SAE 0 (rows, seed 0), on loader batch {first} (data.seed 0)" in err[0]
    last = checkpoint.complete_steps(tmp_path / "run" / "checkpoints")[-1]
    assert last == step - 1 and f"last good checkpoint: step {last} (" in err[0]
    good = checkpoint.load(tmp_path / "run")
    assert good.step == last and all(np.isfinite(v).all() for v in good.params.values())


def test_skip_nonfinite_skips_the_update_and_counts_it(tmp_path):
    from jaxsae.train import train

    path = _nan_rows(tmp_path)
    bad = _bad_batches(_cfg(path, tmp_path, 40), 40)
    steps = bad[0] + 2  # the bad batch, then one good step after it
    cfg = _cfg(path, tmp_path / "run", steps, "--train.skip_nonfinite=true", "--train.seeds=0,1")
    result = train(cfg)
    assert [r["skipped_batches"] for r in result.metrics] == [1, 1]
    before = checkpoint.load(tmp_path / "run", step=bad[0])  # max_to_keep 3: the last three steps
    after = checkpoint.load(tmp_path / "run", step=bad[0] + 1)
    for name, value in before.params.items():  # the skipped step changed nothing
        np.testing.assert_array_equal(after.params[name], value, err_msg=name)
    assert after.meta["skipped_batches"] == [1, 1]
    final = checkpoint.load(tmp_path / "run")
    assert final.step == steps and all(np.isfinite(v).all() for v in final.params.values())
    assert not np.array_equal(final.params["W_enc"], after.params["W_enc"])  # training went on
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(ln, parse_constant=lambda c: pytest.fail(f"non-JSON {c}")) for ln in lines]
    skipped = [r for r in strict if r["step"] == bad[0] + 1]
    assert [r["loss"] for r in skipped] == [None, None] and [r["skipped_batches"] for r in skipped] == [1, 1]
    # resuming keeps the count (it is saved with each checkpoint)
    more = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps + 1)), resume=True)
    assert [r["skipped_batches"] for r in more.metrics] == [1, 1]
