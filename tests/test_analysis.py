"""jaxsae.analysis on planted data where the answer is known, each number checked against an independent
numpy computation; plus `jaxsae analyze` end to end on a tiny trained checkpoint and a tiny store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from jaxsae.analysis import features as ft
from jaxsae.analysis import probing as pr
from jaxsae.analysis import stability as st
from jaxsae.analysis.acoustics import frame_descriptors, row_descriptors
from jaxsae.analysis.reconstruction import firing_rates, reconstruction_metrics
from jaxsae.analysis.unlearning import unlearn_label

DOMAINS = ["speech", "music", "sounds"]


def _sparse_codes(n: int, f: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, f)) < density) * rng.uniform(0.5, 2.0, (n, f))


def _clips_and_labels(n_clips: int, frames: int, classes: list[str], seed: int = 0):
    """clip [N] and a clip-level label [N] (object), classes cycling over clips."""
    clip = np.repeat(np.arange(n_clips), frames)
    labels = np.asarray([classes[c % len(classes)] for c in clip], dtype=object)
    perm = np.random.default_rng(seed).permutation(clip.size)  # rows shuffled, as export writes them
    return clip[perm], labels[perm]


# ------------------------------------------------------------------------------------- features


def test_domain_shares_and_specialised_features():
    rng = np.random.default_rng(0)
    domains = np.asarray(rng.choice(DOMAINS, 600), dtype=object)
    codes = _sparse_codes(600, 6, 0.3, 1)
    codes[:, 0] *= domains == "speech"  # fires on speech rows only
    codes[:, 1] = 0.0  # never fires
    codes[:, 2] = np.where(domains == "music", 1.0, 0.0) + (np.arange(600) % 10 == 0)  # mostly music
    shares, order = ft.domain_shares(sp.csr_matrix(codes), domains, DOMAINS)
    fired = codes > 0
    want = np.stack([(fired & (domains == d)[:, None]).sum(0) for d in DOMAINS], 1) / np.maximum(
        fired.sum(0)[:, None], 1
    )
    np.testing.assert_allclose(shares, want, atol=1e-12)
    assert order == DOMAINS and shares[0].tolist() == [1.0, 0.0, 0.0] and shares[1].sum() == 0
    spec = ft.specialised(shares, 0.8)
    assert spec[0] == 0 and spec[1] == -1 and spec[2] == 1 and (spec[3:] == -1).all()
    mass, _ = ft.domain_shares(codes, domains, DOMAINS, by="mass")
    want_mass = np.stack([(codes * (domains == d)[:, None]).sum(0) for d in DOMAINS], 1)
    want_mass = want_mass[2:]
    np.testing.assert_allclose(mass[2:], want_mass / want_mass.sum(1, keepdims=True), atol=1e-12)


def _fisher_reference(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    keep = np.asarray([v is not None for v in labels])
    x, labels = x[keep], labels[keep]
    mu = x.mean(0)
    between = sum((labels == c).sum() * (x[labels == c].mean(0) - mu) ** 2 for c in set(labels))
    within = sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum(0) for c in set(labels))
    return between / (within + 1e-12)


def test_fisher_scores_match_numpy_and_rank_the_carrier_first():
    clip, labels = _clips_and_labels(30, 20, ["a", "b", "c"])
    codes = _sparse_codes(labels.size, 12, 0.2, 2)
    codes[:, 7] = (labels == "b") * 1.5 + 0.1 * np.random.default_rng(3).random(labels.size)
    labels[:25] = None  # unlabelled rows are left out
    scores = ft.fisher_scores(sp.csr_matrix(codes), labels)
    np.testing.assert_allclose(scores, _fisher_reference(codes, labels), rtol=1e-9)
    assert np.argmax(scores) == 7
    binary = np.asarray([None if v is None else v == "b" for v in labels], dtype=object)
    np.testing.assert_allclose(ft.class_fisher_scores(codes, labels, "b"), _fisher_reference(codes, binary))
    means, classes = ft.class_means(codes, labels)
    np.testing.assert_allclose(means[classes.index("b")], codes[labels == "b"].mean(0))


def test_top_activations_and_mean_profile_match_brute_force():
    rng = np.random.default_rng(4)
    codes = _sparse_codes(200, 5, 0.1, 5)
    codes[:, 4] = 0.0
    clip = rng.integers(0, 9, 200)
    top = ft.top_activations(sp.csr_matrix(codes), clip, n_rows=3, n_clips=2)
    for j in range(4):
        order = np.argsort(-codes[:, j], kind="stable")[:3]
        assert top.rows[j].tolist() == order.tolist()
        np.testing.assert_allclose(top.row_values[j], codes[order, j], rtol=1e-6)
        per_clip = np.asarray([codes[clip == c, j].mean() for c in range(9)])
        assert top.clips[j].tolist() == np.argsort(-per_clip, kind="stable")[:2].tolist()
        np.testing.assert_allclose(top.clip_values[j], np.sort(per_clip)[::-1][:2], rtol=1e-6)
    assert (top.rows[4] == -1).all() and (top.clips[4] == -1).all()
    values = rng.standard_normal((200, 3))
    values[0] = np.nan  # an unknown row is left out
    prof = ft.mean_profile(codes, values)
    w = codes[1:]
    np.testing.assert_allclose(prof[:4], (w.T @ values[1:])[:4] / w.sum(0)[:4, None], rtol=1e-9)
    assert np.isnan(prof[4]).all()


def test_reconstruction_metrics_match_numpy():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((300, 8)) + 2.0
    recon = x + 0.3 * rng.standard_normal(x.shape)
    codes = _sparse_codes(300, 10, 0.05, 7)
    codes[:, 0] = 1.0  # fires everywhere: dense
    codes[:, 1] = 0.0  # dead
    m = reconstruction_metrics(x, recon, sp.csr_matrix(codes))
    fve = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["fve"] == pytest.approx(fve) and m["nmse"] == pytest.approx(1 - fve)
    assert m["mse"] == pytest.approx(np.mean((x - recon) ** 2))
    assert m["l0"] == pytest.approx((codes != 0).sum(1).mean())
    rates = (codes != 0).mean(0)
    assert m["dead_fraction"] == pytest.approx(np.mean(rates == 0))
    assert m["dense_fraction"] == pytest.approx(np.mean(rates > 0.1))
    hist = m["firing_histogram"]
    assert hist["dead"] == 1 and sum(hist["counts"]) == 9
    assert hist["counts"][-1] >= 1  # the always-on latent lands in the last bin (log10 rate 0)
    np.testing.assert_allclose(firing_rates(sp.csr_matrix(codes)), rates)


# ------------------------------------------------------------------------------------- stability


def test_hungarian_recovers_a_permutation_of_features():
    rng = np.random.default_rng(8)
    a = _sparse_codes(2000, 24, 0.1, 9)
    a[:, 5] = 0.0  # a dead feature
    perm = rng.permutation(24)
    b = a[:, perm] * (1 + 0.05 * rng.standard_normal(a.shape))  # b's column j is a's feature perm[j]
    corr = st.correlation_matrix(sp.csr_matrix(a), sp.csr_matrix(b))
    alive, inverse = a.std(0) > 0, np.argsort(perm)  # a's feature i is b's column inverse[i]
    idx = np.nonzero(alive)[0]
    ref = np.corrcoef(a[:, idx].T, b[:, inverse[idx]].T)[: idx.size, idx.size :]
    np.testing.assert_allclose(corr[np.ix_(idx, inverse[idx])], ref, atol=1e-9)
    assert (corr[5] == 0).all()
    match = st.match_features(sp.csr_matrix(a), sp.csr_matrix(b), threshold=0.7)
    assert (match.b_index[alive] == inverse[alive]).all()
    s = match.summary()
    assert s["fraction_matched_alive"] == 1.0 and s["fraction_matched"] == pytest.approx(23 / 24)
    assert s["mean_max_corr"] > 0.95 and s["n_alive"] == 23
    unrelated = st.match_features(sp.csr_matrix(a), sp.csr_matrix(_sparse_codes(2000, 24, 0.1, 10)))
    assert unrelated.summary()["fraction_matched"] == 0.0
    pw = st.pairwise_stability({"x": a, "y": b, "z": _sparse_codes(2000, 24, 0.1, 11)})
    assert pw["names"] == ["x", "y", "z"] and pw["fraction_matched"][0][1] == pytest.approx(23 / 24)
    assert pw["fraction_matched"][0][2] == 0.0 and set(pw["pairs"]) == {"x|y", "x|z", "y|z"}


# ------------------------------------------------------------------------------------- probes


def _carrier_data(seed: int = 0):
    """Codes where class "yes" rows have feature 3 on; 20 noise features; clip-level labels."""
    clip, labels = _clips_and_labels(40, 15, ["yes", "no"], seed)
    codes = _sparse_codes(labels.size, 20, 0.15, seed + 1)
    codes[:, 3] = (labels == "yes") * np.random.default_rng(seed).uniform(1.0, 2.0, labels.size)
    return sp.csr_matrix(codes), labels, clip


def test_split_is_by_clip_and_stratified():
    clip, labels = _clips_and_labels(20, 5, ["a", "b"])
    labels[clip == 0] = None
    split = pr.split_by_clip(labels, clip, 0.25, seed=1)
    assert not set(clip[split.train]) & set(clip[split.test])
    assert not (split.train | split.test)[clip == 0].any()
    test_clips = set(clip[split.test].tolist())
    assert {labels[clip == c][0] for c in test_clips} == {"a", "b"}
    assert len(test_clips) == round(0.25 * 9) + round(0.25 * 10)  # per class: 9 "a" clips, 10 "b"


def test_topk_probe_finds_the_carrier_and_beats_chance():
    codes, labels, clip = _carrier_data()
    split = pr.split_by_clip(labels, clip)
    assert pr.topk_features(codes, labels, split, 1).tolist() == [3]
    acc = pr.topk_probes(codes, labels, split, ks=(1, 4))
    assert acc[1] == 1.0 and acc[4] >= 0.95 and pr.chance(labels, split) <= 0.6
    noise_only = sp.csr_matrix(codes.toarray() * (np.arange(20) != 3))
    assert pr.topk_probes(noise_only, labels, split, ks=(1,))[1] < 0.75
    dense = np.random.default_rng(2).standard_normal((labels.size, 6)) + (labels == "yes")[:, None]
    table = pr.probe_table(codes, dense, labels, clip, ks=(1,))
    assert table["frame"]["sae"][1] == 1.0 and table["clip"]["sae"][1] == 1.0
    assert table["clip"]["n_train"] + table["clip"]["n_test"] == 40 and table["frame"]["dense"] > 0.7
    pooled, ids = pr.pool_by_clip(codes, clip)
    np.testing.assert_allclose(pooled[5], codes.toarray()[clip == ids[5]].mean(0))


def test_unlearning_the_carrier_drops_more_than_random_features():
    codes, labels, clip = _carrier_data(1)
    split = pr.split_by_clip(labels, clip)
    res = {r["class"]: r for r in unlearn_label(codes, labels, split, n=1, draws=5, seed=0)}
    yes = res["yes"]
    assert yes["top_features"] == [3] and yes["base"] == 1.0
    assert yes["drop_top"] > 0.9 and abs(yes["drop_random_mean"]) < 0.1
    assert yes["drop_top"] > yes["drop_random_mean"] + 3 * yes["drop_random_sd"]


def test_dci_of_one_code_per_factor_is_disentangled():
    rng = np.random.default_rng(3)
    n = 1200
    z = rng.standard_normal((n, 3))
    noise = _sparse_codes(n, 5, 0.1, 4)
    clip = np.arange(n) // 10
    split = pr.split_by_clip(np.full(n, "x", dtype=object), clip)
    res = pr.dci(np.hstack([np.maximum(z + 3, 0), noise]), z, split, alpha=0.01)
    assert res["disentanglement"] > 0.95 and res["completeness"] > 0.95 and res["informativeness"] > 0.95
    # codes c = z (J − 2I) + 10: factor j = ½ Σ_{i≠j} (c_i − 10), so each factor reads two codes equally and
    # each code serves two factors: D = C = 1 − log_3 2
    mixed = dict(pr.dci(z @ (np.ones((3, 3)) - 2 * np.eye(3)) + 10, z, split, alpha=0.001))
    assert mixed["disentanglement"] == pytest.approx(1 - np.log(2) / np.log(3), abs=0.03)
    assert mixed["completeness"] == pytest.approx(1 - np.log(2) / np.log(3), abs=0.03)
    assert pr.dci_scores(np.eye(3))["disentanglement"] == pytest.approx(1.0)
    flat = pr.dci_scores(np.ones((4, 2)))
    assert flat["disentanglement"] == pytest.approx(0.0) and flat["completeness"] == pytest.approx(0.0)
    p = np.array([[0.6, 0.4], [0.0, 1.0]])  # hand-worked: D_0 = 1 - H_2(0.6, 0.4), D_1 = 1, ρ = (0.5, 0.5)
    h = -(0.6 * np.log2(0.6) + 0.4 * np.log2(0.4))
    assert pr.dci_scores(p)["disentanglement"] == pytest.approx(0.5 * (1 - h) + 0.5)


def test_ridge_readout_r2():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 4))
    y = x[:, 0] * 2 + 0.1 * rng.standard_normal(400)
    split = pr.split_by_clip(np.full(400, "x", dtype=object), np.arange(400) // 8)
    assert pr.ridge_r2(x, y, split) > 0.99
    assert pr.ridge_r2(x[:, 1:], y, split) < 0.1


# ------------------------------------------------------------------------------------- acoustics


def test_acoustic_descriptors_of_known_signals(tmp_path):
    from scipy.io import wavfile

    sr = 16000
    t = np.arange(sr) / sr
    for hz in (110.0, 440.0, 1000.0):
        wave = 0.5 * np.sin(2 * np.pi * hz * t)
        d = frame_descriptors(wave, sr, 40)
        np.testing.assert_allclose(d["pitch_midi"][:-2], 69 + 12 * np.log2(hz / 440), atol=0.1)
        rms = [np.sqrt(np.mean(wave[320 * i : 320 * i + 400] ** 2)) for i in range(40)]
        np.testing.assert_allclose(d["loudness_db"], 20 * np.log10(rms), atol=1e-9)
        np.testing.assert_allclose(d["centroid_hz"][:-2], hz, rtol=0.1, atol=30)
    noise = frame_descriptors(0.1 * np.random.default_rng(0).standard_normal(sr), sr, 40)
    assert np.isnan(noise["pitch_midi"]).mean() > 0.8 and np.nanmedian(noise["centroid_hz"]) > 3000
    silent = frame_descriptors(np.zeros(sr), sr, 10)
    assert np.isnan(silent["pitch_midi"]).all() and (silent["loudness_db"] == -120).all()
    wavfile.write(tmp_path / "a.wav", sr, (0.5 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16))
    rows = row_descriptors(np.array([0, 0, 1]), np.array([3, 7, 0]), {0: tmp_path / "a.wav"}, sr, 320)
    np.testing.assert_allclose(rows[:2, 0], 57.0, atol=0.1)
    assert np.isnan(rows[2]).all()


# ------------------------------------------------------------------------------------- end to end

N_CLIPS, FRAMES, D = 48, 25, 16  # 1200 rows: one whole 1024-row block and a short one
CORPUS_DOMAINS = ("speech", "music", "sounds", "silence")


def _corpus(root: Path) -> list[dict]:
    """48 half-second clips (wavs + manifest.jsonl) cycling over domains; music clips are sines of known
    pitch with a timbre label, speech clips have a voice."""
    from scipy.io import wavfile

    (root / "audio").mkdir(parents=True)
    rng, rows = np.random.default_rng(0), []
    t = np.arange(FRAMES * 320) / 16000
    for i in range(N_CLIPS):
        domain = CORPUS_DOMAINS[i % 4]
        row = {"id": f"{domain}-{i:04d}", "path": f"audio/{domain}-{i:04d}.wav", "domain": domain}
        wave = 0.05 * rng.standard_normal(t.size)
        if domain == "music":
            row |= {"timbre": ("sine", "square")[(i // 4) % 2], "pitch_midi": 57 + i % 12}
            wave = 0.3 * np.sin(2 * np.pi * 440 * 2 ** ((row["pitch_midi"] - 69) / 12) * t)
        if domain == "speech":
            row |= {"voice": ("en-us", "en+m3")[(i // 4) % 2], "text": f"sentence {i}"}
        if domain == "silence":
            wave = np.zeros_like(t)
        wavfile.write(root / row["path"], 16000, (wave * 32767).astype(np.int16))
        rows.append(row)
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _store(root: Path, corpus: Path, rows: list[dict]) -> None:
    """layer_2 and layer_4 stores of planted rows: each domain adds its own atom, so domain is readable;
    rows shuffled as export writes them, clip ids = manifest positions, records as export writes them."""
    from jaxsae.store import StoreMeta, create_store

    rng = np.random.default_rng(1)
    clip = np.repeat(np.arange(N_CLIPS, dtype=np.int32), FRAMES)
    frame = np.tile(np.arange(FRAMES, dtype=np.int32), N_CLIPS)
    perm = rng.permutation(clip.size)
    records = {
        i: {
            "path": str(corpus / r["path"]),
            "labels": {k: v for k, v in r.items() if k != "path"},
            "n_frames": FRAMES,
        }
        for i, r in enumerate(rows)
    }
    for layer in (2, 4):
        atoms = rng.standard_normal((4, D))
        dom = np.asarray([i % 4 for i in clip])
        acts = 3 * atoms[dom] + rng.standard_normal((clip.size, D))
        store = create_store(
            root / f"layer_{layer}", StoreMeta("test", "0", layer, "h", 16000, 50.0, "float32", D)
        )
        store.append(
            acts[perm], clip[perm], frame[perm], clips_done=list(range(N_CLIPS)), clip_records=records
        )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(run folder, store folder, corpus folder): a checkpoint of 2 layers × 2 seeds of topk SAEs (16 -> 32,
    k 4) as the trainer writes it at step 0 (init_states + checkpoint.save: the analysis needs SAEs, not
    good ones, and this skips compiling a training step)."""
    from jaxsae import checkpoint
    from jaxsae.config import DataConfig, MeshConfig, RunConfig, SAEConfig, TrainConfig
    from jaxsae.data import load_source, sample_rows
    from jaxsae.loader import batch_dataset, batch_iterator
    from jaxsae.sae import estimate_input_scale
    from jaxsae.sharding import make_mesh
    from jaxsae.step import init_states

    root = tmp_path_factory.mktemp("analysis")
    _store(root / "store", root / "corpus", _corpus(root / "corpus"))
    cfg = RunConfig(
        sae=SAEConfig(d_in=D, d_sae=32, architecture="topk", k=4),
        data=DataConfig(source=str(root / "store"), layers=(2, 4)),
        train=TrainConfig(batch_size=256, seeds=(0, 1), out_dir=str(root / "run"), progress=False),
        mesh=MeshConfig(data=1),
    )
    source = load_source(cfg.data, D)
    samples = np.stack([sample_rows(rows, 1024, 0, "tiny") for rows in source.layers])
    state = init_states(cfg, samples, [estimate_input_scale(x) for x in samples], make_mesh(cfg.mesh))
    mgr = checkpoint.manager(root / "run" / "checkpoints")
    batches = batch_iterator(batch_dataset(source, cfg.train.batch_size, 0))
    checkpoint.save(mgr, state, cfg, batches, {"tokens_seen": 0})
    mgr.wait_until_finished()
    mgr.close()
    return root / "run", root / "store", root / "corpus"


