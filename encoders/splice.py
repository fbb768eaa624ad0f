"""SAEs spliced into Whisper's encoder: the model-level cost of replacing a layer by its reconstruction.

`TorchSAE` is jaxsae.sae's inference-mode encode/decode in torch (topk, batchtopk with its scalar threshold,
jumprelu, relu) on raw activations (parameters already folded, `sae.fold_input_scale`). `EncoderEdit` is a
forward hook on `model.model.encoder.layers[n-1]` (layer n, 1-based, as in the activation stores) that
rewrites the block's output, a plain [B, 1500, d] tensor in transformers 5.

Which frames are replaced: only each clip's kept frames (the first ceil(n_samples / 320)); the 30 s padding
is left as the model computed it. The SAEs never saw padding frames (the stores drop them) and layer 4 holds
"massive" activations there, so splicing them would measure something the SAE was not trained for.

`reconstruction_cost` runs speech clips clean, with each SAE spliced, and with the layer mean- and
zero-ablated (the same kept frames replaced by the clean mean frame, or by zeros) to put the numbers in
context: greedy transcripts -> corpus WER, and the teacher-forced cross-entropy of the reference transcript.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.metrics import normalize_text
from encoders.whisper_eval import (
    DEFAULT_MAX_TOKENS,
    ClipBatch,
    capped_wer,
    corpus_wer,
    encode,
    feature_extractor_and_tokenizer,
    greedy_from_encoder,
    load_clips,
    prepare_batches,
    reference_tokens,
    teacher_forced_nll,
)

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")


# ------------------------------------------------------------------------------------------- the SAE
def sae_spec(entry: Any) -> tuple[dict[str, np.ndarray], str, int | None]:
    """(params, architecture, k) of an SAE given as jaxsae.analysis.codes.SAEEntry (params, cfg), a dict
    {"params": {...}, "architecture", "k"}, or a flat dict of arrays plus "architecture" / "k".

    params: float32 numpy W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d], and `threshold` ([] for
    batchtopk, [F] for an imported jumprelu) or `log_threshold` [F] (jumprelu); raw-input (folded) units.
    """
    if hasattr(entry, "params") and hasattr(entry, "cfg"):
        return dict(entry.params), entry.cfg.architecture, getattr(entry, "k", entry.cfg.k)
    params = entry.get("params", entry)
    arrays = {k: np.asarray(v, np.float32) for k, v in params.items() if k in _PARAM_KEYS}
    return arrays, str(entry.get("architecture", "batchtopk")), entry.get("k")


_PARAM_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold")


def layer_number(layer: int | str) -> int:
    """1-based encoder layer from 2, "2" or "layer_2"."""
    return int(str(layer).removeprefix("layer_"))


class TorchSAE(torch.nn.Module):
    """jaxsae.sae.encode/decode in inference mode, float32, on raw activations [..., d] -> [..., d]."""

    def __init__(self, params: Mapping[str, np.ndarray], architecture: str, k: int | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {architecture!r}; expected one of {ARCHITECTURES}")
        if architecture == "topk" and not k:
            raise ValueError("a topk SAE needs k")
        self.architecture, self.k = architecture, k
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            self.register_buffer(name, torch.tensor(np.asarray(params[name], np.float32)))
        self.register_buffer("theta", _threshold(params, architecture))

    @classmethod
    def from_entry(cls, entry: Any) -> TorchSAE:
        return cls(*sae_spec(entry))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] float32 -> codes [..., F]: f((x - b_dec) W_enc + b_enc)."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return pre * (pre > self.theta)
        acts = torch.relu(pre)
        if self.architecture == "batchtopk":
            return torch.where(acts > self.theta, acts, 0.0)
        if self.architecture == "topk":
            top = torch.topk(acts, self.k, dim=-1)
            return torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        return acts

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., F] -> [..., d]: codes W_dec + b_dec."""
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _threshold(params: Mapping[str, np.ndarray], architecture: str) -> torch.Tensor:
    """θ: [F] for jumprelu (exp(log θ) or an imported `threshold`), [] for batchtopk, unused 0 otherwise."""
    if architecture == "jumprelu":
        if "log_threshold" in params:
            return torch.exp(torch.tensor(np.asarray(params["log_threshold"], np.float32)))
        return torch.tensor(np.asarray(params["threshold"], np.float32))
    if architecture == "batchtopk":
        return torch.tensor(np.asarray(params["threshold"], np.float32).reshape(()))
    return torch.zeros(())


