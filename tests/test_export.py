"""Export to and import from SAELens, dictionary_learning and sparsify, checked against the real libraries:
each export is loaded with the library's own loader and its encode/decode compared with ours on the same
raw activations; each library's own saved SAE is imported and compared the other way.

Ours = jaxsae encode on x·input_scale and decode ÷ input_scale. Peers are imported inside tests only
(`import sae_lens` alone takes ~5 s). Run with `-s` to see the measured differences (lines `MAXDIFF`).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxsae import sae as jsae
from jaxsae.config import SAEConfig
from jaxsae.export import (
    FORMATS,
    ExportError,
    export_checkpoint,
    export_sae,
    import_sae,
    import_to_checkpoint,
)

D_IN, D_SAE, K, SCALE, ROWS = 16, 64, 4, 3.7, 64
TOL = {"float32": 1e-5, "bfloat16": 1e-2}
SUPPORTED = [(f, a) for f, m in FORMATS.items() for a in m.ARCHITECTURES]
UNSUPPORTED = [
    (f, a)
    for f, m in FORMATS.items()
    for a in ("topk", "batchtopk", "jumprelu", "relu")
    if a not in m.ARCHITECTURES
]


# ---------------------------------------------------------------- test SAEs and data


def _cfg(arch: str) -> SAEConfig:
    return SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K)


def _params(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """jaxsae.sae.init plus perturbations: W_enc != W_decᵀ, non-zero biases, thresholds that bite."""
    cfg = _cfg(arch)
    rng = np.random.default_rng(seed)
    p = {k: np.asarray(v) for k, v in jsae.init(cfg, jax.random.key(seed)).items()}
    p["W_enc"] = (p["W_enc"] + 0.1 * rng.standard_normal(p["W_enc"].shape)).astype(np.float32)
    p["b_enc"] = (0.2 * rng.standard_normal(D_SAE)).astype(np.float32)
    p["b_dec"] = (0.5 * rng.standard_normal(D_IN)).astype(np.float32)
    if arch == "jumprelu":
        p["log_threshold"] = np.log(rng.uniform(0.3, 1.2, D_SAE)).astype(np.float32)
    if arch == "batchtopk":
        p["threshold"] = np.float32(0.6)
    return p


def _raw_rows(n: int, seed: int) -> np.ndarray:
    """Raw activations [n, D_IN] float32 (x·SCALE has coordinates of RMS ~1)."""
    rng = np.random.default_rng(seed + 100)
    return ((rng.standard_normal((n, D_IN)) + 0.3) / SCALE).astype(np.float32)


def _ours(cfg: SAEConfig, params: dict, x: np.ndarray, scale: float = SCALE) -> tuple[np.ndarray, np.ndarray]:
    codes = jsae.encode(cfg, params, jnp.asarray(x * scale))
    return np.asarray(codes), np.asarray(jsae.decode(cfg, params, codes)) / scale


def _rows_off_the_edges(cfg: SAEConfig, params: dict, margin: float = 0.02) -> np.ndarray:
    """Raw rows whose pre-activations are more than `margin` from every decision edge (0, θ, top-k's
    k-th/(k+1)-th gap): bf16 rounding of the weights cannot flip a latent there, so L0 must match."""
    x = _raw_rows(2048, 7)
    pre = np.asarray(jsae.pre_activations(params, jnp.asarray(x * SCALE)))
    far = np.abs(pre) > margin
    if cfg.architecture in ("jumprelu", "batchtopk"):
        theta = np.exp(params["log_threshold"]) if cfg.architecture == "jumprelu" else params["threshold"]
        far &= np.abs(pre - theta) > margin
    ok = far.all(1)
    if cfg.architecture == "topk":
        top = -np.sort(-pre, axis=1)
        ok &= (top[:, K - 1] - top[:, K]) > margin
    assert ok.sum() >= ROWS
    return x[ok][:ROWS]


def _check_same(name: str, lib: tuple, ours: tuple, tol: float) -> None:
    """Library (codes, reconstruction) against ours: max abs difference <= tol and the same L0 per row."""
    (lc, lr), (oc, orr) = [tuple(np.asarray(a, np.float32) for a in pair) for pair in (lib, ours)]
    d_codes, d_recon = np.abs(lc - oc).max(), np.abs(lr - orr).max()
    l0_lib, l0_ours = (lc != 0).sum(1), (oc != 0).sum(1)
    print(f"MAXDIFF {name}: codes {d_codes:.2e} recon {d_recon:.2e} L0 {l0_ours.mean():.2f}")
    assert 0 < l0_ours.mean() < D_SAE, "a vacuous test: nothing or everything fires"
    np.testing.assert_array_equal(l0_lib, l0_ours)
    assert d_codes <= tol and d_recon <= tol, (d_codes, d_recon)


# ---------------------------------------------------------------- the libraries, imported lazily


def _torch():
    import torch

    return torch


def _dictionary_learning() -> types.SimpleNamespace:
    """The library's classes and trainers; its nnsight import is stubbed (a CUDA torch otherwise)."""
    stub = types.ModuleType("nnsight")
    stub.LanguageModel = object
    sys.modules.setdefault("nnsight", stub)
    from dictionary_learning import dictionary
    from dictionary_learning.trainers import batch_top_k, jumprelu, standard, top_k

    return types.SimpleNamespace(
        AutoEncoder=dictionary.AutoEncoder,
        JumpReluAutoEncoder=dictionary.JumpReluAutoEncoder,
        AutoEncoderTopK=top_k.AutoEncoderTopK,
        BatchTopKSAE=batch_top_k.BatchTopKSAE,
        TopKTrainer=top_k.TopKTrainer,
        BatchTopKTrainer=batch_top_k.BatchTopKTrainer,
        JumpReluTrainer=jumprelu.JumpReluTrainer,
        StandardTrainer=standard.StandardTrainer,
    )


