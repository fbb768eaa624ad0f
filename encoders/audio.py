"""Audio helpers shared by every encoder: the one resampler of the package."""

from math import gcd

import numpy as np
from scipy.signal import resample_poly


def resample(wave: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Resample a mono or channels-last signal with a polyphase anti-aliasing filter.

    wave: float array [n] or [n, channels] at sr_from Hz. Returns float32 [m] or [m, channels] at sr_to Hz,
    m = ceil(n * sr_to / sr_from). scipy's default Kaiser window (beta 5) keeps the passband flat well past
    the 8 kHz that a 16 kHz model sees, e.g. 22050 -> 16000 Hz is up 320 / down 441.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if sr_from <= 0 or sr_to <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_from} -> {sr_to}")
    if sr_from == sr_to:
        return wave.copy()
    g = gcd(int(sr_from), int(sr_to))
    out = resample_poly(wave, int(sr_to) // g, int(sr_from) // g, axis=0)
    return out.astype(np.float32, copy=False)
