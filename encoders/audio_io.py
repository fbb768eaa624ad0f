"""Reading audio files into mono float32 at a model's sample rate, with one clear error per bad file.

soundfile's bundled libsndfile (1.2.2 in soundfile 0.14) reads WAV, FLAC, OGG (Vorbis, Opus), MP3 and the
rarer formats it lists in `soundfile.available_formats()`; anything else is an `AudioError`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from encoders.audio import resample

# Suffixes a directory scan picks up: the formats libsndfile reads (`soundfile.available_formats()`).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64")


class AudioError(ValueError):
    """A file that cannot become a clip; the message is one line naming the file and the reason."""


def load_audio(path: str | os.PathLike, target_sr: int) -> np.ndarray:
    """The file at `path` as float32 [n] mono at `target_sr` Hz, n = ceil(frames * target_sr / file_sr).

    Channels are averaged (downmix); other sample rates are resampled with `encoders.audio.resample`.
    AudioError for a missing, empty, corrupt or unreadable file, a file with no samples, or NaN/Inf samples.
    """
    wave, sr = _read(Path(path))
    if not np.isfinite(wave).all():
        bad = int((~np.isfinite(wave)).any(axis=1).sum())
        raise AudioError(f"{path}: {bad} of {len(wave)} samples are NaN or Inf")
    mono = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]
    if sr != target_sr:
        mono = resample(mono, sr, target_sr)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _read(path: Path) -> tuple[np.ndarray, int]:
    """(float32 [frames, channels] with frames >= 1, sample rate), or AudioError."""
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError, EOFError) as e:
        raise AudioError(f"{path}: unreadable audio ({_one_line(e)})") from None
    if wave.shape[0] == 0 or wave.shape[1] == 0:
        raise AudioError(f"{path}: no samples")
    if sr <= 0:
        raise AudioError(f"{path}: sample rate {sr} Hz")
    return wave, int(sr)


def estimate_samples(path: str | os.PathLike, target_sr: int) -> int:
    """Samples `load_audio(path, target_sr)` would return, read from the header only; 0 if unreadable.

    Cheap (no decoding for most formats); used to plan export groups before any audio is read.
    """
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, ValueError, EOFError, OSError):
        return 0
    if info.samplerate <= 0 or info.frames <= 0:
        return 0
    return math.ceil(info.frames * target_sr / info.samplerate)


def _one_line(e: BaseException) -> str:
    """The exception's message on one line, without the file name soundfile repeats."""
    msg = " ".join(str(e).split())
    if msg.startswith("Error opening "):  # "Error opening '<path>': Format not recognised."
        msg = msg.split(": ", 1)[-1]
    return msg or type(e).__name__