def _load_with_library(fmt: str, folder: Path, hook: str = "layers.3", **kw):
    """(encode(x) -> dense codes, decode(codes) -> x̂) of the export in `folder`, loaded by the library's
    own loader and computed in float32 (numpy in, numpy out)."""
    torch = _torch()
    if fmt == "saelens":
        from sae_lens import SAE

        model = SAE.load_from_disk(folder, dtype="float32")
        return _np_fns(model.encode, model.decode)
    if fmt == "sparsify":
        from sparsify import Sae

        model = Sae.load_from_disk(folder / hook).float()

        def encode(x):
            acts, idx, _ = model.encode(x)
            return torch.zeros(x.shape[0], model.num_latents).scatter_(1, idx, acts)

        def decode(codes):
            acts, idx = codes.topk(model.cfg.k, dim=1)
            return model.decode(acts, idx)

        return _np_fns(encode, decode)
    dl = _dictionary_learning()
    trainer = json.loads((folder / "trainer_0" / "config.json").read_text())["trainer"]
    cls = getattr(dl, trainer["dict_class"])
    model = cls.from_pretrained(str(folder / "trainer_0" / "ae.pt"), **kw)
    return _np_fns(model.encode, model.decode)


def _np_fns(encode, decode):
    torch = _torch()

    def np_encode(x):
        with torch.no_grad():
            return encode(torch.from_numpy(np.asarray(x, np.float32))).float().numpy()

    def np_decode(codes):
        with torch.no_grad():
            return decode(torch.from_numpy(np.asarray(codes, np.float32))).float().numpy()

    return np_encode, np_decode


