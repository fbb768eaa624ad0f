"""Property-based tests (hypothesis) over configs and command lines: every invalid input gives exactly one
stderr line starting with `jaxsae: error:` and exit code 2, never a traceback. `launch.cli.main` runs in
this process; training itself is replaced by a stub that fails the test if an invalid input reaches it."""

from __future__ import annotations

import dataclasses
import string
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import launch.cli as cli
from jaxsae import config as config_mod
from jaxsae.config import RunConfig

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
FIELDS = {
    name: typing.get_type_hints(getattr(config_mod, cls))
    for name, cls in (
        ("sae", "SAEConfig"),
        ("data", "DataConfig"),
        ("train", "TrainConfig"),
        ("mesh", "MeshConfig"),
    )
}
IDENT = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)
JUNK = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    def refuse(cfg, **kw):
        raise AssertionError(f"an invalid command line reached training: {cfg}")

    import jaxsae.train

    monkeypatch.setattr(jaxsae.train, "train", refuse)


def check_one_error_line(argv: list[str], capsys) -> str:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert code == 2, (argv, code, out.err)
    assert len(lines) == 1 and lines[0].startswith("jaxsae: error: "), (argv, out.err)
    assert "Traceback" not in out.err
    return lines[0]


# --------------------------------------------------------------------------------- invalid overrides
def bad_value(hint) -> st.SearchStrategy[str]:
    """Text that is not a valid value of a field of type `hint`."""
    if hint is bool:
        return JUNK.filter(
            lambda s: s.strip().lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off")
        )
    if hint is int:
        return st.one_of(
            st.floats(allow_nan=False, allow_infinity=True)
            .filter(lambda x: not float(x).is_integer())
            .map(repr),
            st.text(string.ascii_letters, min_size=1, max_size=8).filter(_not_yaml_scalar),
            st.just("[1, [2]]"),
            st.just("{a: 1}"),
        )
    if hint is float:
        return st.one_of(
            st.text(string.ascii_letters, min_size=1, max_size=8).filter(_not_yaml_scalar),
            st.just("[1.0]"),
            st.just("true"),
        )
    if typing.get_origin(hint) is tuple:
        return st.one_of(st.just("[1, x]"), st.just("{a: 1}"), st.just("1.5,2"), st.just("true"))
    return st.one_of(st.just("[1, 2]"), st.just("{a: 1}"), st.just("true"), st.just("null"))  # str


def _not_yaml_scalar(s: str) -> bool:
    try:
        v = yaml.safe_load(s)
    except yaml.YAMLError:
        return True
    return isinstance(v, str) and v.lower() not in ("nan", "inf", "infinity")


@st.composite
def wrong_type(draw) -> str:
    section = draw(st.sampled_from(sorted(FIELDS)))
    key = draw(st.sampled_from(sorted(FIELDS[section])))
    return f"--{section}.{key}={draw(bad_value(FIELDS[section][key]))}"


@st.composite
def unknown_key(draw) -> str:
    section = draw(st.sampled_from([*sorted(FIELDS), "trian", "model", "x"]))
    key = draw(IDENT.filter(lambda k: k not in FIELDS.get(section, {})))
    if section not in FIELDS:
        key = draw(st.sampled_from(["lr", "steps", "k"]))
    return f"--{section}.{key}={draw(st.sampled_from(['1', 'x', '0.5']))}"


