"""Running Whisper on clips under an encoder edit: cached encoder prefixes, greedy decoding with log-probs
and the no-speech probability, teacher-forced loss, corpus WER. Used by `encoders.splice` and `.steering`.

An edit at layer n leaves blocks 1..n-1 untouched, so the clean pass keeps, per batch, the hidden state that
enters block n (`ClipBatch.inputs[n]`); every edited condition then runs only blocks n..L and the final
layer norm. The forward hooks still fire, so the edit goes through the same path as on a full pass (tests
check both give the same output).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.audio_io import load_audio
from encoders.metrics import normalize_text, word_error_rate
from encoders.whisper_ct2 import EOT, NO_TIMESTAMPS, SAMPLE_RATE, SOT, _suppress_mask, log_mel

FRAME_SAMPLES = 320  # Whisper encoder frame: 20 ms at 16 kHz
N_FRAMES = 1500  # encoder output frames of the 30 s input
NO_SPEECH = NO_TIMESTAMPS - 1  # <|nocaptions|> of the English-only vocabulary (50361)
DEFAULT_MAX_TOKENS = 96  # the demo's sentences are <= 20 tokens; caps the runaway loops of damaged models


# -------------------------------------------------------------------------------------------- clips
def load_clips(rows: Iterable[Mapping], corpus_dir: str | Path) -> list[np.ndarray]:
    """Mono float32 16 kHz waves [n] of manifest rows (paths relative to `corpus_dir`), each cut to 30 s."""
    return [load_audio(Path(corpus_dir) / r["path"], SAMPLE_RATE)[: 30 * SAMPLE_RATE] for r in rows]


def kept_frames(waves: Sequence[np.ndarray]) -> torch.Tensor:
    """int64 [B]: ceil(n_samples / 320) output frames per clip, at most 1500."""
    return torch.tensor([min(math.ceil(len(w) / FRAME_SAMPLES), N_FRAMES) for w in waves])


def reference_tokens(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    """Whisper text tokens of reference transcripts (with the leading space Whisper writes)."""
    return [tok.encode(" " + t.strip(), add_special_tokens=False) for t in texts]


def corpus_wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Σ word errors / Σ reference words over clips (each clip's WER weighted by its word count)."""
    words = [max(len(normalize_text(r)), 1) for r in refs]
    errors = [word_error_rate(r, h) * n for r, h, n in zip(refs, hyps, words, strict=True)]
    return float(sum(errors) / max(sum(words), 1))