# ---------------------------------------------------------------- export: ours -> library


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt,arch", SUPPORTED)
def test_export_matches_the_library(tmp_path, fmt, arch, dtype):
    cfg, params = _cfg(arch), _params(arch)
    out = export_sae(
        cfg, params, SCALE, fmt, tmp_path, hook_name="layers.3", model_name="whisper", dtype=dtype
    )
    x = _rows_off_the_edges(cfg, params) if dtype == "bfloat16" else _raw_rows(ROWS, 0)
    kw = {"normalize_decoder": False} if (fmt, arch) == ("dictionary-learning", "relu") else {}
    encode, decode = _load_with_library(fmt, out, **kw)
    lib_codes = encode(x)
    _check_same(
        f"export {fmt} {arch} {dtype}", (lib_codes, decode(lib_codes)), _ours(cfg, params, x), TOL[dtype]
    )


def test_dictionary_learning_default_loader_renormalises_relu_decoders(tmp_path):
    """AutoEncoder.from_pretrained makes decoder columns unit norm: the reconstruction is unchanged and
    the codes are ours times the folded decoder norms (1/input_scale)."""
    cfg, params = _cfg("relu"), _params("relu")
    out = export_sae(cfg, params, SCALE, "dictionary-learning", tmp_path, hook_name="h", model_name="m")
    encode, decode = _load_with_library("dictionary-learning", out)
    x = _raw_rows(ROWS, 0)
    codes, recon = _ours(cfg, params, x)
    lib_codes = encode(x)
    np.testing.assert_allclose(lib_codes, codes / SCALE, atol=1e-5)
    np.testing.assert_allclose(decode(lib_codes), recon, atol=1e-5)


@pytest.mark.parametrize("fmt,arch", UNSUPPORTED)
def test_unsupported_architecture_is_a_clear_error(tmp_path, fmt, arch):
    with pytest.raises(ExportError, match=f"{fmt} cannot represent architecture '{arch}'"):
        export_sae(_cfg(arch), _params(arch), SCALE, fmt, tmp_path / "x", hook_name="h", model_name="m")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt,arch", SUPPORTED)
def test_export_then_import_gives_the_same_sae(tmp_path, fmt, arch):
    """Our import of our export: the same function of raw activations (dictionary_learning's relu comes
    back with unit decoder rows, as its own loader makes them: codes ÷ input_scale)."""
    cfg, params = _cfg(arch), _params(arch)
    export_sae(cfg, params, SCALE, fmt, tmp_path, hook_name="layers.3", model_name="m")
    got_cfg, got = import_sae(tmp_path)
    assert (got_cfg.architecture, got_cfg.d_in, got_cfg.d_sae) == (arch, D_IN, D_SAE)
    x = _raw_rows(ROWS, 1)
    codes, recon = _ours(cfg, params, x)
    got_codes, got_recon = _ours(got_cfg, got, x, scale=1.0)
    factor = SCALE if (fmt, arch) == ("dictionary-learning", "relu") else 1.0
    np.testing.assert_allclose(got_codes * factor, codes, atol=1e-5)
    np.testing.assert_allclose(got_recon, recon, atol=1e-5)
    if arch in ("topk", "batchtopk"):
        assert got_cfg.k == K


def test_batchtopk_without_a_threshold_exports_with_a_warning(tmp_path):
    """Trained fewer than threshold_start_step steps, θ is still -1: the export works and says it is dense."""
    params = {**_params("batchtopk"), "threshold": np.float32(-1.0)}
    with pytest.warns(UserWarning, match="threshold not set"):
        export_sae(_cfg("batchtopk"), params, SCALE, "saelens", tmp_path, hook_name="h", model_name="m")
    cfg, got = import_sae(tmp_path)
    assert cfg.architecture == "batchtopk" and float(got["threshold"]) == -1.0


