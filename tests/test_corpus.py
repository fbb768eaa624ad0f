"""The labelled demo corpus: determinism, resume, and labels checked against the audio independently.

One tiny corpus (8 clips of 1-1.5 s, two per domain) is built three times: with a process pool, in-process,
and resumed after damage; about 10 s on a 2-core CPU, most of it eSpeak and the pool's start-up.
"""

import argparse
import filecmp
import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from encoders import corpus
from encoders.corpus import (
    DOMAINS,
    SENTENCES,
    SILENCE_DB,
    VOICES,
    CorpusError,
    build_corpus,
    domain_counts,
    plan_corpus,
    read_manifest,
    render_clip,
)

TINY = {"n_speech": 2, "n_music": 2, "n_sounds": 2, "n_silence": 2}
SECONDS = (1.0, 1.5)
SR = 16000


def _build(out: Path, workers: int) -> Path:
    return build_corpus(out, seed=3, clip_seconds=SECONDS, workers=workers, progress=False, **TINY)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny corpus, built with a pool of 2 worker processes."""
    return _build(tmp_path_factory.mktemp("corpus") / "a", workers=2)


def _same_tree(a: Path, b: Path) -> None:
    """Byte-identical files, same names, at the top level and under audio/."""
    for sub in (a, a / "audio"):
        names = sorted(p.name for p in sub.iterdir() if p.is_file())
        assert names == sorted(p.name for p in (b / sub.relative_to(a)).iterdir() if p.is_file())
        _, mismatch, errors = filecmp.cmpfiles(sub, b / sub.relative_to(a), names, shallow=False)
        assert not mismatch and not errors, (mismatch, errors)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    """Frequency of the largest spectral peak above 20 Hz (Hann window, 8x zero-padding, parabolic fit)."""
    mag = np.abs(np.fft.rfft(x * np.hanning(x.size), 8 * x.size))
    mag[: 8 * x.size * 20 // sr] = 0.0
    k = int(np.argmax(mag))
    a, b, c = np.log(mag[k - 1 : k + 2])
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / (8 * x.size)


def _cents(f: float, midi: int) -> float:
    return 1200 * np.log2(f / (440.0 * 2 ** ((midi - 69) / 12)))


def test_same_seed_gives_identical_bytes(tiny, tmp_path):
    _same_tree(tiny, _build(tmp_path / "b", workers=0))  # and the worker count does not matter


def test_resume_after_damage_gives_identical_bytes(tiny, tmp_path, monkeypatch):
    copy = tmp_path / "c"
    shutil.copytree(tiny, copy)
    (copy / "manifest.jsonl").unlink()
    for name in ("speech-0001.wav", "music-0000.wav", "silence-0001.wav"):
        (copy / "audio" / name).unlink()
    (copy / "audio" / "sounds-0000.wav").write_bytes(b"RIFF junk")  # unreadable: must be rendered again
    (copy / "audio" / "sounds-0001.wav.partial").write_bytes(b"half a wav")  # left by a kill
    rendered = []
    job = corpus._render_job
    monkeypatch.setattr(corpus, "_render_job", lambda spec, *a: rendered.append(spec.id) or job(spec, *a))
    _build(copy, workers=0)
    assert sorted(rendered) == ["music-0000", "silence-0001", "sounds-0000", "speech-0001"]
    _same_tree(tiny, copy)


def test_other_settings_in_the_same_folder_are_refused(tiny):
    with pytest.raises(CorpusError, match="other settings"):
        build_corpus(tiny, seed=4, clip_seconds=SECONDS, workers=0, progress=False, **TINY)


def test_wavs_durations_and_domains(tiny):
    rows = read_manifest(tiny)
    assert [r["domain"] for r in rows] == [d for d in DOMAINS for _ in range(2)]
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        info = sf.info(tiny / r["path"])
        assert (info.samplerate, info.channels, info.subtype, info.format) == (SR, 1, "PCM_16", "WAV")
        assert r["duration_s"] * SR == pytest.approx(info.frames, abs=1e-6)
        lo, hi = SECONDS
        if r["domain"] == "speech":  # padded up to its planned length, never cut
            assert r["duration_s"] >= lo
            assert 0 <= r["speech_start_s"] < r["speech_end_s"] <= r["duration_s"]
        else:
            assert lo <= r["duration_s"] <= hi
    assert not list((tiny / "audio").glob("*.partial"))


def test_loudness_labels_match_the_audio(tiny):
    for r in read_manifest(tiny):
        x, _ = sf.read(tiny / r["path"], dtype="float64")
        if r["domain"] == "silence" and r["kind"] == "digital":
            assert not np.any(x) and r["loudness_db"] == SILENCE_DB
            continue
        assert 10 * np.log10(np.mean(x**2)) == pytest.approx(r["loudness_db"], abs=0.5)
        assert np.max(np.abs(x)) < 1.0
    floor = [r for r in read_manifest(tiny) if r["domain"] == "silence" and r["kind"] != "digital"]
    assert floor and all(-90 < r["loudness_db"] < -55 for r in floor)


def test_speech_labels(tiny):
    for r in read_manifest(tiny):
        if r["domain"] == "speech":
            assert r["text"] in SENTENCES and r["voice"] in VOICES
            assert 110 <= r["rate"] <= 170 and 30 <= r["pitch_param"] <= 70


def test_music_note_pitch_in_the_corpus(tiny):
    (note,) = [r for r in read_manifest(tiny) if r["domain"] == "music" and r["kind"] == "note"]
    x, _ = sf.read(tiny / note["path"], dtype="float64")
    assert abs(_cents(_peak_hz(x, SR), note["pitch_midi"])) < 5


@pytest.mark.parametrize("timbre", corpus.TIMBRES)
def test_every_timbre_sounds_its_labelled_pitch(timbre):
    """The planned note of each timbre (plucked: Karplus-Strong, fractional delay) peaks at its pitch."""
    specs = plan_corpus(0, {"music": 3 * len(corpus.TIMBRES)}, SECONDS, SR)
    (spec,) = [s for s in specs if s.labels["kind"] == "note" and s.labels["timbre"] == timbre]
    x = render_clip(spec, SR).astype(np.float64)
    assert abs(_cents(_peak_hz(x, SR), spec.labels["pitch_midi"])) < 5


def test_chord_notes_are_spectral_peaks():
    specs = plan_corpus(1, {"music": 3}, (3.0, 3.0), SR)
    chord = specs[1]  # kinds cycle note, chord, melody; this one is a sine chord
    assert (chord.labels["kind"], chord.labels["timbre"]) == ("chord", "sine")
    x = render_clip(chord, SR).astype(np.float64)
    mag = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    f = np.fft.rfftfreq(x.size, 1 / SR)
    for midi in chord.labels["pitch_midi"]:
        near = np.abs(f - 440.0 * 2 ** ((midi - 69) / 12)) < 2.0
        assert mag[near].max() > 0.1 * mag.max()
    assert chord.labels["pitch_midi"][0] == chord.labels["root_midi"]


def test_voices_exist_in_the_shipped_espeak_data():
    """eSpeak NG silently ignores an unknown variant, so check the files rather than the return code."""
    import espeakng_loader

    data = Path(espeakng_loader.get_data_path())
    langs = {p.name.lower() for p in (data / "lang").rglob("*") if p.is_file()}
    for voice in VOICES:
        lang, _, variant = voice.partition("+")
        assert lang in langs, voice
        if variant:
            lines = (data / "voices" / "!v" / variant).read_text(errors="replace").splitlines()
            # breath noise is drawn from eSpeak's time-seeded RNG: not repeatable (see VOICES)
            assert not any(line.split()[:1] == ["breath"] for line in lines), voice


def test_sentences_are_short_and_distinct():
    assert len(set(SENTENCES)) == len(SENTENCES) >= 60
    assert all(5 <= len(s.split()) <= 11 for s in SENTENCES)


def test_domain_counts():
    assert domain_counts(240) == {"speech": 96, "music": 60, "sounds": 60, "silence": 24}
    assert domain_counts(8) == {"speech": 3, "music": 2, "sounds": 2, "silence": 1}
    with pytest.raises(CorpusError):
        domain_counts(3)
    defaults = inspect.signature(build_corpus).parameters
    assert {d: defaults[f"n_{d}"].default for d in DOMAINS} == domain_counts(corpus.SIZES["default"])


def test_cli_builds_a_corpus(tmp_path, capsys):
    from launch.cmd_corpus import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["corpus", "--out", str(out), "--clips", "4", "--min-seconds", "0.5", "--max-seconds", "0.5"]
        + ["--workers", "0", "--no-progress"]
    )
    assert args.func(args, []) == 0
    assert len(read_manifest(out)) == 4 and "4 clips" in capsys.readouterr().out
    settings = json.loads((out / "corpus.json").read_text())
    assert settings["counts"] == {"speech": 1, "music": 1, "sounds": 1, "silence": 1}
    assert os.path.exists(out / "audio" / "speech-0000.wav")