OUT_OF_RANGE = st.sampled_from(
    [
        "--train.steps=0", "--train.steps=-3", "--train.batch_size=0", "--train.lr=-1", "--train.lr=0",
        "--train.decay_fraction=1.5", "--train.seeds=", "--train.log_every=0", "--sae.k=0", "--sae.k=100000",
        "--sae.architecture=gated", "--sae.d_in=0", "--sae.d_sae=-1", "--sae.dtype=int8",
        "--sae.sparsity_mode=l2", "--sae.jumprelu_bandwidth=0", "--data.n_rows=0", "--data.active=0",
        "--mesh.model=0", "--mesh.data=-1", "--train.checkpoint_every=7", "--train.ks=1,2,3",
        "--train.lr=.nan", "--train.steps=1e400",
    ]
)  # fmt: skip
MALFORMED = st.one_of(
    st.sampled_from(["lr=1", "--lr=1", "--train.lr.x=1", "--.lr=1", "--train.=1", "--train.lr", "-x"]),
    JUNK.filter(lambda s: not s.startswith("-") and s != ""),
)
VALID = st.sampled_from(
    ["--train.lr=1e-3", "--sae.k=4", "--train.seeds=0,1", "--train.progress=false", "--mesh.data=1"]
)


@SETTINGS
@given(
    bad=st.one_of(wrong_type(), unknown_key(), OUT_OF_RANGE, MALFORMED),
    good=st.lists(VALID, max_size=3),
    where=st.integers(0, 3),
)
def test_invalid_overrides_give_one_line_and_exit_2(bad, good, where, capsys):
    good = [g for g in good if g.split("=")[0] != bad.split("=")[0]]  # a later value of a key replaces it
    argv = ["train", *good[:where], bad, *good[where:]]
    check_one_error_line(argv, capsys)


# ------------------------------------------------------------------------------------ invalid YAML
YAML_DOCS = st.one_of(
    st.sampled_from(
        ["sae: [1,\n", "- 1\n- 2\n", "sae: 3\n", "train: {lr: x}\n", "42\n", "sae: {k: {a: 1}}\n"]
    ),
    st.dictionaries(
        st.one_of(IDENT, st.integers(), st.booleans()),
        st.one_of(st.integers(), JUNK, st.lists(st.integers(), max_size=2)),
        min_size=1,
        max_size=3,
    )
    .filter(lambda d: any(k not in SECTIONS for k in d) or any(not isinstance(v, dict) for v in d.values()))
    .map(lambda d: yaml.safe_dump(d)),
    st.binary(min_size=1, max_size=30).filter(lambda b: _bad_utf8(b)).map(lambda b: b),
)


def _bad_utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return True
    return False


@SETTINGS
@given(doc=YAML_DOCS)
def test_invalid_config_files_give_one_line_and_exit_2(doc, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        if isinstance(doc, bytes):
            path.write_bytes(doc)
        else:
            path.write_text(doc)
        line = check_one_error_line(["train", str(path)], capsys)
        assert str(path) in line or "unknown key" in line or ":" in line


# -------------------------------------------------------------------------------- invalid options
COMMANDS = st.sampled_from(
    [
        ["nosuchcommand"],
        ["train", "--num-processes=abc"],
        ["train", "--resume=3"],
        ["export-activations"],
        [
            "export-activations",
            "--model",
            "m",
            "--layers",
            "1",
            "--audio",
            "a",
            "--out",
            "o",
            "--batch-size=x",
        ],
        ["export-activations", "--model", "m", "--layers", "1", "--audio", "a", "--out", "o", "--dtype=int8"],
        ["export", "run"],
        ["export", "run", "--format", "onnx", "--out", "o"],
        ["export", "run", "--format", "saelens", "--out", "o", "--step", "last"],
        ["import"],
        ["corpus", "--bogus"],
        ["demo", "--size", "huge"],
        ["demo", "--steps", "many"],
    ]
)


@SETTINGS
@given(argv=COMMANDS, extra=st.lists(st.sampled_from(["--zzz", "--frobnicate=1"]), max_size=1))
def test_invalid_options_give_one_line_and_exit_2(argv, extra, capsys):
    check_one_error_line([*argv, *extra], capsys)


def test_missing_inputs_name_the_file(tmp_path, capsys):
    line = check_one_error_line(["train", str(tmp_path / "nope.yaml")], capsys)
    assert line == f"jaxsae: error: config file not found: {tmp_path / 'nope.yaml'}"
    line = check_one_error_line(["train", str(tmp_path)], capsys)  # a folder is not a config file
    assert str(tmp_path) in line
