"""Configs and the `jaxsae train` command line: clear one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxsae.config import ConfigError, load_config, save_config, to_dict

JAXSAE = [sys.executable, "-m", "launch.cli"]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sae:\n  d_in: 32\n  architecture: batchtopk\ntrain:\n  lr: 0.002\n  seeds: [1, 2]\n")
    cfg = load_config(path, ["--train.lr=1e-4", "--sae.k", "5", "--train.ks=3,4"])
    assert (cfg.sae.d_in, cfg.sae.architecture, cfg.sae.k) == (32, "batchtopk", 5)
    assert cfg.train.lr == 1e-4 and cfg.train.seeds == (1, 2) and cfg.train.ks == (3, 4)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert to_dict(cfg)["train"]["seeds"] == [1, 2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.lrr=1"], "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        (["--trian.lr=1"], "unknown key 'trian' (did you mean 'train'?)"),
        (["--train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
        (["--train.steps=1.5"], "train.steps: expected an integer, got 1.5"),
        (["--sae.architecture=gated"], "sae.architecture: must be one of"),
        (["--sae.k=0"], "sae.k: must be in 1..d_sae"),
        (["--train.seeds=1,2", "--train.ks=3"], "train.ks: needs one k per seed (2)"),
        (["--train.progress=maybe"], "train.progress: expected true or false"),
        (["lr=1"], "unexpected argument 'lr=1'"),
        (["--lr=1"], "option '--lr': expected --section.key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_bad_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sae:\n  d_in: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def _run(args, cwd):
    return subprocess.run(JAXSAE + args, capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "missing.yaml"], "config file not found: missing.yaml"),
        (["train", "--train.stepz=3"], "unknown key 'train.stepz'"),
        (["train", "--sae.d_in=x"], "sae.d_in: expected an integer"),
        (["train", "--data.source=nowhere.npy"], "data.source: file not found: nowhere.npy"),
        (["train", "--data.source=wrong.npy"], "wrong.npy: expected shape [N, 64] (sae.d_in), got [10, 3]"),
        (
            ["train", "--data.source=nan.npy", "--train.steps=1"],
            "nan.npy: row 1031 is not finite",
        ),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
    np.save(tmp_path / "wrong.npy", np.zeros((10, 3), np.float32))
    rows = np.ones((2048, 64), np.float32)
    rows[1031, 3] = np.nan
    np.save(tmp_path / "nan.npy", rows)
    proc = _run(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in lines[0]


def test_cli_trains_on_npy(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", rng.standard_normal((2048, 16)).astype(np.float32))
    proc = _run(
        [
            "train",
            "--data.source=acts.npy",
            "--sae.d_in=16",
            "--sae.d_sae=32",
            "--sae.k=4",
            "--train.steps=6",
            "--train.batch_size=256",
            "--train.log_every=3",
            "--train.out_dir=run",
            "--train.progress=false",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert {"fve", "nmse", "mse", "l0", "dead_fraction", "tokens_per_s", "firing_rate_hist"} <= set(
        records[0]
    )
    assert sum(records[-1]["firing_rate_hist"]["counts"]) + records[-1]["firing_rate_hist"]["never"] == 32
    assert (tmp_path / "run/checkpoints/6").is_dir()
    saved = load_config(tmp_path / "run/config.yaml")
    assert saved.sae.d_in == 16 and saved.train.steps == 6 and saved.data.source == "acts.npy"
