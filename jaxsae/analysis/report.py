"""The analysis report: one self-contained HTML page (inline CSS, JS and SVG; media beside it in media/).

`write_report(out_dir, figures, features, corpus_dir)` writes out_dir/index.html, out_dir/figures.json and
out_dir/media/<sae>/f<id>_<j>.{png,wav}. It opens from file:// with no network. The page holds:
- summary tables of every section of `figures` (known sections first, in `SECTIONS` order, then the rest
  through a generic renderer for nested JSON), an SVG firing-rate histogram per SAE and the steering curve;
- a feature browser: a search box (SAE name, feature id, label, domain; words are ANDed), the matching
  features, and a feature page (#feature/<sae>/<id>): firing rate, domain-share bars, top labels, mean mel
  profile, mel crops and playable snippets of its top frames, top frames and clips.

`features` = {sae_name: [{"id": int, "firing_rate": float, "domain_shares": {domain: share},
"top_labels": {label: share} or {key: {value: share}}, "top_frames": [{"clip", "frame", "activation"}],
"top_clips": [{"clip", "mean_activation"}], "mean_mel": [80 floats]}]}; every key but "id" may be missing.
A clip is a manifest row id (str) or a store clip id (int: the row's position in manifest.jsonl).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxsae.analysis import media

SECTIONS = (  # (figures key, title): rendered first, in this order
    ("saes", "SAEs"),
    ("reconstruction", "Reconstruction per layer and SAE"),
    ("splice", "Whisper with each SAE spliced in (transcripts and loss)"),
    ("stability", "Stability across seeds and layers"),
    ("probing", "Probing"),
    ("disentanglement", "Disentanglement"),
    ("unlearning", "Unlearning (feature removal)"),
    ("steering", "Steering towards non-speech"),
)
MAX_TABLE_ROWS = 200
MAX_LIST = 24  # entries kept per feature for top frames / clips / labels


def write_report(
    out_dir: str | Path,
    figures: Mapping[str, Any],
    features: Mapping[str, Sequence[Mapping]],
    corpus_dir: str | Path | None = None,
    max_features_with_media: int = 64,
    *,
    media_per_feature: int = 3,
    manifest_rows: Sequence[Mapping] | None = None,
    title: str = "jaxsae analysis",
) -> Path:
    """Writes out_dir/index.html (+ figures.json, media/) and returns the index.html path.

    Media (mel crops, WAV snippets of the top `media_per_feature` frames, distinct clips first) are made
    for the `max_features_with_media` most frequently firing features of each SAE, when `corpus_dir` (with
    its manifest.jsonl, or `manifest_rows`) is given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(figures, indent=1, default=_json_default))
    rows = _manifest(corpus_dir, manifest_rows)
    data = {name: [_compact(f) for f in feats] for name, feats in features.items()}
    if rows is not None:
        for name, feats in features.items():
            _make_media(
                out, name, feats, data[name], corpus_dir, rows, max_features_with_media, media_per_feature
            )
    page = _page(title, figures, features, data)
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


# ------------------------------------------------------------------------------------------ inputs
def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _manifest(corpus_dir: str | Path | None, rows: Sequence[Mapping] | None) -> list[Mapping] | None:
    if rows is not None:
        return list(rows)
    path = Path(corpus_dir) / "manifest.jsonl" if corpus_dir else None
    if path is None or not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def resolve_clip(rows: Sequence[Mapping], clip: Any) -> Mapping | None:
    """The manifest row of `clip`: a row id (str), or an int store clip id = position in the manifest."""
    if isinstance(clip, (int, np.integer)) and 0 <= int(clip) < len(rows):
        return rows[int(clip)]
    return next((r for r in rows if str(r.get("id")) == str(clip)), None)


def _num(x: Any, digits: int = 4) -> Any:
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(f"{float(x):.{digits}g}")
    return x.item() if isinstance(x, np.generic) else x