def capped_wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Mean over clips of min(WER, 1): a clip whose greedy transcript loops (hundreds of inserted words)
    counts as one fully wrong clip instead of dominating the corpus WER."""
    rates = [min(word_error_rate(r, h), 1.0) for r, h in zip(refs, hyps, strict=True)]
    return float(np.mean(rates)) if rates else 0.0


def feature_extractor_and_tokenizer(fe_or_processor: Any, tokenizer: Any = None) -> tuple[Any, Any]:
    """(feature extractor, tokenizer) from a WhisperProcessor or a feature extractor (+ tokenizer); the
    shipped tiny.en tokenizer when none is given."""
    fe = getattr(fe_or_processor, "feature_extractor", fe_or_processor)
    tok = tokenizer or getattr(fe_or_processor, "tokenizer", None)
    if tok is None:
        from transformers import WhisperTokenizerFast

        from encoders.whisper_ct2 import model_dir

        tok = WhisperTokenizerFast(tokenizer_file=str(model_dir() / "tokenizer.json"))
    return fe, tok


# -------------------------------------------------------------------------------------- the encoder
@dataclass
class ClipBatch:
    """A batch of clips: log-mel features [B, 80, 3000], kept frames [B], and the clean hidden state
    entering block n, [B, 1500, d], for each cached layer n (1-based)."""

    features: torch.Tensor
    keep: torch.Tensor
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)


@torch.inference_mode()
def prepare_batches(
    model: Any, fe: Any, waves: Sequence[np.ndarray], layers: Iterable[int], batch_size: int, edit: Any = None
) -> list[ClipBatch]:
    """Batches of `waves` with the clean inputs of blocks `layers` cached; one clean encoder pass, during
    which `edit` (an EncoderEdit that must leave the output unchanged, e.g. a recorder) is active."""
    layers, blocks = sorted(set(layers)), model.model.encoder.layers
    batches = []
    for i in range(0, len(waves), batch_size):
        part = waves[i : i + batch_size]
        b = ClipBatch(log_mel(fe, list(part)), kept_frames(part))
        with ExitStack() as stack:
            for n in layers:
                hook = blocks[n - 1].register_forward_pre_hook(
                    lambda _m, a, n=n, b=b: b.inputs.__setitem__(n, a[0])
                )
                stack.callback(hook.remove)
            encode(model, b, edit=edit)
        batches.append(b)
    return batches


@torch.inference_mode()
def encode(model: Any, batch: ClipBatch, edit: Any = None, start: int | None = None) -> torch.Tensor:
    """Encoder output [B, 1500, d] (after the final layer norm) with `edit`'s hooks active.

    start: run from block `start` (1-based) on its cached clean input (only valid when the edit touches no
    earlier block); None runs the whole encoder on the features."""
    enc = model.model.encoder
    with ExitStack() as stack:
        if edit is not None:
            edit.keep = batch.keep
            stack.enter_context(edit)
        if start is None:
            return enc(batch.features).last_hidden_state
        hidden = batch.inputs[start]
        for blk in enc.layers[start - 1 :]:
            hidden = blk(hidden, None)
        return enc.layer_norm(hidden)


# -------------------------------------------------------------------------------------- the decoder
@dataclass
class Decoded:
    """Greedy decoding of a batch: text tokens per clip (no prompt, no <|endoftext|>), the summed log-prob
    of the chosen tokens including <|endoftext|> (after token suppression, as openai-whisper sums it), and
    P(<|nocaptions|>) after <|startoftranscript|> (openai-whisper's no_speech_prob)."""

    tokens: list[list[int]]
    sum_logprob: list[float]
    no_speech_prob: list[float]

    def avg_logprob(self) -> list[float]:
        """openai-whisper's avg_logprob: sum_logprob / (text tokens + 1)."""
        return [s / (len(t) + 1) for s, t in zip(self.sum_logprob, self.tokens, strict=True)]


@torch.inference_mode()
def greedy_from_encoder(
    model: Any, hidden: torch.Tensor, max_new_tokens: int = DEFAULT_MAX_TOKENS, allow_empty: bool = False
) -> Decoded:
    """Greedy <|notimestamps|> decoding from encoder outputs [B, 1500, d]: the prompt, suppression and stop
    rule of whisper_ct2.greedy_decode, plus log-probs and the no-speech probability. `allow_empty` lets
    <|endoftext|> be the first token (Whisper's decoders forbid it, so they always write something)."""
    from transformers.modeling_outputs import BaseModelOutput

    enc, batch = BaseModelOutput(last_hidden_state=hidden), hidden.shape[0]
    always, begin = _suppress_mask(model, model.config.vocab_size)
    if allow_empty:
        begin[EOT] = False
    inputs, cache = torch.tensor([[SOT, NO_TIMESTAMPS]] * batch), None
    done, out = torch.zeros(batch, dtype=torch.bool), []
    total, no_speech = torch.zeros(batch, dtype=torch.float64), torch.zeros(batch)
    for step in range(max_new_tokens):
        res = model(encoder_outputs=enc, decoder_input_ids=inputs, past_key_values=cache, use_cache=True)
        if step == 0:  # the logits after <|startoftranscript|>, before any suppression
            no_speech = torch.softmax(res.logits[:, 0].float(), -1)[:, NO_SPEECH]
        logits, cache = res.logits[:, -1].float(), res.past_key_values
        logits[:, (always | begin) if step == 0 else always] = -torch.inf
        nxt = torch.where(done, EOT, logits.argmax(-1))
        chosen = torch.log_softmax(logits, -1).gather(1, nxt[:, None])[:, 0].double()
        total += torch.where(done, 0.0, chosen)
        done |= nxt == EOT
        out.append(nxt)
        if done.all():
            break
        inputs = nxt[:, None]
    rows = torch.stack(out, 1).tolist()
    tokens = [r[: r.index(EOT)] if EOT in r else r for r in rows]
    return Decoded(tokens, total.tolist(), no_speech.tolist())


@torch.inference_mode()
def teacher_forced_nll(
    model: Any, hidden: torch.Tensor, targets: Sequence[list[int]]
) -> tuple[list[float], list[int]]:
    """Per clip (summed cross-entropy in nats, token count) of `targets` (text tokens) + <|endoftext|>
    after the prompt <|startoftranscript|><|notimestamps|>; no token suppression: the model's own loss."""
    from transformers.modeling_outputs import BaseModelOutput

    n = max(len(t) for t in targets) + 1
    labels = torch.full((len(targets), n), -100)
    inputs = torch.full((len(targets), n + 1), EOT)  # the padding sits after each target: causal, unseen
    inputs[:, :2] = torch.tensor([SOT, NO_TIMESTAMPS])
    for b, t in enumerate(targets):
        inputs[b, 2 : 2 + len(t)] = torch.tensor(t, dtype=torch.long)
        labels[b, : len(t) + 1] = torch.tensor([*t, EOT])
    logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), decoder_input_ids=inputs).logits
    # float64 log-softmax: float32 over 51864 classes along a strided dim drifts by ~1e-4 nats per token
    logp = torch.log_softmax(logits[:, 1:].double(), -1)
    valid = labels != -100
    nll = -logp.gather(2, labels.clamp(min=0)[..., None])[..., 0] * valid
    return nll.sum(1).tolist(), valid.sum(1).tolist()
