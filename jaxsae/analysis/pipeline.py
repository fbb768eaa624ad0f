"""`analyze`: every analysis of a checkpoint's SAEs on their activation stores, written to out_dir.

Rows: at most `max_rows` (default 20000) per layer, whole aligned 1024-row blocks chosen with `seed`
(export shuffles rows across clips, so blocks are a fair sample); the same blocks in every layer, so the
SAEs of all layers see the same frames (cross-layer matching needs that).

Writes out_dir/figures.json (every figure, JSON-safe: NaN as null) and out_dir/features.json
({sae name: [per feature: firing rate, domain shares, Fisher-top labels, top frames and clips, mean mel
profile]}, the format jaxsae.analysis.report reads), then the HTML report (report.write_report) and,
when `model_side`, Whisper's cost of each splice and the steering sweep (encoders.splice,
encoders.steering; torch is imported only then).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxsae.analysis import AnalysisError
from jaxsae.analysis import acoustics as ac
from jaxsae.analysis import features as ft
from jaxsae.analysis import probing as pr
from jaxsae.analysis.codes import (
    RowTable,
    SAEEntry,
    StoreRows,
    align_rows,
    decode_codes,
    encode_rows,
    load_saes,
    pick_blocks,
    read_store_rows,
    row_labels,
)
from jaxsae.analysis.reconstruction import reconstruction_metrics, reconstruction_table
from jaxsae.analysis.stability import MATCH_THRESHOLD, pairwise_stability
from jaxsae.analysis.unlearning import unlearn_label
from jaxsae.store import ActivationStore, open_store

DOMAIN_ORDER = ("speech", "music", "sounds", "silence")


@dataclass(frozen=True)
class Settings:
    """Knobs of `analyze`; the defaults suit the demo (4 SAEs of 1536 latents, 20k rows: a few minutes)."""

    max_rows: int = 20_000
    seed: int = 0
    match_threshold: float = MATCH_THRESHOLD
    specialised: float = ft.SPECIALISED
    probe_ks: tuple[int, ...] = pr.DEFAULT_KS
    probe_max_rows: int = 20_000
    test_fraction: float = pr.TEST_FRACTION
    dci_alpha: float = 0.01
    dci_max_rows: int = 10_000
    unlearn_n: int = 10
    unlearn_draws: int = 5
    unlearn_max_rows: int = 8_000
    top_rows: int = 8
    top_clips: int = 5
    fisher_top: int = 10
    steer_top_n: int = 32  # latents in the steering vector
    steer_clips: int = 20  # non-speech and speech clips (each) in the steering sweep
    splice_clips: int = 24  # speech clips Whisper transcribes per condition of the splice study


@dataclass
class Inputs:
    """Everything the per-SAE analyses share: rows per layer, what they are, and their descriptors."""

    entries: list[SAEEntry]
    rows: dict[str, StoreRows]
    table: RowTable
    stores: dict[str, ActivationStore]
    corpus_dir: Path | None
    corpus_rows: list[dict] | None
    descriptors: np.ndarray | None = None  # [N, 3] acoustics.DESCRIPTORS
    mels: np.ndarray | None = None  # [N, n_mels] log-mel per row (NaN where unknown)
    domains: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- entry


def analyze(
    ckpt: str | Path,
    store_dir: str | Path,
    out_dir: str | Path,
    corpus_dir: str | Path | None = None,
    model_side: bool = True,
    *,
    layer: str | int | None = None,
    settings: Settings | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    """Runs every analysis and writes out_dir/figures.json and features.json (and the report). `layer`
    names the store layer of an SAE whose checkpoint does not say (an import) when the store holds
    several; `overrides` replace Settings fields (e.g. max_rows=5000). Returns the figures, each keyed
    by SAE name below its section:
        saes [{name, layer, seed, k, d_sae, architecture}], meta (inputs, settings, labels, domains),
        reconstruction {table [per SAE], firing_histograms}, domains (specialisation), fisher (top features
        per label), probing {label: {frame, clip}}, disentanglement (DCI), readout (pitch, loudness,
        timbre), unlearning {label: [per class]}, stability (all SAE pairs: seeds and layers), and
        splice + steering (model side) or model_side {"skipped": why}.
    """
    from tqdm.auto import tqdm

    s = dataclasses.replace(settings or Settings(), **overrides)
    inp = load_inputs(ckpt, store_dir, corpus_dir, layer, s)  # before the bar: its errors are one line
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=4 + len(inp.entries), desc="analyze", unit="stage", disable=not progress, dynamic_ncols=True
    )
    with bar:
        bar.set_postfix_str("acoustics and mels")
        _add_descriptors(inp)
        bar.update()
        figures, features, codes = _empty_figures(inp, ckpt, store_dir, s), {}, {}
        for e in inp.entries:
            bar.set_postfix_str(e.name)
            codes[e.name] = encode_rows(e, inp.rows[e.layer].acts)
            features[e.name] = analyze_sae(e, codes[e.name], inp, s, figures)
            bar.update()
        figures["reconstruction"]["table"] = reconstruction_table(inp.entries, figures.pop("_metrics"))
        bar.set_postfix_str("stability")
        figures["stability"] = pairwise_stability(codes, s.match_threshold)
        bar.update()
        bar.set_postfix_str("writing")
        _write(out, figures, features)
        bar.update()
        bar.set_postfix_str("report and model side")
        _report_and_model(out, figures, features, inp, codes, s, model_side)
        bar.update()
    return figures


# ------------------------------------------------------------------------------------------ inputs


def load_inputs(ckpt, store_dir, corpus_dir, layer, s: Settings) -> Inputs:
    """SAEs, their stores, the analysed rows of every layer (aligned), and the row labels."""
    from jaxsae.data import store_layers

    paths = store_layers(Path(store_dir))
    if not paths:
        raise AnalysisError(f"{store_dir}: no activation store here (no manifest.json, no layer_<n>/)")
    entries = _place(load_saes(ckpt), paths, layer)
    stores = {name: open_store(paths[name], read_only=True) for name in sorted({e.layer for e in entries})}
    for e in entries:
        if stores[e.layer].d != e.cfg.d_in:
            raise AnalysisError(
                f"{e.name}: takes rows of width {e.cfg.d_in}, {paths[e.layer]} holds {stores[e.layer].d}"
            )
    blocks = pick_blocks(min(st.num_rows for st in stores.values()), s.max_rows, s.seed)
    rows = align_rows({n: read_store_rows(st, blocks, s.max_rows) for n, st in stores.items()})
    first = next(iter(stores.values()))
    corpus = Path(corpus_dir) if corpus_dir else find_corpus(first)
    corpus_rows = read_corpus(corpus) if corpus else None
    r0 = next(iter(rows.values()))
    table = row_labels(first, r0.clip, r0.frame, corpus_rows)
    present = set(table.domain.tolist()) - {""}
    domains = [d for d in DOMAIN_ORDER if d in present] + sorted(present - set(DOMAIN_ORDER))
    return Inputs(entries, rows, table, stores, corpus, corpus_rows, domains=domains)


def _place(entries: list[SAEEntry], paths: dict[str, Path], layer) -> list[SAEEntry]:
    """Each SAE with its store layer: the checkpoint's, else `layer`, else the store's only layer."""
    out = []
    for e in entries:
        name = e.layer
        if name is None:
            if layer is None and len(paths) != 1:
                raise AnalysisError(
                    f"the checkpoint does not say which layer {e.name} was trained on and the store holds "
                    f"{', '.join(paths)}: pass --layer"
                )
            name = f"layer_{str(layer).removeprefix('layer_')}" if layer is not None else next(iter(paths))
            e = dataclasses.replace(e, layer=name, name=f"{name}_{e.name}")
        if name not in paths:
            raise AnalysisError(f"{e.name}: the store has no {name} (have {', '.join(paths)})")
        out.append(e)
    return out


def find_corpus(store: ActivationStore) -> Path | None:
    """The corpus folder (holding manifest.jsonl) that the store's clips came from: found through the
    first clip record's audio path (absolute, relative to the working folder, or to a folder above the
    store), else a `corpus/` folder beside the store's parent (the demo's layout)."""
    records = store.manifest["clips"]
    if records:
        rel = Path(next(iter(records.values()))["path"])
        bases = [Path.cwd(), *store.path.resolve().parents]
        for cand in [rel] if rel.is_absolute() else [b / rel for b in bases]:
            for folder in (cand.parent, cand.parent.parent):
                if cand.is_file() and (folder / "manifest.jsonl").is_file():
                    return folder
    for up in store.path.resolve().parents[:3]:
        if (up / "corpus" / "manifest.jsonl").is_file():
            return up / "corpus"
    return None


def read_corpus(corpus_dir: Path) -> list[dict]:
    """Rows of corpus_dir/manifest.jsonl, in order (store clip i is row i)."""
    path = Path(corpus_dir) / "manifest.jsonl"
    if not path.is_file():
        raise AnalysisError(f"{corpus_dir}: no manifest.jsonl (pass the corpus folder with --corpus)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _audio_paths(inp: Inputs) -> dict[int, Path]:
    """Store clip id -> audio file: the corpus manifest's path under the corpus folder, else the store's."""
    out = {}
    for cid, row in inp.table.clips.items():
        p = Path(str(row.get("path", "")))
        if inp.corpus_dir is not None and not p.is_absolute():
            p = inp.corpus_dir / p
        out[cid] = p
    return out


def _add_descriptors(inp: Inputs) -> None:
    """Per-row acoustic descriptors from the audio, and per-row log-mel from jaxsae.analysis.media when
    it is there; left None when the audio is not found."""
    meta = next(iter(inp.stores.values())).meta
    hop = int(round(meta.sample_rate / meta.frame_rate))
    paths = _audio_paths(inp)
    if any(p.is_file() for p in paths.values()):
        t = inp.table
        inp.descriptors = ac.row_descriptors(t.clip, t.frame, paths, meta.sample_rate, hop)
    if inp.corpus_rows is not None and _has_module("jaxsae.analysis.media") and _has_module("transformers"):
        from jaxsae.analysis.media import frame_mels

        used = [inp.corpus_rows[c] for c in sorted(inp.table.clips)]  # only the clips analysed
        inp.mels = rows_from_clips(frame_mels(inp.corpus_dir, used), inp)


def rows_from_clips(per_clip: dict, inp: Inputs) -> np.ndarray:
    """[N, M] per-row values from {clip id (corpus id or store index): [n_frames, M]}; NaN where missing."""
    t = inp.table
    width = next((np.asarray(v).shape[1] for v in per_clip.values()), 0)
    out = np.full((len(t), width), np.nan)
    for cid in t.clips:
        key = str(t.clips[cid].get("id", cid))
        values = per_clip.get(key, per_clip.get(cid))
        if values is None:
            continue
        rows = np.nonzero(t.clip == cid)[0]
        ok = t.frame[rows] < len(values)
        out[rows[ok]] = np.asarray(values)[t.frame[rows[ok]]]
    return out


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# ------------------------------------------------------------------------------------------ per SAE


def _empty_figures(inp: Inputs, ckpt, store_dir, s: Settings) -> dict:
    t = inp.table
    saes = [{"name": e.name, "layer": e.layer, "seed": e.seed, "k": e.k, "d_sae": e.cfg.d_sae,
             "architecture": e.cfg.architecture} for e in inp.entries]  # fmt: skip
    meta = {
        "checkpoint": str(ckpt),
        "store": str(store_dir),
        "corpus": str(inp.corpus_dir) if inp.corpus_dir else None,
        "n_rows": len(t),
        "n_clips": len(t.clips),
        "settings": dataclasses.asdict(s),
        "labels": list(t.labels),
        "domains": inp.domains,
        "descriptors": list(ac.DESCRIPTORS) if inp.descriptors is not None else None,
        "frame_rate": next(iter(inp.stores.values())).meta.frame_rate,
    }  # fmt: skip
    keys = ("domains", "fisher", "probing", "disentanglement", "readout", "unlearning")
    return {
        "saes": saes,
        "meta": meta,
        "reconstruction": {"firing_histograms": {}},
        "_metrics": {},
        **{k: {} for k in keys},
    }


def analyze_sae(e: SAEEntry, codes, inp: Inputs, s: Settings, figures: dict) -> dict:
    """Fills figures[...][e.name] for one SAE; returns its features.json entry."""
    acts, t = inp.rows[e.layer].acts, inp.table
    metrics = reconstruction_metrics(acts, decode_codes(e, codes), codes)
    figures["reconstruction"]["firing_histograms"][e.name] = metrics.pop("firing_histogram")
    figures["_metrics"][e.name] = metrics
    domains = _domain_column(inp)
    shares, _ = ft.domain_shares(codes, domains, inp.domains)
    figures["domains"][e.name] = domain_figure(shares, inp.domains, s.specialised)
    fisher = {name: ft.fisher_scores(codes, labels) for name, labels in t.labels.items()}
    figures["fisher"][e.name] = {n: _top_scores(f, s.fisher_top) for n, f in fisher.items()}
    figures["probing"][e.name] = {n: _probe(codes, acts, labels, t.clip, s) for n, labels in t.labels.items()}
    figures["disentanglement"][e.name] = _dci(codes, inp, s)
    figures["readout"][e.name] = readout(codes, acts, inp, s)
    figures["unlearning"][e.name] = {n: _unlearn(codes, lab, t.clip, s) for n, lab in t.labels.items()}
    return feature_entries(e, codes, inp, s, shares, fisher)


def _domain_column(inp: Inputs) -> np.ndarray:
    return np.asarray([d if d else None for d in inp.table.domain], dtype=object)


def domain_figure(shares: np.ndarray, domains: list[str], threshold: float) -> dict:
    """Counts of specialised features per domain and a histogram of each domain's share (alive only)."""
    alive = shares.sum(1) > 0
    spec = ft.specialised(shares, threshold)
    hist = {
        d: np.histogram(shares[alive, i], bins=np.linspace(0, 1, 21))[0].tolist()
        for i, d in enumerate(domains)
    }
    return {
        "domains": domains,
        "threshold": threshold,
        "by": "count",
        "n_alive": int(alive.sum()),
        "specialised": {d: int((spec == i).sum()) for i, d in enumerate(domains)},
        "specialised_fraction": float((spec >= 0).sum() / max(alive.sum(), 1)),
        "share_histogram": {"edges": np.linspace(0, 1, 21).round(2).tolist(), "counts": hist},
    }