def _compact(f: Mapping) -> dict:
    """A feature as the page's JSON holds it: short keys, rounded numbers, lists cut to MAX_LIST."""
    out: dict[str, Any] = {"id": int(f["id"])}
    if "firing_rate" in f:
        out["fr"] = _num(f["firing_rate"])
    if f.get("domain_shares"):
        out["ds"] = {str(k): _num(v, 3) for k, v in f["domain_shares"].items()}
    if f.get("specialised"):
        out["sp"] = str(f["specialised"])
    if f.get("top_labels"):
        out["tl"] = _labels(f["top_labels"])
    if f.get("fisher"):
        out["fi"] = [_record(r) for r in list(f["fisher"])[:MAX_LIST] if isinstance(r, Mapping)]
    if f.get("top_frames"):
        out["tf"] = [_record(r) for r in list(f["top_frames"])[:MAX_LIST]]
    if f.get("top_clips"):
        out["tc"] = [_record(r) for r in list(f["top_clips"])[:MAX_LIST]]
    if f.get("mean_mel") is not None and len(f["mean_mel"]):
        out["mm"] = [_num(v, 3) for v in np.asarray(f["mean_mel"], np.float64).tolist()]
    return out


def _labels(labels: Mapping) -> dict:
    """{label: share} or {key: {value: share}}, each level cut to its MAX_LIST largest shares."""

    def top(d: Mapping) -> dict:
        items = [(str(k), v) for k, v in d.items() if isinstance(v, (int, float, np.number))]
        return {k: _num(v, 3) for k, v in sorted(items, key=lambda kv: -float(kv[1]))[:MAX_LIST]}

    nested = {str(k): top(v) for k, v in labels.items() if isinstance(v, Mapping)}
    return nested or top(labels)


def _record(r: Mapping) -> dict:
    return {str(k): (_num(v) if not isinstance(v, (str, int)) else v) for k, v in r.items()}


# ------------------------------------------------------------------------------------------- media
def _make_media(out, sae, feats, compact, corpus_dir, rows, max_features, per_feature) -> None:
    """Mel crops and snippets for the most frequent features of one SAE, recorded in compact[i]["media"]."""
    order = sorted(range(len(feats)), key=lambda i: -float(feats[i].get("firing_rate") or 0.0))
    folder = _safe(sae)
    for i in order[:max_features]:
        items = []
        for j, tf in enumerate(_distinct_clips(feats[i].get("top_frames") or [], per_feature)):
            row = resolve_clip(rows, tf.get("clip"))
            if row is None or tf.get("frame") is None:
                continue
            stem = f"media/{folder}/f{int(feats[i]['id'])}_{j}"
            try:
                media.mel_crop_png(corpus_dir, row, int(tf["frame"]), out / f"{stem}.png")
                media.audio_snippet(corpus_dir, row, int(tf["frame"]), out / f"{stem}.wav")
            except (OSError, ValueError, RuntimeError):  # an unreadable clip costs its media, not the report
                continue
            items.append({"img": f"{stem}.png", "wav": f"{stem}.wav", "clip": str(row.get("id")),
                          "frame": int(tf["frame"]), "act": _num(tf.get("activation"))})  # fmt: skip
        if items:
            compact[i]["media"] = items


def _distinct_clips(frames: Sequence[Mapping], n: int) -> list[Mapping]:
    """Up to n top frames, one per clip first, then the rest in order."""
    seen, first, rest = set(), [], []
    for tf in frames:
        (rest if tf.get("clip") in seen else first).append(tf)
        seen.add(tf.get("clip"))
    return (first + rest)[:n]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "sae"


# ------------------------------------------------------------------------------------ HTML: tables
def _esc(x: Any) -> str:
    return html.escape(str(x))


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return _esc(v)
    if isinstance(v, (int, float, np.number)):
        return _esc(_num(v))
    if isinstance(v, str):
        return _esc(v if len(v) <= 300 else v[:300] + "…")
    text = json.dumps(v, default=_json_default)
    return f"<code>{_esc(text if len(text) <= 200 else text[:200] + '…')}</code>"


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, np.number))


