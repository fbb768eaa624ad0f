"""Audio media for the feature browser: Whisper log-mel per encoder frame, mel crops as PNG, WAV snippets.

Whisper's log-mel (WhisperFeatureExtractor: 80 mels, 25 ms window, 10 ms hop, log10 clamped to 8 below the
clip's maximum, (x + 4) / 4) is exactly the model's input; two mel frames make one 20 ms encoder frame.
PNGs are written by a small numpy + zlib encoder and WAVs by the standard library, so the report needs
neither matplotlib nor soundfile to write them. transformers (the `torch` extra) is needed for the mel.
"""

from __future__ import annotations

import struct
import wave
import zlib
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
MEL_HOP = 160  # samples per mel frame (10 ms)
FRAME_SAMPLES = 320  # samples per encoder frame (20 ms)
N_MELS = 80
# viridis at 9 evenly spaced points; linear interpolation between them is close enough for a thumbnail.
_VIRIDIS = np.array(
    [
        [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
        [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
    ],
    np.float64,
)  # fmt: skip


# -------------------------------------------------------------------------------------------- audio
def read_wave(path: str | Path) -> np.ndarray:
    """Mono float32 [n] at 16 kHz: soundfile when installed (any format it reads), else the standard
    library's 16-bit PCM WAV reader; other sample rates are resampled (scipy's polyphase filter)."""
    try:
        import soundfile as sf

        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except ImportError:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"{path}: only 16-bit PCM WAV can be read without soundfile") from None
            sr, ch = w.getframerate(), w.getnchannels()
            data = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, ch) / 32768.0
    mono = np.asarray(data, np.float32).mean(axis=1)
    if sr != SAMPLE_RATE:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(sr), SAMPLE_RATE)
        mono = resample_poly(mono, SAMPLE_RATE // g, int(sr) // g).astype(np.float32)
    return mono


def _clip_path(corpus_dir: str | Path | None, row: Mapping) -> Path:
    path = Path(str(row["path"]))
    return path if path.is_absolute() or corpus_dir is None else Path(corpus_dir) / path


# ---------------------------------------------------------------------------------------------- mel
@lru_cache(maxsize=1)
def _feature_extractor():
    try:
        from transformers import WhisperFeatureExtractor
    except ImportError:
        raise ImportError("Whisper's log-mel needs transformers (the `torch` extra)") from None
    return WhisperFeatureExtractor()


def log_mel_10ms(wave_16k: np.ndarray) -> np.ndarray:
    """Whisper's normalised log-mel of one clip, float32 [n_mel_frames, 80], 10 ms hop, the 30 s padding
    cut off: n_mel_frames = ceil(n / 160) (at most 3000). Clips longer than 30 s are truncated.

    Computed on the clip plus 50 ms of zeros instead of the full 30 s: every kept frame sees the same
    samples (the padding is zeros either way), and the normalisation (clamp at the maximum − 8) is set by
    the clip, since padding only adds the floor value; so the frames equal the model input's, 10x faster.
    """
    n = min(-(-len(wave_16k) // MEL_HOP), 3000)
    padded = np.concatenate([np.asarray(wave_16k, np.float32)[: 3000 * MEL_HOP], np.zeros(800, np.float32)])
    fe = _feature_extractor()
    feats = fe([padded], sampling_rate=SAMPLE_RATE, padding="longest", return_tensors="np")
    return np.ascontiguousarray(feats.input_features[0][:, :n].T, np.float32)


@lru_cache(maxsize=32)
def _cached_mel(path: str) -> np.ndarray:
    return log_mel_10ms(read_wave(path))


def clip_log_mel(corpus_dir: str | Path | None, row: Mapping) -> np.ndarray:
    """`log_mel_10ms` of a manifest row's audio (cached for the last 32 clips: crops of one clip reuse it)."""
    return _cached_mel(str(_clip_path(corpus_dir, row)))


def to_encoder_frames(mel: np.ndarray, n_frames: int) -> np.ndarray:
    """[n_mel_frames, 80] -> [n_frames, 80]: the mean of each pair of 10 ms frames (the last may be one)."""
    out = np.zeros((n_frames, mel.shape[1]), np.float32)
    for j in range(2):
        part = mel[j::2][:n_frames]
        out[: len(part)] += part
    counts = np.minimum(np.maximum(len(mel) - 2 * np.arange(n_frames), 0), 2)
    return (out / np.maximum(counts, 1)[:, None]).astype(np.float32)


def frame_mels(corpus_dir: str | Path | None, manifest_rows: Iterable[Mapping]) -> dict[str, np.ndarray]:
    """{row["id"]: float32 [n_encoder_frames, 80]}: each clip's Whisper log-mel averaged to the encoder's
    20 ms frames, n_encoder_frames = ceil(n_samples / 320) as the activation stores keep them."""
    out = {}
    for row in manifest_rows:
        wav = read_wave(_clip_path(corpus_dir, row))
        n_frames = min(-(-len(wav) // FRAME_SAMPLES), 1500)
        out[str(row["id"])] = to_encoder_frames(log_mel_10ms(wav), n_frames)
    return out


# ---------------------------------------------------------------------------------------------- PNG
def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 [..., 3] viridis colours of `values` scaled linearly from [lo, hi] (clipped)."""
    t = np.clip((np.asarray(values, np.float64) - lo) / max(hi - lo, 1e-9), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(t.astype(int), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    return np.round(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Writes uint8 [H, W, 3] as an 8-bit RGB PNG (zlib-compressed, filter 0 on every row)."""
    rgb = np.ascontiguousarray(rgb, np.uint8)
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)
    return Path(path)


def mel_image(mel_window: np.ndarray, marker: tuple[int, int] | None, scale: int = 2) -> np.ndarray:
    """uint8 [80·scale, T·scale, 3]: a log-mel window [T, 80] (low frequencies at the bottom), viridis on
    Whisper's normalised range [-1.5, 1.5], with white ticks above and below the columns `marker` [a, b)."""
    img = colormap(mel_window.T[::-1], -1.5, 1.5)
    img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    if marker is not None:
        a, b = (max(m * scale, 0) for m in marker)
        tick = max(4 * scale, 1)
        img[:tick, a:b] = 255
        img[-tick:, a:b] = 255
        img[tick:-tick, a : a + 1] = img[tick:-tick, max(b - 1, 0) : b] = (255, 80, 80)
    return img


def mel_crop_png(
    corpus_dir: str | Path | None,
    clip_row: Mapping,
    frame: int,
    out_path: str | Path,
    context_frames: int = 50,
) -> Path:
    """A PNG of the clip's log-mel (10 ms resolution) from `context_frames` encoder frames before `frame` to
    as many after (±1 s by default), zero-extended (Whisper's floor) at the clip's edges, with the encoder
    frame marked; 160 px high, 4 px per encoder frame wide."""
    mel = clip_log_mel(corpus_dir, clip_row)
    lo, hi = 2 * (frame - context_frames), 2 * (frame + context_frames + 1)
    window = np.full((hi - lo, mel.shape[1]), float(mel.min()) if mel.size else -1.5, np.float32)
    src_lo, src_hi = max(lo, 0), min(hi, len(mel))
    if src_hi > src_lo:
        window[src_lo - lo : src_hi - lo] = mel[src_lo:src_hi]
    return write_png(out_path, mel_image(window, (2 * context_frames, 2 * context_frames + 2)))


# ---------------------------------------------------------------------------------------------- WAV
def write_wav(path: str | Path, wave_16k: np.ndarray) -> Path:
    """Mono int16 16 kHz WAV of float samples in [-1, 1] (clipped)."""
    pcm = np.round(np.clip(np.asarray(wave_16k, np.float64), -1.0, 1.0) * 32767).astype("<i2")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return Path(path)


def audio_snippet(
    corpus_dir: str | Path | None, clip_row: Mapping, frame: int, out_path: str | Path, seconds: float = 1.5
) -> Path:
    """A WAV of `seconds` of the clip centred on encoder frame `frame` (shifted to stay inside the clip;
    shorter when the clip is), level unchanged, with 5 ms fades so that playback does not click."""
    wav = read_wave(_clip_path(corpus_dir, clip_row))
    n = min(int(round(seconds * SAMPLE_RATE)), len(wav))
    centre = int((frame + 0.5) * FRAME_SAMPLES)
    start = int(np.clip(centre - n // 2, 0, len(wav) - n))
    piece = wav[start : start + n].astype(np.float64)
    fade = min(80, n // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        piece[:fade] *= ramp
        piece[-fade:] *= ramp[::-1]
    return write_wav(out_path, piece)
