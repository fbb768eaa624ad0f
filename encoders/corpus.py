"""The labelled demo corpus: short clips of speech, music, sounds and silence, labels known by construction.

Layout of `out_dir`:
    audio/<clip_id>.wav   16-bit PCM, mono, `sample_rate` Hz (16 kHz by default)
    manifest.jsonl        one JSON object per clip, in plan order (see `build_corpus` for the keys)
    corpus.json           the settings the corpus was built with; a resumed build must use the same ones

Speech is eSpeak NG (`encoders.speech`), resampled to 16 kHz; music and sounds are synthesised with numpy.
Everything is a function of the seed: the plan draws each clip's settings from its own generator keyed on
(seed, domain, index), rendering draws noise from another one, so a clip does not depend on how many clips
of other domains there are, on the order clips are rendered in, or on the number of workers.
Levels are RMS re full scale 1.0 (a full-scale sine reads -3 dB) and always measured on the int16 samples
that were written, so a label is exactly what a reader of the wav measures.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.signal import chirp, fftconvolve, lfilter

DOMAINS = ("speech", "music", "sounds", "silence")
DOMAIN_SHARES = {"speech": 0.4, "music": 0.25, "sounds": 0.25, "silence": 0.1}
SIZES = {"small": 48, "default": 240, "large": 960}
FORMAT_VERSION = 1

# Three male, three female. eSpeak NG ignores an unknown variant silently, so each "+variant" must be a file
# in the shipped espeak-ng-data/voices/!v (tests check it). Variants with a `breath` line (f2, f3, f5) are
# left out: breath noise comes from eSpeak's RNG, which espeak_Initialize seeds with time(NULL), so those
# voices differ from one second to the next even in a fresh process (measured).
VOICES = ("en-us", "en-us+f4", "en+m3", "en+f1", "en-us+m7", "en-gb-x-rp+f4")
SPEECH_RATES = (110, 170)  # words per minute, inclusive
SPEECH_PITCHES = (30, 70)  # eSpeak pitch parameter 0-100, inclusive

# Plain sentences of 5-11 words: at the slowest rate each fits in about 5 s (tests check the longest).
SENTENCES = (
    "The cat sat by the warm window all afternoon.",
    "Please close the door when you leave the room.",
    "We walked along the river until the sun went down.",
    "How many apples did you buy at the market?",
    "My brother plays the drums in a small band.",
    "Turn left at the old red barn.",
    "The train to the city leaves at seven fifteen.",
    "She painted the fence a bright shade of green.",
    "Do you know where I left my keys?",
    "The soup needs a little more salt.",
    "It rained all night and the streets are still wet.",
    "He opened the letter and smiled.",
    "Our team won the game by three points.",
    "Bring a jacket because it gets cold after dark.",
    "The baby laughed at the barking dog.",
    "I would like a cup of tea with milk, please.",
    "The library is closed on Sunday mornings.",
    "Can you help me carry these boxes upstairs?",
    "A small boat drifted slowly across the lake.",
    "The children built a castle out of sand.",
    "Write your name at the top of the page.",
    "The phone rang twice and then stopped.",
    "We need eggs, bread, and a bag of rice.",
    "The mountain road was steep and narrow.",
    "Why is the sky so dark this morning?",
    "Five birds sat on the wire above the street.",
    "He fixed the broken chair with a bit of glue.",
    "The museum has a famous painting of a ship.",
    "Let us meet at the corner cafe at noon.",
    "The old clock in the hall stopped at midnight.",
    "She speaks three languages and wants to learn more.",
    "Put the plates in the cupboard next to the sink.",
    "The wind blew the leaves across the yard.",
    "I think the movie starts in ten minutes.",
    "Our neighbours planted tomatoes and beans this spring.",
    "The teacher read a story to the class.",
    "Please send me the report by Friday.",
    "A bright light flashed over the hills.",
    "Is this the bus that goes to the airport?",
    "The bakery sells fresh bread every morning.",
    "He forgot his umbrella on the train again.",
    "The garden smells of roses after the rain.",
    "We counted the stars from the top of the hill.",
    "My grandmother makes the best apple pie.",
    "Keep the milk in the fridge so it stays cold.",
    "The pilot said we would land in twenty minutes.",
    "Nobody knew the answer to the last question.",
    "The river is too deep to cross here.",
    "Could you speak a little more slowly?",
    "The dog ran after the ball and brought it back.",
    "There are four chairs and one small table.",
    "She tied her shoes and ran out the door.",
    "The market opens early on Saturday.",
    "Snow covered the fields for most of the winter.",
    "Turn off the lights before you go to bed.",
    "The coffee was too hot to drink.",
    "He wrote a long letter to his old friend.",
    "Wait here until I come back with the car.",
    "The band played a slow song at the end.",
    "Green leaves turn yellow and red in the fall.",
)

TIMBRES = ("sine", "square", "saw", "triangle", "plucked", "organ")
MUSIC_KINDS = ("note", "chord", "melody")
CHORDS = {
    "major": (0, 4, 7),
    "minor": (0, 3, 7),
    "diminished": (0, 3, 6),
    "augmented": (0, 4, 8),
    "sus4": (0, 5, 7),
    "major7": (0, 4, 7, 11),
    "minor7": (0, 3, 7, 10),
    "dominant7": (0, 4, 7, 10),
}
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10), "pentatonic": (0, 2, 4, 7, 9)}
SOUND_KINDS = ("white_noise", "pink_noise", "brown_noise", "clicks", "sweep", "rain", "wind", "hum", "beeps")
SILENCE_KINDS = ("digital", "white_floor", "pink_floor")

# Target levels (dBFS RMS over the whole clip), drawn uniformly per clip.
LOUDNESS_RANGE = {"speech": (-32.0, -16.0), "music": (-35.0, -12.0), "sounds": (-40.0, -12.0)}
FLOOR_RANGE = (-85.0, -60.0)  # the "very low noise floor" silence variants
SILENCE_DB = -120.0  # the level reported for digital silence (its true RMS level is -inf)
PEAK = 0.99  # no sample beyond this: a clip too peaky for its target comes out quieter (the label says so)
MAX_HARMONIC_HZ_FRACTION = 0.45  # additive partials stop below 0.45 * sample rate: little aliasing


class CorpusError(ValueError):
    """The user's input does not fit (an out_dir built with other settings, impossible sizes)."""


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip; `labels` go to the manifest, `synth` only steers rendering."""

    id: str
    domain: str
    index: int
    seed: int
    n_samples: int  # the planned length; speech may come out longer (an utterance is never cut)
    target_db: float
    labels: dict = field(default_factory=dict)
    synth: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- planning


def domain_counts(n_clips: int) -> dict[str, int]:
    """Split `n_clips` across DOMAINS by DOMAIN_SHARES, at least one each; the remainder goes to speech."""
    if n_clips < len(DOMAINS):
        raise CorpusError(f"a corpus needs at least {len(DOMAINS)} clips (one per domain), got {n_clips}")
    counts = {d: max(1, int(n_clips * DOMAIN_SHARES[d])) for d in DOMAINS}
    counts["speech"] += n_clips - sum(counts.values())
    return counts


def plan_corpus(
    seed: int, counts: dict[str, int], clip_seconds: tuple[float, float], sample_rate: int
) -> list[ClipSpec]:
    """The list of clips to render, in manifest order (speech, music, sounds, silence; by index)."""
    lo, hi = clip_seconds
    if not 0 < lo <= hi:
        raise CorpusError(f"clip_seconds must satisfy 0 < min <= max, got {clip_seconds}")
    planners = {"speech": _plan_speech, "music": _plan_music, "sounds": _plan_sound, "silence": _plan_silence}
    specs = []
    for code, domain in enumerate(DOMAINS):
        for i in range(counts.get(domain, 0)):
            rng = np.random.default_rng([seed, code, i])
            seconds = round(float(rng.uniform(lo, hi)), 2)
            n = int(round(seconds * sample_rate))
            render_seed = int(rng.integers(2**63))
            target = round(float(rng.uniform(*LOUDNESS_RANGE.get(domain, FLOOR_RANGE))), 2)
            labels, synth = planners[domain](i, rng, seconds, seed)
            specs.append(ClipSpec(f"{domain}-{i:04d}", domain, i, render_seed, n, target, labels, synth))
    return specs


def _plan_speech(i: int, rng: np.random.Generator, seconds: float, seed: int) -> tuple[dict, dict]:
    """Voices cycle (balanced); sentences follow one seed-wide permutation, so repeats come late."""
    order = np.random.default_rng([seed, 99]).permutation(len(SENTENCES))
    labels = {
        "text": SENTENCES[int(order[i % len(SENTENCES)])],
        "voice": VOICES[i % len(VOICES)],
        "rate": int(rng.integers(SPEECH_RATES[0], SPEECH_RATES[1] + 1)),
        "pitch_param": int(rng.integers(SPEECH_PITCHES[0], SPEECH_PITCHES[1] + 1)),
    }
    return labels, {"lead": float(rng.uniform())}  # where the utterance sits inside the padding


def _plan_music(i: int, rng: np.random.Generator, seconds: float, seed: int) -> tuple[dict, dict]:
    """Kinds cycle fastest, then timbres, so every (kind, timbre) pair appears once per 18 clips."""
    kind, timbre = MUSIC_KINDS[i % 3], TIMBRES[(i // 3) % len(TIMBRES)]
    lead = round(float(rng.uniform(0.0, 0.2)), 3)
    tail = float(rng.uniform(0.0, 0.2))
    synth = {
        "attack": float(rng.uniform(0.005, 0.05)),
        "decay": float(rng.uniform(0.05, 0.3)),
        "sustain": float(rng.uniform(0.5, 0.9)),
        "release": float(rng.uniform(0.03, 0.15)),
    }
    labels: dict = {"kind": kind, "timbre": timbre}
    if kind == "melody":
        note_s = float(rng.uniform(0.2, 0.6))
        m = max(2, int((seconds - lead - tail) / note_s))
        note_s = round((seconds - lead - tail) / m, 3)
        labels |= _plan_melody(rng, m)
        labels["onsets_s"] = [round(lead + j * note_s, 3) for j in range(m)]
        labels["note_seconds"] = round(note_s * float(rng.uniform(0.7, 1.0)), 3)
    else:
        if kind == "note":
            labels["pitch_midi"] = int(rng.integers(40, 85))  # E2 .. C6
        else:
            name = list(CHORDS)[int(rng.integers(len(CHORDS)))]
            root = int(rng.integers(43, 68))
            labels |= {"pitch_midi": [root + s for s in CHORDS[name]], "root_midi": root, "chord": name}
        labels["onsets_s"] = [lead]
        labels["note_seconds"] = round(seconds - lead - tail, 3)
    return labels, synth


def _plan_melody(rng: np.random.Generator, m: int) -> dict:
    """m notes: a random walk of steps -2..+2 over a scale, from a root between G3 and C5, within an octave
    either side of it."""
    name = list(SCALES)[int(rng.integers(len(SCALES)))]
    root = int(rng.integers(55, 73))
    steps = SCALES[name]
    pos, notes = 0, []
    for _ in range(m):
        octave, degree = divmod(pos, len(steps))
        notes.append(root + 12 * octave + steps[degree])
        pos = int(np.clip(pos + rng.integers(-2, 3), -len(steps), len(steps)))
    return {"pitch_midi": notes, "root_midi": root, "scale": name}


def _plan_sound(i: int, rng: np.random.Generator, seconds: float, seed: int) -> tuple[dict, dict]:
    """Kinds cycle; each kind draws the few settings that describe it (and labels them)."""
    kind = SOUND_KINDS[i % len(SOUND_KINDS)]
    labels: dict = {"kind": kind}
    if kind == "clicks":
        labels["rate_hz"] = round(float(rng.uniform(2.0, 30.0)), 2)
    elif kind == "sweep":
        f = np.exp(rng.uniform(np.log(80.0), np.log(7000.0), size=2))
        labels |= {"f_start_hz": round(float(f[0]), 1), "f_end_hz": round(float(f[1]), 1)}
    elif kind == "rain":
        labels["density_hz"] = round(float(rng.uniform(40.0, 400.0)), 1)
    elif kind == "hum":
        labels["fundamental_hz"] = float(rng.choice([50.0, 60.0]))
    elif kind == "beeps":
        labels |= {
            "freq_hz": round(float(rng.uniform(500.0, 2500.0)), 1),
            "rate_hz": round(float(rng.uniform(1.0, 5.0)), 2),
        }
    return labels, {}


def _plan_silence(i: int, rng: np.random.Generator, seconds: float, seed: int) -> tuple[dict, dict]:
    return {"kind": SILENCE_KINDS[i % len(SILENCE_KINDS)]}, {}


# ---------------------------------------------------------------------------------------------- rendering


def render_clip(spec: ClipSpec, sample_rate: int) -> np.ndarray:
    """Render one clip: int16 [n] mono at `sample_rate`, normalised to the spec's target level."""
    rng = np.random.default_rng(spec.seed)
    if spec.domain == "speech":
        wave = _render_speech(spec, sample_rate)
    elif spec.domain == "music":
        wave = _render_music(spec.labels, spec.synth, spec.n_samples, sample_rate, rng)
    elif spec.domain == "sounds":
        wave = _fade(_render_sound(spec.labels, spec.n_samples, sample_rate, rng), sample_rate)
    else:
        wave = _render_silence(spec.labels["kind"], spec.n_samples, sample_rate, rng)
    return to_pcm16(wave, spec.target_db)


