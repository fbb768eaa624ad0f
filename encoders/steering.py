"""Steering Whisper with SAE features: a vector towards "non-speech" added at an encoder layer.

The vector (AudioSAE's recipe): the difference of mean SAE codes between non-speech and speech frames, kept on
the `top_n` latents where it is largest in magnitude, mapped through the decoder: v = Δ[top] · W_dec[top]
(raw activation units, [d]). Adding s·v (s > 0) to every frame of the layer's output pushes the encoder's
representation towards what non-speech looks like to the SAE; the aim is fewer hallucinated transcripts on
noise, music and silence at a small WER cost on speech. `steering_sweep` measures both over strengths s.

"Non-empty transcript": the greedy transcript (whisper_ct2's decoding: the first token may not be
<|endoftext|>, so the model must write something) still has a letter or digit after stripping punctuation,
symbols and whitespace. "Gated": openai-whisper's no-speech rule is applied as well (a transcript is dropped
when P(<|nocaptions|>) > 0.6 and its average log-prob < −1), which is how Whisper itself suppresses output.
"EOT allowed": decoded again from the same encoder output with <|endoftext|> allowed as the first token, so
an empty transcript is possible: the plainest reading of "Whisper writes nothing" on this decoder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.splice import EncoderEdit, TorchSAE, add_edit, layer_number, sae_spec
from encoders.whisper_eval import (
    DEFAULT_MAX_TOKENS,
    Decoded,
    capped_wer,
    corpus_wer,
    encode,
    greedy_from_encoder,
    load_clips,
    prepare_batches,
)

NO_SPEECH_GATE = (0.6, -1.0)  # openai-whisper's no_speech_threshold and logprob_threshold
DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
_NOT_WORD = re.compile(r"[\W_]+")


# ---------------------------------------------------------------------------------- mean codes
def encode_numpy(entry: Any, acts: np.ndarray, batch: int = 4096) -> np.ndarray:
    """SAE codes [N, F] float32 of raw activations `acts` [N, d] (inference mode; see splice.TorchSAE)."""
    sae = TorchSAE.from_entry(entry)
    out = []
    with torch.inference_mode():
        for i in range(0, len(acts), batch):
            out.append(sae.encode(torch.tensor(np.asarray(acts[i : i + batch], np.float32))).numpy())
    return np.concatenate(out) if out else np.zeros((0, sae.W_enc.shape[1]), np.float32)


def mean_codes(entry: Any, acts: np.ndarray, groups: Sequence | np.ndarray, batch: int = 4096) -> dict:
    """{group: mean code [F] float64} over the rows of each group; acts [N, d] raw, groups [N] labels
    (e.g. `frame_groups`' "speech" / "non_speech"). Encodes `batch` rows at a time."""
    groups = np.asarray(groups)
    sums: dict = {}
    counts: dict = {}
    for i in range(0, len(acts), batch):
        codes = encode_numpy(entry, acts[i : i + batch], batch).astype(np.float64)
        for g in np.unique(groups[i : i + batch]):
            sel = groups[i : i + batch] == g
            sums[g.item()] = sums.get(g.item(), 0.0) + codes[sel].sum(0)
            counts[g.item()] = counts.get(g.item(), 0) + int(sel.sum())
    return {g: sums[g] / counts[g] for g in sums}


def frame_groups(
    rows_by_clip: Mapping[Any, Mapping], clip: np.ndarray, frame: np.ndarray, frame_rate: float = 50.0
) -> np.ndarray:
    """Per store row: "speech" (a speech clip's frame inside its utterance, `speech_start_s` ..
    `speech_end_s` when the manifest gives them), "speech_pause" (the silence around an utterance) or
    "non_speech" (every other domain). rows_by_clip: store clip id -> manifest row; clip, frame: int [N]."""
    out = np.empty(len(clip), dtype=object)
    for i, (c, f) in enumerate(zip(np.asarray(clip).tolist(), np.asarray(frame).tolist(), strict=True)):
        row = rows_by_clip[c]
        if row.get("domain") != "speech":
            out[i] = "non_speech"
            continue
        t = (f + 0.5) / frame_rate
        inside = row.get("speech_start_s", 0.0) <= t <= row.get("speech_end_s", float("inf"))
        out[i] = "speech" if inside else "speech_pause"
    return out.astype(str)


def steering_vector(
    entry_params: Any, codes_nonspeech_mean: np.ndarray, codes_speech_mean: np.ndarray, top_n: int
) -> np.ndarray:
    """Δ[top] · W_dec[top] as float32 [d]: Δ = mean non-speech code − mean speech code [F], `top` its
    `top_n` entries of largest |Δ| (latents firing more on non-speech add their direction, those firing
    more on speech subtract theirs). entry_params: an SAE as splice.sae_spec takes it, or a dict with
    W_dec."""
    w_dec = np.asarray(_w_dec(entry_params), np.float64)
    diff = np.asarray(codes_nonspeech_mean, np.float64) - np.asarray(codes_speech_mean, np.float64)
    top = np.argsort(-np.abs(diff), kind="stable")[:top_n]
    return (diff[top] @ w_dec[top]).astype(np.float32)


def _w_dec(entry: Any) -> np.ndarray:
    if isinstance(entry, Mapping) and "W_dec" in entry:
        return entry["W_dec"]
    return sae_spec(entry)[0]["W_dec"]


# --------------------------------------------------------------------------------------- the sweep
def steering_sweep(
    model: Any,
    feature_extractor: Any,
    tokenizer: Any,
    layer: int | str,
    vector: np.ndarray,
    clips_nonspeech: Sequence[Mapping],
    clips_speech: Sequence[Mapping],
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    corpus_dir: str | Path = ".",
    *,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_TOKENS,
    n_examples: int = 4,
) -> dict:
    """Whisper with strength·vector added to every frame of encoder layer `layer` (1-based), per strength.

    clips_*: manifest rows (speech ones need `text`). Returns {"layer", "vector_norm", "n_nonspeech",
    "n_speech", "sweep": [per strength: {"strength", "nonspeech_nonempty", "nonspeech_nonempty_gated",
    "nonempty_<domain>" for each non-speech domain, "nonspeech_no_speech_prob" (mean), "speech_wer",
    "speech_wer_capped" (mean of min(WER, 1) per clip), "speech_wer_gated", "speech_no_speech_prob",
    "nonspeech_nonempty_eot_allowed" and "speech_wer_eot_allowed" (decoded with <|endoftext|> allowed
    first), "hallucination_reduction[_gated|_eot_allowed]" (1 − the matching non-empty fraction / its value
    at strength 0, when 0 is swept)}],
    "examples": {strength: [{"clip", "text"}]} for the first non-speech and speech clips}.
    Strength 0 runs through the hook too and equals the unsteered model exactly.
    """
    n = layer_number(layer)
    vec = torch.tensor(np.asarray(vector, np.float32))
    sets = {
        "nonspeech": prepare_batches(model, feature_extractor, load_clips(clips_nonspeech, corpus_dir), [n],
                                     batch_size),
        "speech": prepare_batches(model, feature_extractor, load_clips(clips_speech, corpus_dir), [n],
                                  batch_size),
    }  # fmt: skip
    rows, examples = [], {}
    for s in strengths:
        got = {k: _decode_set(model, tokenizer, b, EncoderEdit(model, n, add_edit(vec, float(s))), n,
                              max_new_tokens) for k, b in sets.items()}  # fmt: skip
        rows.append({"strength": float(s), **_summary(got, clips_nonspeech, clips_speech)})
        examples[str(float(s))] = _examples(got, clips_nonspeech, clips_speech, n_examples)
    _add_reduction(rows)
    return {
        "layer": f"layer_{n}",
        "vector_norm": float(vec.norm()),
        "n_nonspeech": len(clips_nonspeech),
        "n_speech": len(clips_speech),
        "sweep": rows,
        "examples": examples,
    }


def _decode_set(model, tok, batches, edit, start, max_new_tokens) -> tuple[list[str], Decoded, list[str]]:
    """Transcripts and the merged Decoded of all batches under `edit`, and the transcripts when
    <|endoftext|> may come first (decoded from the same encoder output)."""
    texts, merged, free = [], Decoded([], [], []), []
    for b in batches:
        hidden = encode(model, b, edit, start)
        dec = greedy_from_encoder(model, hidden, max_new_tokens)
        texts += [tok.decode(t, skip_special_tokens=True).strip() for t in dec.tokens]
        merged.tokens += dec.tokens
        merged.sum_logprob += dec.sum_logprob
        merged.no_speech_prob += dec.no_speech_prob
        dec = greedy_from_encoder(model, hidden, max_new_tokens, allow_empty=True)
        free += [tok.decode(t, skip_special_tokens=True).strip() for t in dec.tokens]
    return texts, merged, free


def is_nonempty(text: str) -> bool:
    """True when `text` holds a letter or digit once punctuation, symbols and whitespace are removed."""
    return bool(_NOT_WORD.sub("", text))


def gated(dec: Decoded, gate: tuple[float, float] = NO_SPEECH_GATE) -> list[bool]:
    """Per clip: True when openai-whisper would drop the transcript as no speech."""
    return [p > gate[0] and lp < gate[1] for p, lp in zip(dec.no_speech_prob, dec.avg_logprob(), strict=True)]


def _summary(got: dict, nonspeech: Sequence[Mapping], speech: Sequence[Mapping]) -> dict:
    (ns_text, ns_dec, ns_free), (sp_text, sp_dec, sp_free) = got["nonspeech"], got["speech"]
    nonempty = np.array([is_nonempty(t) for t in ns_text], bool)
    kept = nonempty & ~np.array(gated(ns_dec), bool)
    out = {
        "nonspeech_nonempty": _mean(nonempty),
        "nonspeech_nonempty_gated": _mean(kept),
        "nonspeech_nonempty_eot_allowed": _mean([is_nonempty(t) for t in ns_free]),
        "nonspeech_no_speech_prob": _mean(ns_dec.no_speech_prob),
    }
    domains = np.array([r.get("domain", "?") for r in nonspeech])
    for d in sorted(set(domains.tolist())):
        out[f"nonempty_{d}"] = _mean(nonempty[domains == d])
    refs = [str(r.get("text", "")) for r in speech]
    sp_gated = [("" if g else t) for t, g in zip(sp_text, gated(sp_dec), strict=True)]
    out["speech_wer"] = corpus_wer(refs, sp_text) if refs else None
    out["speech_wer_capped"] = capped_wer(refs, sp_text) if refs else None
    out["speech_wer_gated"] = corpus_wer(refs, sp_gated) if refs else None
    out["speech_wer_eot_allowed"] = corpus_wer(refs, sp_free) if refs else None
    out["speech_no_speech_prob"] = _mean(sp_dec.no_speech_prob)
    return out


def _mean(x) -> float | None:
    x = np.asarray(x, np.float64)
    return float(x.mean()) if x.size else None


def _add_reduction(rows: list[dict]) -> None:
    """hallucination_reduction[_gated, _eot_allowed]: 1 − the non-empty fraction / its value at strength 0."""
    for suffix in ("", "_gated", "_eot_allowed"):
        key = f"nonspeech_nonempty{suffix}"
        base = next((r[key] for r in rows if r["strength"] == 0.0), None)
        for r in rows:
            ok = base and r[key] is not None
            r[f"hallucination_reduction{suffix}"] = 1.0 - r[key] / base if ok else None


def _examples(got: dict, nonspeech: Sequence[Mapping], speech: Sequence[Mapping], n: int) -> list[dict]:
    out = []
    for key, rows in (("nonspeech", nonspeech), ("speech", speech)):
        texts, _, free = got[key]
        out += [
            {"clip": str(r.get("id")), "text": t, "text_eot_allowed": f}
            for r, t, f in zip(rows[:n], texts[:n], free[:n], strict=True)
        ]
    return out
