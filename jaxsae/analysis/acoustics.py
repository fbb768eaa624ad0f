"""Frame-level acoustic descriptors aligned with an encoder's frames: pitch (f0), loudness, spectral centroid.

Encoder frame i of a clip covers samples [hop·i, hop·i + win) (Whisper tiny: hop 320 = 20 ms at 16 kHz,
win 400: each encoder frame pools two 10 ms mel frames of 25 ms windows). Loudness and centroid are
measured on that window; pitch (YIN, de Cheveigné & Kawahara 2002) integrates over the same window and
looks up to sr/fmin samples past it for the lags.
Values: pitch in MIDI units (69 = A4 = 440 Hz; NaN when unvoiced or silent), loudness in dB RMS re full
scale 1.0 (floor -120), centroid in Hz of the Hann-windowed magnitude spectrum (NaN in silence).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DESCRIPTORS = ("pitch_midi", "loudness_db", "centroid_hz")
SILENT_DB = -60.0  # below this a frame has no pitch and no centroid
FLOOR_DB = -120.0


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """float32 [n] mono in [-1, 1] at `sample_rate` (WAV through scipy; other formats through soundfile
    when it is installed)."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    try:
        sr, data = wavfile.read(path)
    except ValueError:
        import soundfile

        data, sr = soundfile.read(path, dtype="float32", always_2d=True)
    data = _to_float(data)
    if data.ndim == 2:
        data = data.mean(1)
    if sr != sample_rate:
        g = np.gcd(int(sr), int(sample_rate))
        data = resample_poly(data, sample_rate // g, sr // g)
    return np.asarray(data, np.float32)


def _to_float(data: np.ndarray) -> np.ndarray:
    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    return data.astype(np.float32)


def frames(wave: np.ndarray, n_frames: int, hop: int, length: int) -> np.ndarray:
    """[n_frames, length] float64: samples [hop·i, hop·i + length) of `wave`, zero past its end."""
    need = hop * (n_frames - 1) + length
    padded = np.zeros(max(need, wave.size))
    padded[: wave.size] = wave
    idx = hop * np.arange(n_frames)[:, None] + np.arange(length)[None, :]
    return padded[idx]


def loudness_db(x: np.ndarray) -> np.ndarray:
    """[T] dB RMS of frames x [T, W], floored at FLOOR_DB."""
    ms = np.mean(x**2, axis=1)
    return np.maximum(10 * np.log10(np.maximum(ms, 1e-30)), FLOOR_DB)


def spectral_centroid(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """[T] Hz: centroid of the magnitude spectrum of Hann-windowed frames x [T, W]."""
    mag = np.abs(np.fft.rfft(x * np.hanning(x.shape[1]), axis=1))
    freqs = np.fft.rfftfreq(x.shape[1], 1.0 / sample_rate)
    total = mag.sum(1)
    return np.divide(mag @ freqs, total, out=np.full(total.shape, np.nan), where=total > 0)


def yin_f0(
    x: np.ndarray, win: int, sample_rate: int, fmin: float, fmax: float, threshold: float
) -> np.ndarray:
    """[T] Hz (NaN unvoiced): YIN on frames x [T, win + tau_max], integration window `win`."""
    tau_min = max(int(sample_rate / fmax), 2)
    tau_max = int(np.ceil(sample_rate / fmin))
    d = _difference(x, win, tau_max)
    cum = np.cumsum(d[:, 1:], axis=1)
    cmnd = np.ones_like(d)
    cmnd[:, 1:] = d[:, 1:] * np.arange(1, tau_max + 1) / np.maximum(cum, 1e-30)
    out = np.full(x.shape[0], np.nan)
    for t in range(x.shape[0]):
        tau = _first_dip(cmnd[t], tau_min, tau_max, threshold)
        if tau:
            out[t] = sample_rate / _parabolic(cmnd[t], tau)
    return out


def _difference(x: np.ndarray, win: int, tau_max: int) -> np.ndarray:
    """YIN's d(τ) = Σ_{j<win} (x_j − x_{j+τ})² for τ in 0..tau_max, per frame: [T, tau_max + 1]."""
    n = x.shape[1]
    size = 1 << int(np.ceil(np.log2(n + win)))
    spec = np.fft.rfft(x, size, axis=1)
    head = np.fft.rfft(x[:, :win], size, axis=1)
    cross = np.fft.irfft(np.conj(head) * spec, size, axis=1)[:, : tau_max + 1]
    sq = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(x**2, axis=1)], axis=1)
    taus = np.arange(tau_max + 1)
    shifted = sq[:, taus + win] - sq[:, taus]  # Σ_{j<win} x_{j+τ}²
    return np.maximum(sq[:, win : win + 1] + shifted - 2 * cross, 0.0)


def _first_dip(c: np.ndarray, lo: int, hi: int, threshold: float) -> int:
    """The lag of the minimum of the first run of c[lo:hi] below `threshold` (0 if none)."""
    below = np.nonzero(c[lo:hi] < threshold)[0]
    if not below.size:
        return 0
    tau = lo + int(below[0])
    while tau + 1 < hi and c[tau + 1] < c[tau]:
        tau += 1
    return tau


def _parabolic(c: np.ndarray, tau: int) -> float:
    """Sub-sample lag of the minimum at `tau` by a parabola through its neighbours."""
    if tau <= 0 or tau + 1 >= c.size:
        return float(tau)
    a, b, d = c[tau - 1], c[tau], c[tau + 1]
    den = a - 2 * b + d
    return float(tau + 0.5 * (a - d) / den) if den > 0 else float(tau)


def frame_descriptors(
    wave: np.ndarray,
    sample_rate: int,
    n_frames: int,
    hop: int = 320,
    win: int = 400,
    fmin: float = 50.0,
    fmax: float = 2000.0,
    threshold: float = 0.15,
) -> dict[str, np.ndarray]:
    """{"pitch_midi", "loudness_db", "centroid_hz"}: each [n_frames] float64 for encoder frames of
    `wave` [n] (see the module doc)."""
    x = frames(np.asarray(wave, np.float64), n_frames, hop, win)
    loud = loudness_db(x)
    silent = loud < SILENT_DB
    tau_max = int(np.ceil(sample_rate / fmin))
    f0 = yin_f0(
        frames(np.asarray(wave, np.float64), n_frames, hop, win + tau_max + 1),
        win,
        sample_rate,
        fmin,
        fmax,
        threshold,
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        midi = 69 + 12 * np.log2(f0 / 440.0)
    centroid = spectral_centroid(x, sample_rate)
    return {
        "pitch_midi": np.where(silent, np.nan, midi),
        "loudness_db": loud,
        "centroid_hz": np.where(silent, np.nan, centroid),
    }


def row_descriptors(
    clip: np.ndarray, frame: np.ndarray, paths: dict[int, Path], sample_rate: int, hop: int, win: int = 400
) -> np.ndarray:
    """[N, 3] float64 descriptors (DESCRIPTORS order) of rows (clip [N], frame [N]); `paths` maps each
    clip id to its audio file. Each clip is read once; rows of clips without a readable file are NaN."""
    out = np.full((clip.size, len(DESCRIPTORS)), np.nan)
    for cid in np.unique(clip).tolist():
        rows = np.nonzero(clip == cid)[0]
        path = paths.get(cid)
        if path is None or not Path(path).is_file():
            continue
        wave = read_audio(path, sample_rate)
        n = int(frame[rows].max()) + 1
        desc = frame_descriptors(wave, sample_rate, n, hop, win)
        for j, name in enumerate(DESCRIPTORS):
            out[rows, j] = desc[name][frame[rows]]
    return out