def test_load_saes_encode_and_row_labels(tiny_run):
    import jax.numpy as jnp

    from jaxsae import sae
    from jaxsae.analysis.codes import encode_rows, load_saes, row_labels
    from jaxsae.checkpoint import load
    from jaxsae.store import open_store

    run, store_dir, corpus = tiny_run
    entries = load_saes(run)
    assert [e.name for e in entries] == [
        "layer_2_seed_0",
        "layer_2_seed_1",
        "layer_4_seed_0",
        "layer_4_seed_1",
    ]
    ckpt = load(run)
    store = open_store(store_dir / "layer_4", read_only=True)
    x = np.asarray(store.read_rows(0, 300), np.float32)
    raw = {k: jnp.asarray(v[3]) for k, v in ckpt.params.items()}
    want = np.asarray(sae.encode(entries[3].cfg, raw, jnp.asarray(x * ckpt.input_scale[3])))
    np.testing.assert_allclose(encode_rows(entries[3], x, batch=128).toarray(), want, rtol=1e-5, atol=1e-5)
    clip, frame = store.read_clip_frame(0, 300)
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    table = row_labels(store, clip, frame, rows)
    assert list(table.labels) == ["domain", "timbre", "voice"]  # text and id are not classes
    assert table.clip_id[0] == rows[clip[0]]["id"] and table.domain[0] == rows[clip[0]]["domain"]
    music = table.domain == "music"
    assert all(v in ("sine", "square") for v in table.labels["timbre"][music])
    assert all(v is None for v in table.labels["timbre"][~music])
    from jaxsae.analysis import AnalysisError

    with pytest.raises(AnalysisError, match="was 'speech-0000' at export"):
        row_labels(store, np.zeros(1, np.int32), np.zeros(1, np.int32), rows[1:])