def _table(rows: Sequence[Mapping], first: str | None = None) -> str:
    cols: list[str] = [first] if first else []
    for r in rows[:MAX_TABLE_ROWS]:
        cols += [str(k) for k in r if str(k) not in cols]
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows[:MAX_TABLE_ROWS]
    )
    more = (
        f"<p class=note>{len(rows) - MAX_TABLE_ROWS} more rows in figures.json</p>"
        if len(rows) > MAX_TABLE_ROWS
        else ""
    )
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def render_value(value: Any, depth: int = 0) -> str:
    """Generic HTML for nested JSON: records -> a table, {key: scalar} -> a two-column table, {key: {scalars}}
    -> one row per key, other dicts -> a sub-heading per key, deeper than 4 levels -> JSON text."""
    if _scalar(value):
        return f"<p>{_cell(value)}</p>"
    if isinstance(value, Sequence) and not isinstance(value, str):
        if value and all(isinstance(v, Mapping) for v in value):
            return _table(value)
        return f"<p>{_cell(list(value))}</p>"
    if not isinstance(value, Mapping):
        return f"<p>{_cell(value)}</p>"
    if _is_histogram(value):
        return _histogram_svg(value)
    if all(_scalar(v) for v in value.values()):
        return _table([{"key": k, "value": v} for k, v in value.items()])
    if all(isinstance(v, Mapping) and all(_scalar(x) for x in v.values()) for v in value.values()):
        return _table([{"name": k, **v} for k, v in value.items()], first="name")
    if depth >= 4:
        return f"<pre>{_esc(json.dumps(value, indent=1, default=_json_default)[:4000])}</pre>"
    parts = [
        f"<h{min(depth + 3, 6)}>{_esc(k)}</h{min(depth + 3, 6)}>{render_value(v, depth + 1)}"
        for k, v in value.items()
    ]
    return "<div class=nest>" + "".join(parts) + "</div>"


# -------------------------------------------------------------------------------------- HTML: plots
def _is_histogram(value: Mapping) -> bool:
    """{"edges": [n + 1 numbers], "counts": [n numbers], ...}: a histogram (e.g. log10 firing rates)."""
    edges, counts = value.get("edges"), value.get("counts")
    return isinstance(edges, Sequence) and isinstance(counts, Sequence) and len(edges) == len(counts) + 1


def _histogram_svg(value: Mapping) -> str:
    labels = [f"{float(e):g}" for e in value["edges"][:-1]]
    counts = [float(c) for c in value["counts"]]
    if "dead" in value:
        labels, counts = ["dead", *labels], [float(value["dead"]), *counts]
    return svg_bars(labels, counts, "histogram (bins from their left edge)", width=max(420, 22 * len(counts)))


def svg_bars(
    labels: Sequence[str], values: Sequence[float], title: str, width: int = 420, height: int = 180
) -> str:
    """An inline SVG bar chart (values >= 0), labels under the bars."""
    top = max([float(v) for v in values] + [1e-12])
    n, pad = max(len(values), 1), 30
    bw = (width - 2 * pad) / n
    bars = []
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        h = (height - 2 * pad) * float(v) / top
        x, y = pad + i * bw, height - pad - h
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw * 0.85:.1f}" height="{h:.1f}" fill="#4c72b0">'
            f"<title>{_esc(lab)}: {_esc(_num(v))}</title></rect>"
            f'<text x="{x + bw * 0.42:.1f}" y="{height - pad + 12}" font-size="9" text-anchor="middle">'
            f"{_esc(lab)}</text>"
        )
    return (
        f'<svg class=plot width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<text x="{width / 2}" y="14" font-size="12" text-anchor="middle">{_esc(title)}</text>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>'
        f'<text x="4" y="{pad}" font-size="9">{_esc(_num(top, 3))}</text>' + "".join(bars) + "</svg>"
    )