def _top_scores(scores: np.ndarray, n: int) -> dict:
    top = np.argsort(-scores, kind="stable")[:n]
    return {"features": top.tolist(), "scores": scores[top].tolist()}


def _probe(codes, acts, labels, clip, s: Settings) -> dict:
    return pr.probe_table(
        codes,
        acts,
        labels,
        clip,
        s.probe_ks,
        seed=s.seed,
        max_rows=s.probe_max_rows,
        test_fraction=s.test_fraction,
    )


def _unlearn(codes, labels, clip, s: Settings) -> list[dict]:
    split = pr.split_by_clip(labels, clip, s.test_fraction, s.seed)
    split = pr.Split(pr._cap(split.train, s.unlearn_max_rows, s.seed), split.test)
    return unlearn_label(codes, labels, split, s.unlearn_n, s.unlearn_draws, s.seed)


def _clip_split(inp: Inputs, mask: np.ndarray, s: Settings) -> pr.Split:
    """A by-clip split of the rows in `mask` (all one class), for regressions."""
    labels = np.where(mask, "all", None).astype(object)
    return pr.split_by_clip(labels, inp.table.clip, s.test_fraction, s.seed)


def _dci(codes, inp: Inputs, s: Settings) -> dict | None:
    """DCI against the acoustic descriptors on the rows where all three are defined (voiced, not silent)."""
    if inp.descriptors is None:
        return None
    ok = np.isfinite(inp.descriptors).all(1)
    split = _clip_split(inp, ok, s)
    split = pr.Split(
        pr._cap(split.train, s.dci_max_rows, s.seed), pr._cap(split.test, s.dci_max_rows, s.seed + 1)
    )
    if split.train.sum() < 10 or split.test.sum() < 10:
        return None
    res = pr.dci(codes, inp.descriptors, split, s.dci_alpha)
    imp = res.pop("importance")
    res["factors"] = list(ac.DESCRIPTORS)
    res["top_codes"] = {f: np.argsort(-imp[:, j])[:5].tolist() for j, f in enumerate(ac.DESCRIPTORS)}
    return res | {"n_train": int(split.train.sum()), "n_test": int(split.test.sum())}