def test_batchtopk_exports_to_sparsify_as_topk_when_asked(tmp_path):
    """sparsify holds TopK only: on request a batchtopk SAE goes there as TopK with its k, and sparsify's
    outputs equal our TopK encoder on the same weights."""
    params = _params("batchtopk")
    with pytest.raises(ExportError, match="cannot represent architecture 'batchtopk'"):
        export_sae(_cfg("batchtopk"), params, SCALE, "sparsify", tmp_path / "x", hook_name="h", model_name="")
    out = export_sae(
        _cfg("batchtopk"), params, SCALE, "sparsify", tmp_path, hook_name="layers.3", model_name="m",
        batchtopk_as_topk=True,
    )
    x = _raw_rows(ROWS, 0)
    encode, decode = _load_with_library("sparsify", out)
    lib_codes = encode(x)
    topk = {key: v for key, v in params.items() if key != "threshold"}
    ours = _ours(_cfg("topk"), topk, x)
    _check_same("sparsify batchtopk-as-topk", (lib_codes, decode(lib_codes)), ours, 1e-5)


# ---------------------------------------------------------------- import: library -> ours


def _randomise(module, seed: int, scale: float = 0.3) -> None:
    """Every float parameter of a torch module replaced by N(0, scale²) values (keeps its dtype)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))


def _saelens_sae(arch: str, **cfg_kw):
    import sae_lens

    classes = {
        "topk": ("TopKSAE", {"k": K}),
        "jumprelu": ("JumpReLUSAE", {}),
        "standard": ("StandardSAE", {}),
    }
    name, extra = classes[arch]
    sae = getattr(sae_lens, name)(
        getattr(sae_lens, name + "Config")(d_in=D_IN, d_sae=D_SAE, **extra, **cfg_kw)
    )
    _randomise(sae, 1)
    if arch == "jumprelu":
        with _torch().no_grad():
            sae.threshold.copy_(sae.threshold.abs() * 2)
    return sae


@pytest.mark.parametrize(
    "arch,cfg_kw",
    [
        ("topk", {}),
        ("topk", {"apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True}),
        ("jumprelu", {}),
        ("jumprelu", {"apply_b_dec_to_input": False}),
        ("standard", {}),
    ],
)
def test_import_saelens_saved_by_saelens(tmp_path, arch, cfg_kw):
    sae = _saelens_sae(arch, **cfg_kw)
    sae.save_model(tmp_path)
    cfg, params = import_sae(tmp_path)
    x = _raw_rows(ROWS, 2)
    encode, decode = _np_fns(sae.encode, sae.decode)
    lib_codes = encode(x)
    name = f"import saelens {arch} {cfg_kw or ''}"
    _check_same(name, (lib_codes, decode(lib_codes)), _ours(cfg, params, x, 1.0), TOL["float32"])


def test_import_pre_6_saelens_config_reads_as_saelens_does(tmp_path):
    """A config without sae_lens_version (older SAELens): topk from activation_fn, like the library."""
    from sae_lens import SAE

    sae = _saelens_sae("topk")
    sae.save_model(tmp_path)
    old = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "hook_point": "blocks.0"}
    old |= {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "normalize_activations": False}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    cfg, params = import_sae(tmp_path)
    assert (cfg.architecture, cfg.k) == ("topk", K)
    loaded = SAE.load_from_disk(tmp_path)
    assert loaded.cfg.architecture() == "topk" and loaded.cfg.k == K
    x = _raw_rows(ROWS, 6)
    encode, decode = _np_fns(loaded.encode, loaded.decode)
    lib_codes = encode(x)
    _check_same("import saelens pre-6 topk", (lib_codes, decode(lib_codes)), _ours(cfg, params, x, 1.0), 1e-5)


def _dl_trainer(arch: str):
    """A dictionary_learning trainer of `arch` (its `config` is what trainSAE writes) with random weights."""
    dl = _dictionary_learning()
    kw = {
        "steps": 10,
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "layer": 3,
        "lm_name": "m",
        "device": "cpu",
    }
    kw["warmup_steps"] = 2
    if arch == "topk":
        trainer = dl.TopKTrainer(k=K, **kw)
    elif arch == "batchtopk":
        trainer = dl.BatchTopKTrainer(k=K, **kw)
    elif arch == "jumprelu":
        trainer = dl.JumpReluTrainer(sparsity_warmup_steps=2, **kw)
    else:
        trainer = dl.StandardTrainer(sparsity_warmup_steps=2, **kw)
    _randomise(trainer.ae, 2)
    torch = _torch()
    with torch.no_grad():
        if arch == "batchtopk":
            trainer.ae.threshold.fill_(0.15)
        if arch == "jumprelu":
            trainer.ae.threshold.copy_(trainer.ae.threshold.abs())
    return trainer


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "relu"])
def test_import_dictionary_learning_saved_like_trainsae(tmp_path, arch):
    """Saved exactly as dictionary_learning's trainSAE saves (config.json {"trainer": trainer.config},
    ae.pt the state dict); the library side is what its from_pretrained loads."""
    torch = _torch()
    trainer = _dl_trainer(arch)
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"trainer": trainer.config}, indent=4))
    torch.save({k: v.cpu() for k, v in trainer.ae.state_dict().items()}, folder / "ae.pt")
    cfg, params = import_sae(folder / "ae.pt" if arch == "relu" else tmp_path)  # a file in it works too
    assert cfg.architecture == arch
    x = _raw_rows(ROWS, 3) * SCALE  # the library SAEs expect activations of RMS ~1
    encode, decode = _load_with_library("dictionary-learning", tmp_path)
    lib_codes = encode(x)
    _check_same(
        f"import dictionary-learning {arch}", (lib_codes, decode(lib_codes)), _ours(cfg, params, x, 1.0), 1e-5
    )


def test_import_sparsify_saved_by_sparsify(tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
    _randomise(sae, 3)
    sae.save_to_disk(tmp_path / "layers.3")
    cfg, params = import_sae(tmp_path)  # the run folder with one hook point
    assert (cfg.architecture, cfg.k, cfg.d_sae) == ("topk", K, D_SAE)
    x = _raw_rows(ROWS, 4) * SCALE
    encode, decode = _load_with_library("sparsify", tmp_path)
    lib_codes = encode(x)
    _check_same("import sparsify topk", (lib_codes, decode(lib_codes)), _ours(cfg, params, x, 1.0), 1e-5)


# ---------------------------------------------------------------- checkpoints and the command line


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real 5-step run with two SAEs on the sae axis (seed 0 k 4, seed 1 k 2)."""
    from jaxsae.config import DataConfig, RunConfig, TrainConfig
    from jaxsae.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(
        sae=SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=K),
        data=DataConfig(n_atoms=32, active=3, n_rows=4096),
        train=TrainConfig(steps=5, batch_size=256, seeds=(0, 1), ks=(4, 2), out_dir=str(out), progress=False),
    )
    train(cfg)
    return out