def svg_lines(x: Sequence[float], series: Mapping[str, Sequence[float | None]], title: str, xlabel: str,
              width: int = 520, height: int = 260) -> str:  # fmt: skip
    """An inline SVG line chart of several series over shared x values, with a legend; y from 0."""
    colours = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
    ys = [float(v) for s in series.values() for v in s if v is not None]
    ymax = max(ys + [1e-12]) * 1.05
    x0, x1 = min(x), max(x) if max(x) > min(x) else min(x) + 1
    pad = 40

    def px(v: float) -> float:
        return pad + (width - 2 * pad) * (v - x0) / (x1 - x0)

    def py(v: float) -> float:
        return height - pad - (height - 2 * pad) * v / ymax

    parts = [
        f'<text x="{width / 2}" y="14" font-size="12" text-anchor="middle">{_esc(title)}</text>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#333"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
        f'<text x="{width / 2}" y="{height - 6}" font-size="10" text-anchor="middle">{_esc(xlabel)}</text>',
        f'<text x="4" y="{pad}" font-size="9">{_esc(_num(ymax, 3))}</text>',
    ]
    parts += [
        f'<text x="{px(v):.1f}" y="{height - pad + 12}" font-size="9" text-anchor="middle">'
        f"{_esc(_num(v, 3))}</text>"
        for v in x
    ]
    for k, (name, s) in enumerate(series.items()):
        c = colours[k % len(colours)]
        pts = [(px(float(a)), py(float(b))) for a, b in zip(x, s, strict=True) if b is not None]
        line = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{line}"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>' for a, b in pts]
        parts.append(
            f'<text x="{width - pad - 150}" y="{pad + 12 * k}" font-size="10" fill="{c}">{_esc(name)}</text>'
        )
    box = f'width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
    return f"<svg class=plot {box}>{''.join(parts)}</svg>"


def firing_histogram(rates: Sequence[float], name: str) -> str:
    """SVG histogram of log10 firing rates (dead features in their own bar)."""
    r = np.asarray([float(v) for v in rates if v is not None], np.float64)
    edges = np.arange(-6, 1)
    dead = int((r <= 0).sum())
    counts = np.histogram(np.log10(np.clip(r[r > 0], 1e-6, 1.0)), bins=edges)[0].tolist()
    labels = ["dead"] + [f"1e{e}" for e in edges[:-1]]
    return svg_bars(labels, [dead, *counts], f"{name}: features per log10 firing rate")


def _steering_plot(steering: Any) -> str:
    sweeps = [steering] if isinstance(steering, Mapping) and "sweep" in steering else []
    if isinstance(steering, Mapping) and not sweeps:
        sweeps = [v for v in steering.values() if isinstance(v, Mapping) and "sweep" in v]
    out = []
    for s in sweeps:
        rows = [r for r in s["sweep"] if isinstance(r, Mapping) and "strength" in r]
        keys = [
            k
            for k in (
                "nonspeech_nonempty",
                "nonspeech_nonempty_gated",
                "nonspeech_nonempty_eot_allowed",
                "speech_wer",
                "speech_wer_capped",
            )
            if rows and k in rows[0]
        ]
        if rows and keys:
            x = [float(r["strength"]) for r in rows]
            out.append(svg_lines(x, {k: [r.get(k) for r in rows] for k in keys},
                                 f"steering at {s.get('layer', '?')}", "strength"))  # fmt: skip
    return "".join(out)


# ---------------------------------------------------------------------------------------- the page
def _sections(
    figures: Mapping[str, Any], features: Mapping[str, Sequence[Mapping]]
) -> list[tuple[str, str, str]]:
    """[(anchor, title, html)] for the summary part of the page."""
    out = []
    known = dict(SECTIONS)
    keys = [k for k, _ in SECTIONS if k in figures] + [k for k in figures if k not in known]
    for key in keys:
        body = render_value(figures[key])
        if key == "steering":
            body = _steering_plot(figures[key]) + body
        out.append((f"s-{_safe(key)}", known.get(key, key), body))
    hists = "".join(
        firing_histogram([f.get("firing_rate") for f in feats], name)
        for name, feats in features.items()
        if any(f.get("firing_rate") is not None for f in feats)
    )
    if hists:
        out.append(("s-firing", "Firing rates", hists))
    return out