def readout(codes, acts, inp: Inputs, s: Settings) -> dict:
    """Pitch and loudness (ridge R², frame level, from the acoustic descriptors) and timbre (probe
    accuracy, frame level) read out of all SAE features, each against the dense activations."""
    out: dict = {}
    if inp.descriptors is not None:
        for j, name in ((0, "pitch"), (1, "loudness")):
            target = inp.descriptors[:, j]
            split = _clip_split(inp, np.isfinite(target), s)
            out[name] = {
                "sae_r2": pr.ridge_r2(codes, target, split),
                "dense_r2": pr.ridge_r2(acts, target, split),
            }
    timbre = inp.table.labels.get("timbre")
    if timbre is not None:
        split = pr.split_by_clip(timbre, inp.table.clip, s.test_fraction, s.seed)
        out["timbre"] = {
            "sae_accuracy": pr.probe_accuracy(codes, timbre, split),
            "dense_accuracy": pr.probe_accuracy(acts, timbre, split),
            "chance": pr.chance(timbre, split),
        }
    return out


# ----------------------------------------------------------------------------------- features.json


def feature_entries(
    e: SAEEntry, codes, inp: Inputs, s: Settings, shares: np.ndarray, fisher: dict
) -> list[dict]:
    """The features.json list of one SAE (the format jaxsae.analysis.report reads), per feature:
    {"id", "firing_rate", "domain_shares": {domain: share}, "specialised": domain or None,
    "top_labels": {label: {class: share of the feature's firing}} for its 3 labels of highest Fisher
    score, "fisher": [{"label", "score", "class" (highest mean activation)}], "top_frames": [{"clip",
    "store_clip", "frame", "time_s", "activation"}], "top_clips": [{"clip", "store_clip",
    "mean_activation"}], "mean_mel": [n_mels] (when the log-mel is known)}."""
    t = inp.table
    rates = np.asarray(codes.getnnz(axis=0)) / max(codes.shape[0], 1)
    top = ft.top_activations(codes, t.clip, s.top_rows, s.top_clips)
    spec = ft.specialised(shares, s.specialised)
    fisher_top = _fisher_per_feature(codes, t.labels, fisher)
    class_shares = {name: ft.domain_shares(codes, labels) for name, labels in t.labels.items()}
    mel = ft.mean_profile(codes, inp.mels) if inp.mels is not None else None
    rate = float(next(iter(inp.stores.values())).meta.frame_rate)
    feats = []
    for j in range(codes.shape[1]):
        f = {
            "id": j,
            "firing_rate": float(rates[j]),
            "domain_shares": {d: round(float(v), 4) for d, v in zip(inp.domains, shares[j], strict=True)},
            "specialised": inp.domains[spec[j]] if spec[j] >= 0 else None,
            "top_labels": {x["label"]: _shares(class_shares[x["label"]], j) for x in fisher_top[j]},
            "fisher": fisher_top[j],
            "top_frames": _frames(top, j, t, rate),
            "top_clips": _clips(top, j, t),
        }
        if mel is not None and np.isfinite(mel[j]).all():
            f["mean_mel"] = mel[j].round(3).tolist()
        feats.append(f)
    return feats


