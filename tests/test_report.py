"""The analysis report (jaxsae.analysis.report, .media) on synthetic figures and features over a tiny corpus
of numpy-made WAVs, then the page in headless Chromium (Debian's chromium + chromedriver through selenium).

The browser test runs whenever /usr/bin/chromium and chromedriver exist (scripts/setup.sh installs them) and
is skipped, saying so, only when they do not. Its screenshot stays in the test's tmp dir (the path is printed;
run with -s to see it): nothing is written into the repository.
"""

import json
import shutil
import struct
import wave
import zlib

import numpy as np
import pytest
import soundfile as sf

from jaxsae.analysis import media
from jaxsae.analysis.report import render_value, resolve_clip, write_report

SR = 16000
TONE_HZ = 1000.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three 2 s clips (a 1 kHz tone, white noise, a 200->3000 Hz sweep) and their manifest rows."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "audio").mkdir()
    t = np.arange(2 * SR) / SR
    waves = {
        "music-0000": 0.3 * np.sin(2 * np.pi * TONE_HZ * t),
        "sounds-0000": 0.05 * np.random.default_rng(0).normal(size=t.size),
        "sounds-0001": 0.3 * np.sin(2 * np.pi * (200 * t + 700 * t**2)),
    }
    rows = []
    for cid, w in waves.items():
        sf.write(root / "audio" / f"{cid}.wav", w.astype(np.float32), SR, subtype="PCM_16")
        rows.append({"id": cid, "path": f"audio/{cid}.wav", "domain": cid.split("-")[0], "kind": cid})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, rows


def _features() -> dict:
    rng = np.random.default_rng(1)

    def feat(i: int, fr: float, clip, domain: str) -> dict:
        return {
            "id": i,
            "firing_rate": fr,
            "domain_shares": {domain: 0.8, "speech": 0.2},
            "top_labels": {"kind": {"tone": 0.7, "noise": 0.3}},
            "specialised": domain,
            "fisher": [{"label": "kind", "score": 1.5, "class": "tone"}],
            "top_frames": [
                {"clip": clip, "frame": 50, "activation": 3.0},
                {"clip": 2, "frame": 10, "activation": 2.0},
            ],
            "top_clips": [{"clip": clip, "mean_activation": 1.5}],
            "mean_mel": rng.normal(size=80).tolist(),
        }

    return {
        "layer_2_seed_0": [feat(0, 0.2, "music-0000", "music"), feat(1, 0.01, 1, "sounds"), {"id": 2}],
        "layer_4_seed_0": [feat(7, 0.05, "sounds-0001", "sounds"), feat(8, 0.0, 0, "music")],
    }


def _figures() -> dict:
    return {
        "reconstruction": {
            "layer_2_seed_0": {"fve": 0.82, "l0": 21.8},
            "layer_4_seed_0": {"fve": 0.95, "l0": 19},
        },
        "splice": {"clean": {"wer": 0.2, "loss": 0.5}, "saes": {"layer_2_seed_0": {"wer": 0.3, "loss": 0.7}}},
        "steering": {
            "layer": "layer_2",
            "sweep": [
                {"strength": s, "nonspeech_nonempty": 1 - s / 10, "speech_wer": 0.2 + s / 50}
                for s in (0, 2, 4, 8)
            ],
        },
        "something_new": {"nested": {"deeper": [1, 2, 3], "table": [{"a": 1, "b": "x"}]}},
    }