# ------------------------------------------------------------------------------------------ the hook
Edit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EncoderEdit:
    """While active (`with`), rewrites the output of encoder block `layer` (1-based): out -> edit(out, mask).

    out: [B, T, d] float32 (T = 1500); mask: bool [B, T], True on each clip's kept frames (set `keep`, an
    int [B] of kept frames per example, before each forward pass; None marks every frame as kept).
    `EncoderEdit.many(model, {layer: edit})` edits several blocks in the same pass.
    """

    def __init__(self, model: Any, layer: int | str, edit: Edit):
        self.blocks = {layer_number(layer): edit}
        self.layers, self.keep, self._handles = model.model.encoder.layers, None, []

    @classmethod
    def many(cls, model: Any, edits: Mapping[int | str, Edit]) -> EncoderEdit:
        self = cls.__new__(cls)
        self.blocks = {layer_number(n): e for n, e in edits.items()}
        self.layers, self.keep, self._handles = model.model.encoder.layers, None, []
        return self

    def _hook(self, edit: Edit) -> Callable:
        def hook(_module, _inputs, out: torch.Tensor) -> torch.Tensor:
            if not isinstance(out, torch.Tensor):  # transformers < 5 returned a tuple: fail loudly
                raise TypeError(f"encoder block returned {type(out).__name__}, expected a tensor")
            batch, frames = out.shape[:2]
            keep = torch.full((batch,), frames) if self.keep is None else torch.as_tensor(self.keep)
            return edit(out, torch.arange(frames)[None, :] < keep[:, None])

        return hook

    def __enter__(self) -> EncoderEdit:
        for n, edit in self.blocks.items():
            self._handles.append(self.layers[n - 1].register_forward_hook(self._hook(edit)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def splice_edit(sae: TorchSAE, stats: dict | None = None) -> Edit:
    """Kept frames -> the SAE's reconstruction. With `stats`, accumulates on the kept frames the squared
    error ('sse'), the sum of x and of ‖x‖² and the frame count, for the layer's FVE."""

    def edit(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        recon = sae(out)
        if stats is not None:
            x, r = out[mask].double(), recon[mask].double()
            stats["sse"] = stats.get("sse", 0.0) + float(((x - r) ** 2).sum())
            _accumulate(stats, x)
        return torch.where(mask[..., None], recon, out)

    return edit


def record_edit(stats: dict) -> Edit:
    """Leaves the output alone; accumulates the sum of x and of ‖x‖² over kept frames and their count."""

    def edit(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _accumulate(stats, out[mask].double())
        return out

    return edit


def replace_edit(value: torch.Tensor) -> Edit:
    """Kept frames -> `value` [d] (the mean frame: mean ablation; zeros: zero ablation)."""
    return lambda out, mask: torch.where(mask[..., None], value.to(out.dtype), out)


def add_edit(vector: torch.Tensor, strength: float) -> Edit:
    """Every frame (padding included) + strength · vector [d]."""
    return lambda out, mask: out + strength * vector.to(out.dtype)


def _accumulate(stats: dict, x: torch.Tensor) -> None:
    stats["sum"] = stats.get("sum", 0.0) + x.sum(0)
    stats["sumsq"] = stats.get("sumsq", 0.0) + float((x**2).sum())
    stats["n"] = stats.get("n", 0) + x.shape[0]


def _fve(stats: dict) -> float:
    """1 − SSE / Σ‖x − x̄‖² over the accumulated frames."""
    total = stats["sumsq"] - float((stats["sum"] ** 2).sum()) / max(stats["n"], 1)
    return 1.0 - stats["sse"] / max(total, 1e-12)


# --------------------------------------------------------------------------------- the evaluation
@dataclass
class SpeechClips:
    """The speech clips of an evaluation: ids, reference texts, their tokens, and prepared batches."""

    ids: list[str]
    refs: list[str]
    targets: list[list[int]]
    batches: list[ClipBatch]


def run_condition(
    model: Any, tok: Any, clips: SpeechClips, edit: EncoderEdit | None, start: int | None, max_new_tokens: int
) -> dict:
    """{"wer", "loss" (mean nats per reference token), "transcripts"} of the speech clips with `edit` active
    (None: clean), the encoder run from block `start` (None: from the features)."""
    hyps, nll, count, pos = [], 0.0, 0, 0
    for batch in clips.batches:
        hidden = encode(model, batch, edit, start)
        dec = greedy_from_encoder(model, hidden, max_new_tokens)
        hyps += [tok.decode(t, skip_special_tokens=True).strip() for t in dec.tokens]
        sums, ns = teacher_forced_nll(model, hidden, clips.targets[pos : pos + len(batch.keep)])
        nll, count, pos = nll + sum(sums), count + sum(ns), pos + len(batch.keep)
    wer, capped = corpus_wer(clips.refs, hyps), capped_wer(clips.refs, hyps)
    return {"wer": wer, "wer_capped": capped, "loss": nll / max(count, 1), "transcripts": hyps}


def reconstruction_cost(
    model: Any,
    processor_or_feature_extractor: Any,
    saes_by_layer: Mapping[Any, Any] | Sequence[Any],
    clips: Sequence[Mapping],
    corpus_dir: str | Path,
    *,
    tokenizer: Any = None,
    baselines: Sequence[str] = ("mean", "zero"),
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_TOKENS,
) -> dict:
    """Whisper's transcripts and loss with encoder layers replaced by SAE reconstructions (kept frames only).

    saes_by_layer: {name or layer: SAE} (an SAE as `sae_spec` takes it; its layer from `entry.layer`,
    entry["layer"] or the key: 2, "layer_2") or a list of jaxsae.analysis.codes.SAEEntry. clips: manifest
    rows; only speech rows with a `text` are used. Returns
        {"n_clips", "n_words", "frames": "kept", "clean": {"wer", "wer_capped", "loss"},
         "saes": {name: {"layer", "wer", "wer_capped", "loss", "fve", "loss_recovered"}},
         "baselines": {layer_name: {"mean_ablation": {"wer", "wer_capped", "loss"}, "zero_ablation"}},
         "examples": [{"clip", "reference", "clean", <sae name>: transcript, ...}]}
    wer: corpus WER of greedy transcripts (wer_capped: the mean over clips of min(WER, 1)); loss: mean
    teacher-forced cross-entropy per reference token (nats, <|endoftext|> included); fve: of the SAE on
    the spliced frames; loss_recovered = (L_mean_ablation − L_sae) / (L_mean_ablation − L_clean) (1: as
    good as clean, 0: as bad as the mean).
    The mean-ablation frame is the clean layer output averaged over the evaluated clips' kept frames.
    """
    fe, tok = feature_extractor_and_tokenizer(processor_or_feature_extractor, tokenizer)
    saes = _named_saes(saes_by_layer)
    layers = sorted({layer for layer, _ in saes.values()})
    stats: dict[int, dict] = {n: {} for n in layers}
    speech = _speech_clips(model, fe, tok, clips, corpus_dir, layers, stats, batch_size)
    runs = {"clean": run_condition(model, tok, speech, None, min(layers, default=None), max_new_tokens)}
    out = {"n_clips": len(speech.ids), "n_words": sum(len(normalize_text(r)) for r in speech.refs)}
    out |= {"frames": "kept", "clean": _public(runs["clean"]), "saes": {}, "baselines": {}}
    for n in layers:
        out["baselines"][f"layer_{n}"] = {
            f"{b}_ablation": _public(
                run_condition(model, tok, speech, _ablation(model, n, b, stats[n]), n, max_new_tokens)
            )
            for b in baselines
        }
    for name, (n, sae) in saes.items():
        fve_stats: dict = {}
        runs[name] = run_condition(
            model, tok, speech, EncoderEdit(model, n, splice_edit(sae, fve_stats)), n, max_new_tokens
        )
        row = {"layer": f"layer_{n}", **_public(runs[name]), "fve": _fve(fve_stats)}
        mean = out["baselines"][f"layer_{n}"].get("mean_ablation")
        if mean:
            gap = mean["loss"] - runs["clean"]["loss"]
            row["loss_recovered"] = (mean["loss"] - row["loss"]) / gap if gap > 0 else None
        out["saes"][name] = row
    out["examples"] = _examples(speech, runs)
    return out


def _speech_clips(model, fe, tok, rows, corpus_dir, layers, stats, batch_size) -> SpeechClips:
    """Speech rows with a text, loaded and run clean once (recording each layer's kept-frame statistics)."""
    chosen = [r for r in rows if r.get("domain", "speech") == "speech" and r.get("text")]
    if not chosen:
        raise ValueError("reconstruction_cost needs speech clips with a 'text' label")
    refs = [str(r["text"]) for r in chosen]
    recorder = EncoderEdit.many(model, {n: record_edit(stats[n]) for n in layers})
    batches = prepare_batches(model, fe, load_clips(chosen, corpus_dir), layers, batch_size, recorder)
    return SpeechClips([str(r.get("id")) for r in chosen], refs, reference_tokens(tok, refs), batches)


def _ablation(model: Any, layer: int, kind: str, stats: dict) -> EncoderEdit:
    if kind == "mean":
        value = (stats["sum"] / stats["n"]).float()
    elif kind == "zero":
        value = torch.zeros(model.config.d_model)
    else:
        raise ValueError(f"unknown baseline {kind!r}; expected 'mean' or 'zero'")
    return EncoderEdit(model, layer, replace_edit(value))


def _public(run: dict) -> dict:
    return {"wer": run["wer"], "wer_capped": run["wer_capped"], "loss": run["loss"]}


def _named_saes(saes: Mapping[Any, Any] | Sequence[Any]) -> dict[str, tuple[int, TorchSAE]]:
    """{name: (layer number, TorchSAE)} from a mapping or a list of SAEEntry-like objects."""
    if isinstance(saes, Mapping):
        items = list(saes.items())
    else:
        items = [(getattr(e, "name", None) or e.get("name", i), e) for i, e in enumerate(saes)]
    out = {}
    for key, entry in items:
        layer = getattr(entry, "layer", None) or (entry.get("layer") if isinstance(entry, Mapping) else None)
        n = layer_number(layer if layer is not None else key)
        out[f"layer_{key}" if isinstance(key, int) else str(key)] = (n, TorchSAE.from_entry(entry))
    return out


def _examples(speech: SpeechClips, runs: dict[str, dict], n: int = 6) -> list[dict]:
    """The first `n` clips' reference and transcript under every condition."""
    return [
        {
            "clip": speech.ids[i],
            "reference": speech.refs[i],
            **{k: r["transcripts"][i] for k, r in runs.items()},
        }
        for i in range(min(n, len(speech.ids)))
    ]