def _shares(shares_and_classes: tuple[np.ndarray, list], j: int) -> dict:
    shares, classes = shares_and_classes
    return {str(c): round(float(v), 4) for c, v in zip(classes, shares[j], strict=True) if v > 0}


def _fisher_per_feature(codes, labels: dict, fisher: dict, n: int = 3) -> list[list[dict]]:
    """Per feature, its `n` labels with the highest Fisher score: {"label", "score", "class"} where class
    is the one with the highest mean activation."""
    names = list(fisher)
    if not names:
        return [[] for _ in range(codes.shape[1])]
    scores = np.stack([fisher[nm] for nm in names], 1)  # [F, L]
    best = {}
    for nm in names:
        means, classes = ft.class_means(codes, labels[nm])
        best[nm] = np.asarray(classes, dtype=object)[means.argmax(0)]
    out = []
    for j in range(codes.shape[1]):
        order = [i for i in np.argsort(-scores[j], kind="stable")[:n] if scores[j, i] > 0]
        out.append(
            [{"label": names[i], "score": float(scores[j, i]), "class": best[names[i]][j]} for i in order]
        )
    return out


def _frames(top: ft.TopActivations, j: int, t: RowTable, frame_rate: float) -> list[dict]:
    out = []
    for r, v in zip(top.rows[j], top.row_values[j], strict=True):
        if r < 0:
            break
        f = int(t.frame[r])
        out.append({"clip": str(t.clip_id[r]), "store_clip": int(t.clip[r]), "frame": f,
                    "time_s": round(f / frame_rate, 3), "activation": float(v)})  # fmt: skip
    return out