def _read_png(path) -> np.ndarray:
    """uint8 [H, W, 3] of an 8-bit RGB PNG with filter 0 rows (what media.write_png writes)."""
    buf = path.read_bytes()
    assert buf[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(buf):
        n, kind = struct.unpack(">I4s", buf[pos : pos + 8])
        data = buf[pos + 8 : pos + 8 + n]
        assert zlib.crc32(kind + data) == struct.unpack(">I", buf[pos + 8 + n : pos + 12 + n])[0]
        if kind == b"IHDR":
            size = struct.unpack(">II", data[:8])
        elif kind == b"IDAT":
            idat += data
        pos += 12 + n
    w, h = size
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_frame_mels_average_whisper_features(corpus):
    from transformers import WhisperFeatureExtractor

    root, rows = corpus
    mels = media.frame_mels(root, rows)
    assert set(mels) == {r["id"] for r in rows}
    wav, _ = sf.read(root / rows[1]["path"], dtype="float32")
    feats = WhisperFeatureExtractor()(wav, sampling_rate=SR, return_tensors="np")
    ref = feats.input_features[0]  # [80, 3000]
    n = int(np.ceil(len(wav) / 320))
    want = ref[:, : 2 * n].T.reshape(n, 2, 80).mean(1)
    assert mels[rows[1]["id"]].shape == (n, 80) and mels[rows[1]["id"]].dtype == np.float32
    np.testing.assert_allclose(mels[rows[1]["id"]], want, atol=1e-5)


def test_mel_crop_marks_the_tone_band(corpus, tmp_path):
    from transformers import WhisperFeatureExtractor

    root, rows = corpus
    path = media.mel_crop_png(root, rows[0], frame=40, out_path=tmp_path / "crop.png", context_frames=20)
    img = _read_png(path)
    assert img.shape == (160, 2 * 2 * (2 * 20 + 1), 3)
    # the brightest row of a 1 kHz tone is the mel bin whose filter peaks at 1 kHz (low bins at the bottom)
    filters = WhisperFeatureExtractor().mel_filters  # [201 fft bins, 80 mels]
    band = int(np.argmax(filters[int(round(TONE_HZ / (SR / 400)))]))
    left = img[:, :40].astype(float).sum(axis=(1, 2))  # columns left of the marker
    assert abs(int(np.argmax(left)) // 2 - (79 - band)) <= 1
    assert (img[:8, 80:84] == 255).all()  # the marker sits over the centre frame


def test_audio_snippet_is_the_clip_around_the_frame(corpus, tmp_path):
    root, rows = corpus
    path = media.audio_snippet(root, rows[2], frame=20, out_path=tmp_path / "s.wav", seconds=1.0)
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (SR, 2, 1)
        got = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32767
    src, _ = sf.read(root / rows[2]["path"], dtype="float64")
    assert len(got) == SR  # 1 s; frame 20 = 0.41 s from the start: the window is shifted to start at 0
    np.testing.assert_allclose(got[100:-100], src[100 : SR - 100], atol=2 / 32767)
    assert abs(got[0]) < 1e-3  # faded in


def test_write_report_files(corpus, tmp_path):
    root, rows = corpus
    assert resolve_clip(rows, 1)["id"] == "sounds-0000" and resolve_clip(rows, "music-0000") is rows[0]
    figures = _figures()
    index = write_report(tmp_path / "r", figures, _features(), corpus_dir=root, max_features_with_media=1)
    assert json.loads((tmp_path / "r" / "figures.json").read_text()) == figures
    page = index.read_text()
    for text in ("Steering towards non-speech", "something_new", "<polyline", "id=search", "Firing rates"):
        assert text in page
    # only the most frequent feature per SAE gets media; two distinct top clips -> two crops and snippets
    pngs = sorted(p.relative_to(tmp_path / "r").as_posix() for p in (tmp_path / "r").rglob("*.png"))
    assert pngs == [
        "media/layer_2_seed_0/f0_0.png",
        "media/layer_2_seed_0/f0_1.png",
        "media/layer_4_seed_0/f7_0.png",
        "media/layer_4_seed_0/f7_1.png",
    ]
    assert len(list((tmp_path / "r").rglob("*.wav"))) == 4
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network


def test_render_value_fallbacks():
    html = render_value({"a": {"x": 1, "y": 2.123456}, "b": {"x": 3}})
    assert "<th>name</th><th>x</th><th>y</th>" in html and "2.123" in html
    assert "<table>" in render_value([{"k": 1}, {"k": 2, "j": "<b>"}])
    assert "&lt;b&gt;" in render_value({"j": "<b>"})
    hist = render_value({"edges": [-2, -1, 0], "counts": [3, 5], "dead": 1})
    assert hist.startswith("<svg") and hist.count("<rect") == 3


# ------------------------------------------------------------------------------------- the browser
def _chromium():
    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chrome and driver):
        pytest.skip(
            "no chromium/chromedriver: scripts/setup.sh installs Debian's chromium and chromium-driver"
        )
    return chrome, driver


def test_report_in_headless_chromium(corpus, tmp_path):
    chrome, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root, _ = corpus
    index = write_report(tmp_path / "r", _figures(), _features(), corpus_dir=root, max_features_with_media=2)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        drv.get(index.as_uri())
        wait = WebDriverWait(drv, 20)
        items = drv.find_elements(By.CSS_SELECTOR, "#list li")
        assert len(items) == 5
        box = drv.find_element(By.ID, "search")
        box.send_keys("layer_4")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#list li")) == 2)
        box.clear()
        box.send_keys("music f0")  # words are ANDed: domain "music" and feature 0
        wait.until(
            lambda d: (
                [li.text for li in d.find_elements(By.CSS_SELECTOR, "#list li")]
                == ["layer_2_seed_0 · f0 · 0.2 ♪"]
            )
        )
        drv.find_element(By.CSS_SELECTOR, "#list li").click()
        wait.until(lambda d: d.execute_script("return location.hash") == "#feature/layer_2_seed_0/0")
        img = drv.find_element(By.CSS_SELECTOR, "#feature figure img")
        wait.until(
            lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
        )
        assert drv.execute_script("return arguments[0].naturalWidth", img) == 4 * (2 * 50 + 1)
        audio = drv.find_element(By.CSS_SELECTOR, "#feature audio")
        wait.until(lambda d: d.execute_script("return arguments[0].readyState", audio) >= 1)
        assert drv.execute_script("return arguments[0].duration", audio) == pytest.approx(1.5, abs=0.01)
        page = drv.find_element(By.ID, "feature").text
        assert "Domain shares" in page and "Fisher scores" in page and "specialised: music" in page
        drv.execute_script("document.getElementById('browser').scrollIntoView()")
        shot = tmp_path / "report.png"
        drv.save_screenshot(str(shot))
        print(f"report screenshot: {shot}")
        assert shot.stat().st_size > 1000
        logs = drv.get_log("browser")
    finally:
        drv.quit()
    errors = [e for e in logs if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
