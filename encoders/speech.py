"""Offline speech synthesis with the eSpeak NG library that PyPI `espeakng-loader` ships (GPL-3.0, loaded
at run time through ctypes; nothing of it is linked into this package).

eSpeak NG keeps state between utterances, so repeated synthesis in one process is not bit-repeatable,
while the first utterance of a fresh process is. `synthesize` therefore runs every utterance in a fresh
worker process (this file run as a script with only ctypes and numpy, so it starts in ~0.1 s) and reads the
raw int16 samples back from its stdout.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import numpy as np

SAMPLE_RATE = 22050  # eSpeak NG's fixed output rate

# Values from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3
_EE_OK = 0

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _load_espeak() -> tuple[ctypes.CDLL, str]:
    """Return (libespeak-ng handle, path of its espeak-ng-data), or raise one clear line."""
    try:
        import espeakng_loader
    except ImportError as e:
        raise ImportError("speech synthesis needs PyPI `espeakng-loader`: pip install espeakng-loader") from e
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    # Explicit signatures: size_t and pointers must not go through ctypes' default int conversion.
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    return lib, espeakng_loader.get_data_path()


def _check(code: int, what: str) -> None:
    if code != _EE_OK:
        raise RuntimeError(f"eSpeak NG {what} failed with code {code}")


def _synthesize_here(text: str, voice: str, rate: int, pitch: int) -> bytes:
    """Synthesise in this process; returns mono int16 samples at 22050 Hz as raw native-endian bytes.

    Only the first call in a process is bit-repeatable: use `synthesize`, which calls this in a worker.
    """
    lib, data_path = _load_espeak()
    sr = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
    if sr != SAMPLE_RATE:
        raise RuntimeError(f"eSpeak NG initialisation failed (returned {sr}, data at {data_path})")
    # Voices with breath noise (+f2, +f3, ...) draw from a generator seeded by the clock: fix its seed.
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed(0)
    chunks: list[bytes] = []

    def on_audio(wav, n, _events):  # called by espeak_Synth; wav is NULL at the end of the utterance
        if wav and n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0  # 0 = keep going

    callback = _SynthCallback(on_audio)  # kept referenced until synthesis ends, or ctypes frees it
    lib.espeak_SetSynthCallback(callback)
    _check(lib.espeak_SetVoiceByName(voice.encode()), f"voice {voice!r}")
    _check(lib.espeak_SetParameter(_RATE, int(rate), 0), "rate")
    _check(lib.espeak_SetParameter(_PITCH, int(pitch), 0), "pitch")
    raw = text.encode("utf-8") + b"\0"
    _check(lib.espeak_Synth(raw, len(raw), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None), "synthesis")
    _check(lib.espeak_Synchronize(), "synchronize")
    lib.espeak_Terminate()
    return b"".join(chunks)


def synthesize(text: str, voice: str = "en-us", rate: int = 150, pitch: int = 50) -> tuple[np.ndarray, int]:
    """Speak `text` with eSpeak NG in a fresh worker process, deterministically.

    voice: an eSpeak voice, optionally with a variant ("en-us", "en-us+m3", "en+f3"); rate in words per
    minute (80-450); pitch 0-100. Returns (float32 mono wave [n] in [-1, 1), 22050). The same arguments give
    bit-identical audio on every call.
    """
    request = json.dumps({"text": text, "voice": voice, "rate": int(rate), "pitch": int(pitch)})
    proc = subprocess.run(
        [sys.executable, "-P", __file__],  # -P: keep encoders/ off sys.path, its names could shadow packages
        input=request.encode(),
        capture_output=True,
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines() or [f"exit code {proc.returncode}"]
        raise RuntimeError(f"eSpeak NG worker failed: {lines[-1]}")  # the worker's exception line
    pcm = np.frombuffer(proc.stdout, dtype=np.int16)
    return (pcm.astype(np.float32) / 32768.0), SAMPLE_RATE


def _worker_main() -> None:
    """Worker entry point: a JSON request on stdin, raw int16 samples on stdout."""
    req = json.loads(sys.stdin.buffer.read())
    pcm = _synthesize_here(req["text"], req["voice"], req["rate"], req["pitch"])
    sys.stdout.buffer.write(pcm)
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    _worker_main()