def test_export_checkpoint_writes_one_folder_per_sae(trained_run, tmp_path):
    from jaxsae.checkpoint import load

    ckpt = load(trained_run)
    folders = export_checkpoint(trained_run, "saelens", tmp_path, hook_name="encoder.layers.2")
    assert [f.name for f in folders] == ["seed0_k4", "seed1_k2"]
    x = _raw_rows(ROWS, 5) * 0.1
    for i, folder in enumerate(folders):
        meta = json.loads((folder / "cfg.json").read_text())
        assert meta["metadata"]["hook_name"] == "encoder.layers.2" and meta["k"] == (4, 2)[i]
        cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=(4, 2)[i])
        params = {k: v[i] for k, v in ckpt.params.items()}
        encode, decode = _load_with_library("saelens", folder)
        lib_codes = encode(x)
        ours = _ours(cfg, params, x, float(ckpt.input_scale[i]))
        _check_same(f"checkpoint saelens sae {i}", (lib_codes, decode(lib_codes)), ours, 1e-5)
    default = export_checkpoint(trained_run, "sparsify", tmp_path / "sp")
    assert (default[0] / "planted" / "cfg.json").is_file()  # default hook name: the run's data source


def test_import_to_checkpoint_loads_and_resumes(tmp_path):
    """A batchtopk SAE through SAELens (as jumprelu) back into a jaxsae run: batchtopk again, loadable,
    and training continues from it."""
    import dataclasses

    from jaxsae.checkpoint import load
    from jaxsae.config import load_config
    from jaxsae.train import train

    cfg, params = _cfg("batchtopk"), _params("batchtopk")
    export_sae(cfg, params, SCALE, "saelens", tmp_path / "exp", hook_name="h", model_name="m")
    run = import_to_checkpoint(tmp_path / "exp", tmp_path / "run")
    ckpt = load(run)
    want_cfg, want = import_sae(tmp_path / "exp")
    assert ckpt.config.sae == want_cfg and want_cfg.architecture == "batchtopk" and want_cfg.k == K
    assert ckpt.step == 0
    np.testing.assert_allclose(ckpt.input_scale, [SCALE], rtol=1e-5)  # recovered from the decoder norms
    imported = {key: v[0] for key, v in ckpt.params.items()}
    for key, value in jsae.fold_input_scale(imported, ckpt.input_scale[0]).items():
        np.testing.assert_allclose(value, want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(np.linalg.norm(imported["W_dec"], axis=1), 1, rtol=1e-5)
    with pytest.raises(ExportError, match="already holds checkpoints"):
        import_to_checkpoint(tmp_path / "exp", run)
    run_cfg = load_config(run / "config.yaml")
    short = dataclasses.replace(run_cfg.train, steps=2, batch_size=64, progress=False)
    result = train(
        dataclasses.replace(run_cfg, train=short, data=dataclasses.replace(run_cfg.data, n_rows=1024)),
        resume=True,
    )
    assert int(np.asarray(result.state.step)[0]) == 2
    for key in ("W_enc", "b_enc", "W_dec"):  # a fresh init (W_enc = W_decᵀ, b_enc 0) would be far from these
        drift = np.abs(np.asarray(result.state.params[key][0]) - imported[key]).max()
        assert drift < 0.05, f"training did not start from the imported SAE ({key})"


def test_cli_export_and_import_round_trip(trained_run, tmp_path, capsys):
    from jaxsae.checkpoint import load
    from launch import cli
    from launch.cmd_export import FORMAT_CHOICES

    assert tuple(FORMATS) == FORMAT_CHOICES
    out = tmp_path / "dl"
    argv = [
        "export",
        str(trained_run),
        "--format",
        "dictionary-learning",
        "--out",
        str(out),
        "--hook-name",
        "l2",
    ]
    assert cli.main(argv) == 0
    assert cli.main(["import", str(out / "seed1_k2"), "--out", str(tmp_path / "run")]) == 0
    ckpt, src = load(tmp_path / "run"), load(trained_run)
    assert ckpt.config.sae.k == 2 and ckpt.meta["imported_format"] == "dictionary-learning"
    np.testing.assert_allclose(ckpt.input_scale[0], src.input_scale[1], rtol=1e-5)
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):  # the very SAE that was trained, scale unfolded
        np.testing.assert_allclose(ckpt.params[key][0], src.params[key][1], rtol=1e-4, atol=1e-5, err_msg=key)
    capsys.readouterr()
    assert cli.main(["import", str(tmp_path / "empty_or_missing"), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxsae: error:") and "not found" in err and "\n" not in err


# ---------------------------------------------------------------- bad input: one line naming file and key


def _export_saelens(tmp_path: Path, arch: str = "jumprelu") -> Path:
    export_sae(_cfg(arch), _params(arch), SCALE, "saelens", tmp_path, hook_name="h", model_name="m")
    return tmp_path


def _edit_weights(path: Path, edit) -> None:
    tensors = safetensors.numpy.load_file(str(path))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(path))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_saelens(tmp_path: Path, kind: str) -> tuple[Path, str]:
    d = _export_saelens(tmp_path)
    weights, cfg = d / "sae_weights.safetensors", d / "cfg.json"
    if kind == "missing key":
        _edit_weights(weights, lambda t: t.pop("b_enc"))
        return d, "sae_weights.safetensors: missing key 'b_enc'"
    if kind == "shape":
        _edit_weights(weights, lambda t: t.update(W_dec=t["W_dec"][:, :-1].copy()))
        return d, "key 'W_dec' has shape [64, 15], expected [64, 16]"
    if kind == "unexpected key":
        _edit_weights(weights, lambda t: t.update(extra=t["b_enc"]))
        return d, "unexpected key 'extra'"
    if kind == "truncated":
        _truncate(weights)
        return d, "sae_weights.safetensors: corrupt or truncated"
    if kind == "corrupt json":
        cfg.write_text('{"d_in": 16,')
        return d, "cfg.json: not readable JSON"
    if kind == "architecture":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "architecture": "gated"}))
        return d, "cfg.json: key 'architecture' is 'gated'"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "d_in"}))
    return d, "cfg.json: missing key 'd_in'"