def to_pcm16(wave: np.ndarray, target_db: float) -> np.ndarray:
    """Scale float [n] to `target_db` RMS (peaks held at PEAK) and round to int16 [n]; zeros stay zeros."""
    wave = np.asarray(wave, dtype=np.float64)
    rms = math.sqrt(float(np.mean(wave**2))) if wave.size else 0.0
    if rms == 0.0:
        return np.zeros(wave.shape, dtype=np.int16)
    gain = min(10 ** (target_db / 20) / rms, PEAK / float(np.max(np.abs(wave))))
    return np.clip(np.round(wave * gain * 32768.0), -32768, 32767).astype(np.int16)


def loudness_db(pcm: np.ndarray) -> float:
    """RMS level of int16 [n] samples in dB re full scale 1.0 (int16 / 32768); SILENCE_DB for all zeros."""
    x = np.asarray(pcm, dtype=np.float64) / 32768.0
    rms = math.sqrt(float(np.mean(x**2))) if x.size else 0.0
    return round(20 * math.log10(rms), 3) if rms > 0 else SILENCE_DB


def midi_to_hz(midi: float) -> float:
    """Equal temperament, A4 = MIDI 69 = 440 Hz."""
    return 440.0 * 2.0 ** ((midi - 69) / 12)


def _render_speech(spec: ClipSpec, sample_rate: int) -> np.ndarray:
    """eSpeak NG at 22050 Hz, resampled, then padded with digital silence up to the planned length."""
    from encoders.audio import resample
    from encoders.speech import synthesize

    lab = spec.labels
    wave, sr = synthesize(lab["text"], voice=lab["voice"], rate=lab["rate"], pitch=lab["pitch_param"])
    wave = resample(wave, sr, sample_rate).astype(np.float64)
    room = max(spec.n_samples - wave.size, 0)
    start = int(round(spec.synth["lead"] * room))
    return np.pad(wave, (start, room - start))