def test_analyze_end_to_end(tiny_run, tmp_path, capsys, monkeypatch):
    from jaxsae.analysis import media
    from jaxsae.analysis.codes import encode_rows, load_saes

    # Whisper's log-mel (0.4 s a clip) is media's to test; here a stand-in whose 10 ms frame t holds t, so
    # encoder frame i holds 2i + 0.5 and each feature's mean mel profile is known
    monkeypatch.setattr(
        media, "log_mel_10ms", lambda w: np.repeat(np.arange(-(-len(w) // 160.0))[:, None], 80, 1)
    )
    from jaxsae.evaluate import evaluate
    from jaxsae.store import open_store
    from launch import cli

    run, store_dir, corpus = tiny_run
    out = tmp_path / "out"
    assert cli.main([str(run), "--store", str(store_dir), "--out", str(out), "--no-model"][:0] + [
        "analyze", str(run), "--store", str(store_dir), "--out", str(out), "--no-model", "--max-rows", "5000"
    ]) == 0  # fmt: skip
    assert "layer_2_seed_0: FVE" in capsys.readouterr().out
    figures = json.loads((out / "figures.json").read_text())
    feats = json.loads((out / "features.json").read_text())
    names = ["layer_2_seed_0", "layer_2_seed_1", "layer_4_seed_0", "layer_4_seed_1"]
    assert [r["sae"] for r in figures["reconstruction"]["table"]] == names
    assert figures["meta"]["n_rows"] == N_CLIPS * FRAMES and figures["meta"]["corpus"] == str(corpus)
    assert figures["meta"]["domains"] == list(CORPUS_DOMAINS)
    assert figures["stability"]["names"] == names and figures["model_side"] == {"skipped": "--no-model"}
    # every row analysed: the table must equal jaxsae.evaluate on the whole store
    entries = load_saes(run)
    store = open_store(store_dir / "layer_4", read_only=True)
    x = np.asarray(store.read_rows(0, store.num_rows), np.float32)
    from jaxsae.checkpoint import load

    ckpt = load(run)
    want = evaluate(entries[2].cfg, {k: v[2] for k, v in ckpt.params.items()}, float(ckpt.input_scale[2]), x)
    got = figures["reconstruction"]["table"][2]
    for key in ("fve", "l0", "dead_fraction"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert set(figures["probing"]["layer_4_seed_0"]) == {"domain", "timbre", "voice"}
    dom = figures["probing"]["layer_4_seed_0"]["domain"]["frame"]
    assert dom["dense"] > 0.9  # planted: each domain adds its own atom
    dci = figures["disentanglement"]["layer_2_seed_0"]
    assert set(dci) >= {"disentanglement", "completeness", "informativeness"}
    assert set(figures["readout"]["layer_2_seed_0"]) == {"pitch", "loudness", "timbre"}
    assert figures["unlearning"]["layer_2_seed_0"]["domain"][0]["class"] == "music"
    assert list(feats) == names and len(feats["layer_4_seed_0"]) == 32
    assert [f["id"] for f in feats["layer_4_seed_0"]] == list(range(32))
    codes = encode_rows(entries[2], x).toarray()
    clip, frame = store.read_clip_frame(0, store.num_rows)
    ids = [json.loads(line)["id"] for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    for f in feats["layer_4_seed_0"][:8]:
        assert list(f["domain_shares"]) == list(CORPUS_DOMAINS)
        assert f["firing_rate"] == pytest.approx((codes[:, f["id"]] > 0).mean())
        for top in f["top_frames"][:2]:
            row = np.nonzero((clip == top["store_clip"]) & (frame == top["frame"]))[0][0]
            assert top["clip"] == ids[top["store_clip"]]
            assert top["activation"] == pytest.approx(codes[row, f["id"]], rel=1e-5)
        if f["top_frames"]:
            assert f["top_frames"][0]["activation"] == pytest.approx(codes[:, f["id"]].max(), rel=1e-5)
            a = codes[:, f["id"]]
            np.testing.assert_allclose(f["mean_mel"], [(a @ (2 * frame + 0.5)) / a.sum()] * 80, rtol=1e-3)
    assert (out / "index.html").is_file()


def test_analyze_errors_are_one_line(tiny_run, tmp_path, capsys):
    from launch import cli

    run, _, _ = tiny_run
    assert cli.main(["analyze", str(run), "--store", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxsae: error:") and "no activation store" in err and "\n" not in err


def test_an_imported_sae_takes_the_store_layer(tmp_path):
    import jax

    from jaxsae import sae as jsae
    from jaxsae.analysis import AnalysisError
    from jaxsae.analysis.codes import load_saes
    from jaxsae.analysis.pipeline import _place
    from jaxsae.config import SAEConfig
    from jaxsae.export import export_sae, import_to_checkpoint

    cfg = SAEConfig(d_in=D, d_sae=32, architecture="topk", k=4)
    params = {k: np.asarray(v) for k, v in jsae.init(cfg, jax.random.key(0)).items()}
    export_sae(cfg, params, 2.0, "saelens", tmp_path / "exp", hook_name="h", model_name="m")
    (entry,) = load_saes(import_to_checkpoint(tmp_path / "exp", tmp_path / "run"))
    assert entry.layer is None and entry.name == "seed_0"
    folded = jsae.fold_input_scale(params, 2.0)
    for key in ("W_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(entry.params[key], folded[key], rtol=1e-5, atol=1e-6)
    one = {"layer_3": tmp_path}
    assert _place([entry], one, None)[0].layer == "layer_3"
    two = {"layer_3": tmp_path, "layer_5": tmp_path}
    assert _place([entry], two, 5)[0].name == "layer_5_seed_0"
    with pytest.raises(AnalysisError, match="pass --layer"):
        _place([entry], two, None)


def test_an_sae_imported_from_dictionary_learning_gets_every_analysis(tiny_run, tmp_path, monkeypatch):
    """AudioSAE publishes dictionary_learning folders: exported there, imported back (`jaxsae import`),
    then `jaxsae analyze --layer 4`: every analysis has its figures, and the reconstruction equals the
    original SAE's on the same rows."""
    from jaxsae.analysis import media
    from jaxsae.export import export_checkpoint, import_to_checkpoint
    from launch import cli

    monkeypatch.setattr(media, "log_mel_10ms", lambda w: np.zeros((-(-len(w) // 160), 80)))
    run, store_dir, _ = tiny_run
    folder = export_checkpoint(run, "dictionary-learning", tmp_path / "dl")[2]  # layer 4, seed 0
    imported = import_to_checkpoint(folder, tmp_path / "imported")
    out = tmp_path / "out"
    argv = ["analyze", str(imported), "--store", str(store_dir), "--out", str(out), "--no-model"]
    assert cli.main([*argv, "--layer", "4"]) == 0
    figures = json.loads((out / "figures.json").read_text())
    (row,) = figures["reconstruction"]["table"]
    name = row["sae"]
    assert name.startswith("layer_4") and row["layer"] == "layer_4"
    for section in ("domains", "fisher", "probing", "disentanglement", "readout", "unlearning"):
        assert figures[section].get(name), section
    assert json.loads((out / "features.json").read_text())[name]
    original = cli.main(["analyze", str(run), "--store", str(store_dir), "--out", str(tmp_path / "o2"),
                         "--no-model"])  # fmt: skip
    assert original == 0
    want = json.loads((tmp_path / "o2" / "figures.json").read_text())["reconstruction"]["table"][2]
    assert row["fve"] == pytest.approx(want["fve"], abs=1e-4) and row["l0"] == pytest.approx(want["l0"])