@pytest.mark.parametrize(
    "kind", ["missing key", "shape", "unexpected key", "truncated", "corrupt json", "architecture", "cfg key"]
)
def test_bad_saelens_folders(tmp_path, kind):
    folder, message = _bad_saelens(tmp_path, kind)
    with pytest.raises(ExportError) as e:
        import_sae(folder)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_dictionary_learning_and_sparsify_folders(tmp_path):
    torch = _torch()
    args = {"hook_name": "layers.3", "model_name": "m"}
    dl = export_sae(_cfg("topk"), _params("topk"), SCALE, "dictionary-learning", tmp_path / "dl", **args)
    ae = dl / "trainer_0" / "ae.pt"
    state = torch.load(ae, weights_only=True)
    del state["encoder.bias"]
    torch.save(state, ae)
    cases = [(dl, "ae.pt: missing key 'encoder.bias'")]
    dl2 = export_sae(_cfg("topk"), _params("topk"), SCALE, "dictionary-learning", tmp_path / "dl2", **args)
    _truncate(dl2 / "trainer_0" / "ae.pt")
    cases.append((dl2, "ae.pt: corrupt or truncated torch file"))
    sp = export_sae(_cfg("topk"), _params("topk"), SCALE, "sparsify", tmp_path / "sp", **args)
    cfg_file = sp / "layers.3" / "cfg.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "activation": "groupmax"}))
    cases.append((sp, "cfg.json: key 'activation' is 'groupmax'"))
    sp2 = export_sae(_cfg("topk"), _params("topk"), SCALE, "sparsify", tmp_path / "sp2", **args)
    export_sae(_cfg("topk"), _params("topk"), SCALE, "sparsify", sp2, hook_name="layers.4", model_name="m")
    cases.append((sp2, "several sparsify hook points (layers.3, layers.4)"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "no SAE export found"))
    for folder, message in cases:
        with pytest.raises(ExportError) as e:
            import_sae(folder)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_run_folder_or_two_formats_are_not_exports(trained_run, tmp_path):
    with pytest.raises(ExportError, match="jaxsae run folder"):
        import_sae(trained_run)
    export_checkpoint(trained_run, "sparsify", tmp_path / "all")
    with pytest.raises(ExportError, match=r"one SAE export per sub-folder \(seed0_k4, seed1_k2\); pass one"):
        import_sae(tmp_path / "all")
    args = {"hook_name": "h", "model_name": "m"}
    export_sae(_cfg("topk"), _params("topk"), SCALE, "saelens", tmp_path, **args)
    export_sae(_cfg("topk"), _params("topk"), SCALE, "dictionary-learning", tmp_path, **args)
    with pytest.raises(ExportError, match="several formats"):
        import_sae(tmp_path)
    with pytest.raises(ExportError, match="unknown format 'onnx'"):
        export_sae(_cfg("topk"), _params("topk"), SCALE, "onnx", tmp_path, **args)