def _render_music(labels: dict, synth: dict, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Notes (a chord is several at once, a melody several in turn) placed on a silent float64 [n] track."""
    pitches = labels["pitch_midi"] if isinstance(labels["pitch_midi"], list) else [labels["pitch_midi"]]
    together = labels["kind"] != "melody"
    onsets = labels["onsets_s"] * len(pitches) if together else labels["onsets_s"]
    track = np.zeros(n)
    m = int(round(labels["note_seconds"] * sr))
    for midi, onset in zip(pitches, onsets, strict=True):
        start = int(round(onset * sr))
        note = _note(labels["timbre"], midi_to_hz(midi), min(m, n - start), sr, synth, rng)
        track[start : start + note.size] += note
    return track


def _note(timbre: str, f0: float, n: int, sr: int, env: dict, rng: np.random.Generator) -> np.ndarray:
    """One note, float64 [n]: a plucked string decays by itself and only gets a release; the rest ADSR."""
    if timbre == "plucked":
        ramp = min(int(env["release"] * sr), n)
        return _karplus_strong(f0, n, sr, rng) * _release(n, ramp)
    return _additive(f0, n, sr, timbre) * _adsr(n, sr, env)


def _harmonic_amps(timbre: str, k: np.ndarray) -> np.ndarray:
    """Fourier amplitudes of partial k (1-based int array) for the additive timbres."""
    k = k.astype(np.float64)
    odd = (k % 2 == 1).astype(np.float64)
    if timbre == "sine":
        return (k == 1).astype(np.float64)
    if timbre == "square":
        return odd / k
    if timbre == "saw":
        return 1.0 / k
    if timbre == "triangle":
        return odd * np.where((k - 1) % 4 == 0, 1.0, -1.0) / k**2
    if timbre == "organ":  # drawbar-like: 8', 4', 2 2/3', 2', 1 3/5', 1'
        return np.select([k == 1, k == 2, k == 3, k == 4, k == 6, k == 8], [1.0, 0.5, 0.35, 0.25, 0.15, 0.1])
    raise ValueError(f"unknown timbre {timbre!r}")


def _additive(f0: float, n: int, sr: int, timbre: str) -> np.ndarray:
    """Sum of sines up to MAX_HARMONIC_HZ_FRACTION * sr (a band-limited square/saw/...), float64 [n]."""
    k = np.arange(1, max(1, int(MAX_HARMONIC_HZ_FRACTION * sr / f0)) + 1)
    amps = _harmonic_amps(timbre, k)
    phase = 2 * np.pi * ((f0 * np.arange(n) / sr) % 1.0)  # kept in [0, 2 pi) for precision
    out = np.zeros(n)
    for kk, a in zip(k, amps, strict=True):
        if a != 0.0:
            out += a * np.sin(kk * phase)
    return out


def _karplus_strong(f0: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Plucked string, float64 [n]: a noise burst through y[t] = x[t] + g * (h * y)[t - M].

    The loop filter h = [1, 1]/2 * [1 - c, c] is the classic two-point average (a gentle low-pass, half a
    sample of delay) times a linear-interpolation fractional delay, so the period M + 0.5 + c equals
    sr / f0 exactly at low frequencies (within a few cents up to C6 at 16 kHz). g sets a decay of ~60 dB
    over 1.5-4 s, shorter for high notes as on a real string.
    """
    period = sr / f0
    m = max(1, int(math.floor(period - 0.5)))
    c = period - 0.5 - m
    h = np.array([0.5 * (1 - c), 0.5, 0.5 * c])
    decay_s = float(np.clip(4.0 * (110.0 / f0) ** 0.5, 1.5, 4.0))
    g = 10 ** (-3 / (f0 * decay_s))
    a = np.zeros(m + 3)
    a[0], a[m:] = 1.0, -g * h
    # The string's initial shape: plucked at a random point (a triangle, partials falling as 1/k^2, so the
    # fundamental dominates as on a guitar) plus a little noise for a varied attack.
    x = np.arange(m + 1) / (m + 1)
    at = rng.uniform(0.15, 0.5)
    shape = np.where(x < at, x / at, (1 - x) / (1 - at)) + 0.15 * rng.uniform(-1.0, 1.0, size=m + 1)
    burst = np.zeros(max(n, m + 1))
    burst[: m + 1] = shape - shape.mean()  # no DC: the loop's DC gain is 1 / (1 - g)
    return lfilter([1.0], a, burst)[:n]


def _adsr(n: int, sr: int, env: dict) -> np.ndarray:
    """Linear attack-decay-sustain-release envelope, float64 [n]; segments shrink to fit short notes."""
    a, d, r = (int(env[key] * sr) for key in ("attack", "decay", "release"))
    scale = min(1.0, 0.9 * n / max(a + d + r, 1))
    a, d, r = int(a * scale), int(d * scale), int(r * scale)
    s = env["sustain"]
    held = n - a - d - r
    return np.concatenate(
        [
            np.linspace(0.0, 1.0, a, endpoint=False),
            np.linspace(1.0, s, d, endpoint=False),
            np.full(held, s),
            np.linspace(s, 0.0, r),
        ]
    )


def _release(n: int, ramp: int) -> np.ndarray:
    """1 then a linear fall to 0 over the last `ramp` samples, float64 [n]."""
    env = np.ones(n)
    if ramp > 0:
        env[n - ramp :] = np.linspace(1.0, 0.0, ramp)
    return env


def _fade(wave: np.ndarray, sr: int, seconds: float = 0.01) -> np.ndarray:
    """10 ms linear fade in and out, so clips start and end without a click."""
    ramp = min(int(seconds * sr), wave.size // 2)
    out = wave.copy()
    out[:ramp] *= np.linspace(0.0, 1.0, ramp, endpoint=False)
    out[wave.size - ramp :] *= np.linspace(1.0, 0.0, ramp)
    return out


def colored_noise(n: int, sr: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power spectral density ~ 1/f**exponent above 20 Hz (0 white, 1 pink, 2 brown).

    Filtering in the frequency domain: the white spectrum times f**(-exponent/2), DC removed. float64 [n].
    """
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    shape = np.maximum(f, 20.0) ** (-exponent / 2)
    shape[0] = 0.0
    return np.fft.irfft(spec * shape, n)


def _render_sound(labels: dict, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Dispatch on the sound's kind; float64 [n] at any level (normalised later)."""
    kind = labels["kind"]
    t = np.arange(n) / sr
    if kind.endswith("_noise"):
        return colored_noise(n, sr, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind[:-6]], rng)
    if kind == "clicks":
        return _clicks(n, sr, labels["rate_hz"], rng)
    if kind == "sweep":
        f0, f1 = labels["f_start_hz"], labels["f_end_hz"]
        return chirp(t, f0, t[-1], f1, method="logarithmic", phi=-90)
    if kind == "rain":
        return _rain(n, sr, labels["density_hz"], rng)
    if kind == "wind":
        return _wind(n, sr, rng)
    if kind == "hum":
        k = np.arange(1, 9)[:, None]
        tone = np.sum(np.sin(2 * np.pi * k * labels["fundamental_hz"] * t) / k**1.5, axis=0)
        return tone + 0.02 * rng.standard_normal(n)
    if kind == "beeps":
        gate = ((t * labels["rate_hz"]) % 1.0) < 0.4
        return np.sin(2 * np.pi * labels["freq_hz"] * t) * _smooth(gate.astype(np.float64), int(0.005 * sr))
    raise ValueError(f"unknown sound kind {kind!r}")


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average of `width` samples (same length): soft edges for gates and envelopes."""
    return np.convolve(x, np.ones(max(width, 1)) / max(width, 1), mode="same")


def _decaying(sr: int, tau: float, hz: float | None, rng: np.random.Generator) -> np.ndarray:
    """A short decaying burst, float64 [~6 tau * sr]: a tone at `hz`, or noise when hz is None."""
    t = np.arange(max(int(6 * tau * sr), 2)) / sr
    carrier = np.sin(2 * np.pi * hz * t) if hz else rng.standard_normal(t.size)
    return carrier * np.exp(-t / tau)


def _clicks(n: int, sr: int, rate_hz: float, rng: np.random.Generator) -> np.ndarray:
    """A regular train of 3 kHz ticks (1 ms decay) at `rate_hz`, starting at a random phase."""
    train = np.zeros(n)
    at = np.round((rng.uniform(0.0, 1.0 / rate_hz) + np.arange(0.0, n / sr, 1.0 / rate_hz)) * sr).astype(int)
    train[at[at < n]] = 1.0
    return fftconvolve(train, _decaying(sr, 0.001, 3000.0, rng))[:n]


def _rain(n: int, sr: int, density_hz: float, rng: np.random.Generator) -> np.ndarray:
    """Sparse random decaying noise clicks (drops, Poisson times, log-normal sizes) over a pinkish bed."""
    drops = np.zeros(n)
    count = rng.poisson(density_hz * n / sr)
    np.add.at(drops, rng.integers(0, n, size=count), rng.lognormal(0.0, 0.8, size=count))
    drops = fftconvolve(drops, _decaying(sr, float(rng.uniform(0.0005, 0.003)), None, rng))[:n]
    bed = colored_noise(n, sr, 0.7, rng)
    bed *= 0.3 * np.std(drops) / max(float(np.std(bed)), 1e-12)
    return drops + bed


def _wind(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Brown-pink noise whose level swells and falls with a slow random envelope (gusts under ~1 Hz)."""
    gust = colored_noise(n, sr, 0.0, rng)
    gust = np.fft.irfft(np.fft.rfft(gust) * (np.fft.rfftfreq(n, 1.0 / sr) < 1.0), n)
    gust = (gust - gust.min()) / max(float(np.ptp(gust)), 1e-12)
    return colored_noise(n, sr, 1.5, rng) * (0.2 + 0.8 * gust)


def _render_silence(kind: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Digital silence (zeros) or a very low white/pink noise floor; float64 [n]."""
    if kind == "digital":
        return np.zeros(n)
    return colored_noise(n, sr, 0.0 if kind == "white_floor" else 1.0, rng)


# ------------------------------------------------------------------------------------------------ building


def build_corpus(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_speech: int = 96,
    n_music: int = 60,
    n_sounds: int = 60,
    n_silence: int = 24,
    clip_seconds: tuple[float, float] = (2.0, 6.0),
    sample_rate: int = 16000,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Write the corpus into `out_dir` (resuming a killed build there) and return `out_dir` as a Path.

    Manifest keys, all clips: id, path (relative to out_dir), domain, duration_s (of the written wav),
    loudness_db (measured on the written int16 samples, `loudness_db`), and
      speech:  text, voice, rate (wpm), pitch_param (eSpeak 0-100), speech_start_s, speech_end_s (where the
               utterance is, measured: the clip is the utterance padded with digital silence)
      music:   kind (note|chord|melody), timbre, pitch_midi (int for a note, list of ints for a chord or a
               melody, in order), root_midi + chord (chords), root_midi + scale (melodies), onsets_s (list),
               note_seconds
      sounds:  kind (SOUND_KINDS), plus rate_hz / f_start_hz, f_end_hz / density_hz / fundamental_hz /
               freq_hz where the kind has them
      silence: kind (digital: all zeros, loudness_db = SILENCE_DB; white_floor / pink_floor: -85..-60 dB)
    Clips of a completed wav are not rendered again; the manifest is rewritten at the end, so a resumed
    build gives byte-identical files to an uninterrupted one. `workers` processes render in parallel
    (0 or 1: in this process); each speech clip also runs its own short-lived eSpeak process.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    counts = {"speech": n_speech, "music": n_music, "sounds": n_sounds, "silence": n_silence}
    if min(counts.values()) < 0 or sum(counts.values()) == 0:
        raise CorpusError(f"clip counts must be >= 0 and not all 0, got {counts}")
    specs = plan_corpus(seed, counts, clip_seconds, sample_rate)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    _claim(
        out,
        {
            "format_version": FORMAT_VERSION,
            "seed": seed,
            "counts": counts,
            "clip_seconds": list(clip_seconds),
            "sample_rate": sample_rate,
        },
    )
    for stale in (out / "audio").glob("*.partial"):  # a wav being written when the last build was killed
        stale.unlink()
    rows = {s.id: row for s in specs if (row := _existing_row(s, out, sample_rate)) is not None}
    # Domains interleaved (slow speech spread over the run), so the bar's rate and ETA hold from the start.
    share = {s.id: s.index / counts[s.domain] for s in specs}
    todo = sorted((s for s in specs if s.id not in rows), key=lambda s: share[s.id])
    with tqdm(total=len(specs), initial=len(rows), unit="clip", desc="corpus", disable=not progress) as bar:
        for row in _render_all(todo, out, sample_rate, workers):
            rows[row["id"]] = row
            bar.update()
    _write_atomic(out / "manifest.jsonl", "".join(json.dumps(rows[s.id]) + "\n" for s in specs))
    return out


def read_manifest(corpus_dir: str | Path) -> list[dict]:
    """The manifest rows of a built corpus, in order."""
    with open(Path(corpus_dir) / "manifest.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def manifest_row(spec: ClipSpec, pcm: np.ndarray, sample_rate: int) -> dict:
    """The manifest entry of a clip from its spec and its written int16 samples [n]."""
    row = {"id": spec.id, "path": f"audio/{spec.id}.wav", "domain": spec.domain}
    row |= {"duration_s": pcm.size / sample_rate, **spec.labels, "loudness_db": loudness_db(pcm)}
    if spec.domain == "speech":
        row |= active_span(pcm, sample_rate)
    return row


def active_span(pcm: np.ndarray, sample_rate: int, below_peak_db: float = 40.0) -> dict:
    """First and last 10 ms frame whose RMS is within `below_peak_db` of the loudest frame, in seconds."""
    hop = sample_rate // 100
    n = pcm.size // hop * hop
    frames = np.asarray(pcm[:n], dtype=np.float64).reshape(-1, hop)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    if not rms.size or rms.max() == 0:
        return {"speech_start_s": 0.0, "speech_end_s": 0.0}
    active = np.nonzero(rms > rms.max() * 10 ** (-below_peak_db / 20))[0]
    start, end = int(active[0]) * hop, (int(active[-1]) + 1) * hop
    return {"speech_start_s": start / sample_rate, "speech_end_s": end / sample_rate}


def _claim(out: Path, settings: dict) -> None:
    """Record the build settings in out/corpus.json, or check that a previous build used the same ones."""
    path = out / "corpus.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != settings:
            raise CorpusError(
                f"{out} holds a corpus built with other settings ({old}, now {settings}): "
                "use another output folder or delete it"
            )
        return
    _write_atomic(path, json.dumps(settings, indent=1) + "\n")


def _existing_row(spec: ClipSpec, out: Path, sample_rate: int) -> dict | None:
    """The manifest row of a clip whose wav is already complete, or None when it must be rendered."""
    import soundfile as sf

    path = out / "audio" / f"{spec.id}.wav"
    if not path.exists():
        return None
    try:
        pcm, sr = sf.read(path, dtype="int16")
    except (RuntimeError, ValueError):  # unreadable: rendered again and replaced
        return None
    if sr != sample_rate or pcm.ndim != 1 or (spec.domain != "speech" and pcm.size != spec.n_samples):
        return None
    return manifest_row(spec, pcm, sample_rate)


def _render_all(specs: list[ClipSpec], out: Path, sample_rate: int, workers: int):
    """Render and write `specs`, yielding their manifest rows as they finish (in any order)."""
    if workers <= 1 or len(specs) <= 1:
        for spec in specs:
            yield _render_job(spec, str(out), sample_rate)
        return
    # spawn, not fork: the caller may hold threads (JAX, torch, tqdm) that a forked child inherits broken.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_exit_with, initargs=(os.getpid(),)
    )
    try:
        futures = [pool.submit(_render_job, spec, str(out), sample_rate) for spec in specs]
        for fut in as_completed(futures):
            yield fut.result()
    finally:  # on an error or Ctrl-C, drop the queued clips instead of rendering them all first
        pool.shutdown(wait=True, cancel_futures=True)


def _exit_with(parent: int) -> None:
    """Worker initializer: exit once the parent is gone (a kill -9 of a build leaves no idle workers)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _render_job(spec: ClipSpec, out: str, sample_rate: int) -> dict:
    """Worker: render one clip, write its wav atomically, return its manifest row."""
    import soundfile as sf

    pcm = render_clip(spec, sample_rate)
    path = Path(out) / "audio" / f"{spec.id}.wav"
    tmp = path.with_name(path.name + ".partial")
    sf.write(tmp, pcm, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)  # atomic: a wav under its final name is always complete
    return manifest_row(spec, pcm, sample_rate)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