def _clips(top: ft.TopActivations, j: int, t: RowTable) -> list[dict]:
    out = []
    for c, v in zip(top.clips[j], top.clip_values[j], strict=True):
        if c < 0:
            break
        cid = str(t.clips[int(c)].get("id", c))
        out.append({"clip": cid, "store_clip": int(c), "mean_activation": float(v)})
    return out


# ------------------------------------------------------------------------------------ writing, report


def json_safe(obj):
    """`obj` with numpy scalars and arrays as Python values and non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _write(out: Path, figures: dict, features: dict) -> None:
    for name, obj in (("figures.json", figures), ("features.json", features)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(json_safe(obj), allow_nan=False))
        tmp.replace(out / name)


def _report_and_model(
    out: Path, figures: dict, features: dict, inp: Inputs, codes: dict, s: Settings, model: bool
):
    """Model-side studies (they add "splice" and "steering" to figures), then the report, which rewrites
    figures.json with them."""
    if model:
        figures |= model_side_figures(inp, codes, s)
    else:
        figures["model_side"] = {"skipped": "--no-model"}
    _write(out, figures, features)
    if _has_module("jaxsae.analysis.report"):
        from jaxsae.analysis.report import write_report

        write_report(out, json_safe(figures), json_safe(features), inp.corpus_dir)


def model_side_figures(inp: Inputs, codes: dict, s: Settings) -> dict:
    """{"splice": Whisper's WER and loss with each SAE spliced in, "steering": the steering sweep}, or
    {"model_side": {"skipped": why}}. torch is imported from here on only."""
    encoder = next(iter(inp.stores.values())).meta.encoder
    why = None
    if "whisper" not in encoder.lower():
        why = f"the model-side studies run Whisper tiny.en; the store holds {encoder}"
    elif inp.corpus_dir is None or inp.corpus_rows is None:
        why = "no corpus (pass --corpus): the model-side studies need the audio"
    elif not (_has_module("torch") and _has_module("encoders.splice") and _has_module("encoders.steering")):
        why = "torch is not installed (the `torch` extra)"
    if why:
        return {"model_side": {"skipped": why}}
    from encoders.splice import reconstruction_cost
    from encoders.whisper_ct2 import load_whisper_tiny_en

    model, fe, tok = load_whisper_tiny_en()
    speech = _pick(
        inp.corpus_rows, lambda r: r.get("domain") == "speech" and r.get("text"), s.splice_clips, s.seed
    )
    splice = reconstruction_cost(
        model, fe, inp.entries, speech, inp.corpus_dir, tokenizer=tok, baselines=("mean",)
    )
    return {"splice": splice, "steering": _steering(model, fe, tok, inp, codes, s)}


def _steering(model, fe, tok, inp: Inputs, codes: dict, s: Settings) -> dict:
    """The sweep with the steering vector of the first SAE of the deepest layer, from the mean codes of
    non-speech and speech frames of the analysed rows."""
    from encoders.steering import frame_groups, steering_sweep, steering_vector

    e = [x for x in inp.entries if x.layer == inp.entries[-1].layer][0]
    t = inp.table
    rate = next(iter(inp.stores.values())).meta.frame_rate
    groups = frame_groups(t.clips, t.clip, t.frame, rate)
    x = codes[e.name]
    rows = inp.corpus_rows
    is_speech = lambda r: r.get("domain") == "speech" and r.get("text")  # noqa: E731
    n_speech = sum(bool(is_speech(r)) for r in rows)
    n = min(s.steer_clips, n_speech // 2, (len(rows) - n_speech) // 2)  # at most half of each held out
    nonspeech = _pick(rows, lambda r: r.get("domain") != "speech", n, s.seed)
    speech = _pick(rows, is_speech, n, s.seed)
    # The vector comes from the frames of the other clips: the sweep's clips are held out.
    held_out = {str(r["id"]) for r in nonspeech + speech}
    groups = np.where(np.isin(t.clip_id.astype(str), list(held_out)), "held_out", groups)
    if not ((groups == "speech").any() and (groups == "non_speech").any()):
        return {"skipped": "the analysed rows need both speech and non-speech frames"}
    mean = {g: np.asarray(x[np.nonzero(groups == g)[0]].mean(0)).ravel() for g in ("non_speech", "speech")}
    vector = steering_vector(e, mean["non_speech"], mean["speech"], s.steer_top_n)
    out = steering_sweep(model, fe, tok, e.layer, vector, nonspeech, speech, corpus_dir=inp.corpus_dir)
    return {"sae": e.name, "top_n": s.steer_top_n, **out}


def _pick(rows: list[dict], keep, n: int, seed: int) -> list[dict]:
    """At most n of the rows that `keep` accepts: a seeded choice, in manifest order."""
    chosen = [r for r in rows if keep(r)]
    if len(chosen) <= n:
        return chosen
    idx = np.sort(np.random.default_rng(seed).choice(len(chosen), n, replace=False))
    return [chosen[i] for i in idx]