def _page(title: str, figures: Mapping, features: Mapping, data: Mapping) -> str:
    sections = _sections(figures, features)
    nav = " · ".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_esc(t)}</h2>{h}</section>' for a, t, h in sections)
    blob = json.dumps(data, separators=(",", ":"), default=_json_default).replace("</", "<\\/")
    n_feat = sum(len(v) for v in data.values())
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{_esc(title)}</title><style>{_CSS}</style></head><body>'
        f'<header><h1>{_esc(title)}</h1><nav>{nav} · <a href="#browser">Feature browser</a></nav></header>'
        f"<main>{body}"
        f'<section id="browser"><h2>Feature browser</h2><p class=note>{n_feat} features in {len(data)} SAEs; '
        "media for the most frequent features of each SAE.</p>"
        "<div class=browser><div class=side><input id=search type=search "
        'placeholder="search: sae, id, label, domain (words are ANDed)" autocomplete=off>'
        "<label><input id=mediaonly type=checkbox> with media only"
        "</label><p id=count class=note></p><ul id=list></ul></div><div id=feature class=page>"
        "<p class=note>Pick a feature.</p></div></div></section></main>"
        f'<script id=data type="application/json">{blob}</script><script>{_JS}</script></body></html>'
    )


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}header{background:#f4f4f8;padding:8px 16px}
h1{margin:0 0 4px;font-size:20px}main{padding:0 16px 32px}section{margin:18px 0}
h2{border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:6px 0;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;
text-align:left;vertical-align:top}th{background:#f0f0f0}code{font-size:11px}.note{color:#666;font-size:12px}
.nest{margin-left:10px}.plot{margin:4px 12px 4px 0;border:1px solid #eee}.browser{display:flex;gap:16px}
.side{width:300px;flex:none}#search{width:100%;box-sizing:border-box;padding:4px}#list{list-style:none;
padding:0;max-height:70vh;overflow:auto;margin:4px 0}#list li{padding:2px 4px;cursor:pointer;
border-bottom:1px solid #eee;font-size:12px}#list li:hover,#list li.on{background:#e8eefc}.page{flex:1;
min-width:0}.bar{display:flex;align-items:center;gap:6px;font-size:12px}.bar span.b{display:inline-block;
height:10px;background:#4c72b0}.bar span.l{width:110px}figure{display:inline-block;margin:4px 8px 8px 0}
figure img{display:block;image-rendering:pixelated;border:1px solid #ccc}figcaption{font-size:11px;color:#555}
audio{display:block;width:220px;margin-top:4px}
"""

_JS = r"""
'use strict';
const DATA = JSON.parse(document.getElementById('data').textContent);
const INDEX = [];
for (const [sae, feats] of Object.entries(DATA)) {
  for (const f of feats) {
    const words = [sae, 'f' + f.id, String(f.id), f.sp || ''];
    for (const [d, v] of Object.entries(f.ds || {})) if (v >= 0.2) words.push(d);
    for (const [k, v] of Object.entries(f.tl || {})) {
      words.push(k);
      if (v && typeof v === 'object') words.push(...Object.keys(v).slice(0, 5));
    }
    INDEX.push({sae, f, text: words.join(' ').toLowerCase()});
  }
}
const $ = (id) => document.getElementById(id);
const ENT = {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'};
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ENT[c]);
const fmt = (v) => (typeof v === 'number' ? Number(v.toPrecision(3)) : v);
const LIMIT = 300;

function search() {
  const words = $('search').value.toLowerCase().split(/\s+/).filter(Boolean);
  const media = $('mediaonly').checked;
  const hits = INDEX.filter((e) => (!media || e.f.media) && words.every((w) => e.text.includes(w)));
  const cut = hits.length > LIMIT ? ' (first ' + LIMIT + ' shown)' : '';
  $('count').textContent = hits.length + ' features' + cut;
  $('list').innerHTML = hits.slice(0, LIMIT).map((e) =>
    '<li data-sae="' + esc(e.sae) + '" data-id="' + e.f.id + '">' + esc(e.sae) + ' · f' + e.f.id +
    (e.f.fr !== undefined ? ' · ' + fmt(e.f.fr) : '') + (e.f.media ? ' ♪' : '') + '</li>').join('');
}

function bars(shares) {
  const max = Math.max(1e-9, ...Object.values(shares));
  return Object.entries(shares).sort((a, b) => b[1] - a[1]).map(([k, v]) =>
    '<div class=bar><span class=l>' + esc(k) + '</span><span class=b style="width:' +
    (160 * v / max).toFixed(0) + 'px"></span>' + fmt(v) + '</div>').join('');
}

function melSvg(mm) {
  const w = 320, h = 120, lo = Math.min(...mm), hi = Math.max(...mm) + 1e-9;
  const x = (i) => (10 + i * (w - 20) / Math.max(mm.length - 1, 1)).toFixed(1);
  const y = (v) => (h - 10 - (h - 20) * (v - lo) / (hi - lo)).toFixed(1);
  const pts = mm.map((v, i) => x(i) + ',' + y(v)).join(' ');
  return '<svg width="' + w + '" height="' + h + '" class=plot><polyline fill="none" stroke="#c44e52" ' +
    'stroke-width="2" points="' + pts + '"/><text x="10" y="12" font-size="10">mean log-mel (low → high ' +
    'mel bin), ' + fmt(lo) + ' … ' + fmt(hi) + '</text></svg>';
}

function table(rows) {
  if (!rows || !rows.length) return '';
  const cols = Object.keys(rows[0]);
  return '<table><tr>' + cols.map((c) => '<th>' + esc(c) + '</th>').join('') + '</tr>' + rows.map((r) =>
    '<tr>' + cols.map((c) => '<td>' + esc(fmt(r[c])) + '</td>').join('') + '</tr>').join('') + '</table>';
}

function labels(tl) {
  const nested = Object.values(tl).some((v) => v && typeof v === 'object');
  if (!nested) return bars(tl);
  return Object.entries(tl).map(([k, v]) => '<h4>' + esc(k) + '</h4>' + bars(v)).join('');
}

function show(sae, id) {
  const e = INDEX.find((x) => x.sae === sae && x.f.id === id);
  const page = $('feature');
  if (!e) { page.innerHTML = '<p class=note>No feature ' + esc(sae) + ' / ' + esc(id) + '.</p>'; return; }
  const f = e.f;
  let h = '<h3>' + esc(sae) + ' · feature ' + f.id + '</h3>';
  if (f.fr !== undefined) h += '<p>firing rate ' + fmt(f.fr) + '</p>';
  if (f.media) h += '<div class=media>' + f.media.map((m) =>
    '<figure><img src="' + esc(m.img) + '" alt="mel crop around frame ' + m.frame + '"><figcaption>' +
    esc(m.clip) + ' · frame ' + m.frame + (m.act !== undefined ? ' · act ' + fmt(m.act) : '') +
    '</figcaption><audio controls preload="metadata" src="' + esc(m.wav) + '"></audio></figure>'
  ).join('') + '</div>';
  if (f.sp) h += '<p>specialised: <b>' + esc(f.sp) + '</b></p>';
  if (f.ds) h += '<h4>Domain shares</h4>' + bars(f.ds);
  if (f.tl) h += '<h4>Top labels</h4>' + labels(f.tl);
  if (f.fi) h += '<h4>Fisher scores</h4>' + table(f.fi);
  if (f.mm) h += '<h4>Mean mel profile</h4>' + melSvg(f.mm);
  if (f.tf) h += '<h4>Top frames</h4>' + table(f.tf);
  if (f.tc) h += '<h4>Top clips</h4>' + table(f.tc);
  page.innerHTML = h;
  for (const li of document.querySelectorAll('#list li')) {
    li.classList.toggle('on', li.dataset.sae === sae && +li.dataset.id === id);
  }
}

function route() {
  const m = location.hash.match(/^#feature\/(.+)\/(\d+)$/);
  if (m) show(decodeURIComponent(m[1]), +m[2]);
}

$('search').addEventListener('input', search);
$('mediaonly').addEventListener('change', search);
$('list').addEventListener('click', (ev) => {
  const li = ev.target.closest('li');
  if (li) location.hash = '#feature/' + encodeURIComponent(li.dataset.sae) + '/' + li.dataset.id;
});
window.addEventListener('hashchange', route);
search();
route();
"""
