"""`jaxsae bench` at tiny shapes (d_in 32, d_sae 128, batch 64, 2 steps): the CLI runs our step and
two installed peers, the JSON has its keys, and a peer library that is not installed is skipped with a
message. No timing is asserted. Our step runs with dense kernels here, so that this harness test does
not depend on which kernels the step picks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxsae.bench import runner
from jaxsae.bench.options import BenchOptions, parse_mesh
from jaxsae.bench.peers import PEERS
from jaxsae.config import ConfigError
from jaxsae.kernels import cpu
from launch.cli import main

TINY = ["--d-in", "32", "--expansion", "4", "--k", "4", "--batch", "64", "--steps", "2", "--warmup", "1"]
TINY_OPTS = BenchOptions(d_in=32, expansion=4, k=4, batch=64, steps=2, warmup=1, kernels="dense")


def test_cli_json_with_peers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", *TINY, "--kernels", "dense", "--mesh", "sae=1,data=2,model=2", "--devices", "4"]
    assert main([*argv, "--compare", "saelens,sparsify", "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert printed == result
    assert {"tokens_per_s", "floor_ratio", "peers", "runs", "machine", "config"} <= result.keys()
    run = result["runs"]["batchtopk"]
    assert run["mesh"] == {"sae": 1, "data": 2, "model": 2}
    assert result["tokens_per_s"]["batchtopk"] > 0 and result["floor_ratio"]["batchtopk"] > 0
    assert set(run["breakdown_s"]) >= {"encoder_matmul", "selection", "decode", "backward", "optimizer"}
    assert run["memory"]["bound_bytes"] > 0 and run["dead_fraction"] > 0
    assert set(result["peers"]) == {"saelens-batchtopk", "sparsify-topk"}
    for name, tokens_per_s in result["peers"].items():
        assert tokens_per_s > 0, name
        detail = run["peer_details"][name]
        assert detail["aux_active"], f"{name}: aux-k did not run"
        # Interleaved: 2 rounds each, the peer's own timings are those of its rounds, and the speedup
        # is the ratio of the two medians in them.
        timed = detail["rounds"]
        assert len(timed["ours_s"]) == len(timed["peer_s"]) == 2
        assert detail["step_s"]["all"] == timed["peer_s"]
        assert run["speedup"][name] == pytest.approx(np.median(timed["peer_s"]) / np.median(timed["ours_s"]))
    ours_in_rounds = [t for p in run["peer_details"].values() for t in p["rounds"]["ours_s"]]
    assert sorted(run["rounds_s"]) == sorted(ours_in_rounds)
    assert result["machine"]["cpu"] and result["machine"]["cores"]


def test_missing_peer_is_skipped(tmp_path, monkeypatch, capsys):
    """A library that fails to import (a stub package on PYTHONPATH) is skipped with a message, its value
    null; `runner.start_ours` is replaced so that only the peer processes run."""
    for package in ("sparsify", "sae_lens"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    class FakeOurs:
        def step(self) -> float:
            raise AssertionError("no rounds against a peer that is not installed")

        def finish(self) -> dict:
            return {"architecture": "topk", "tokens_per_s": 1.0}

    monkeypatch.setattr(runner, "start_ours", lambda opts: FakeOurs())
    result = runner.run_bench(TINY_OPTS, ["topk"], ("saelens", "sparsify"), say=lambda _: None)
    assert result["peers"] == {"sparsify-topk": None, "saelens-topk": None}
    for detail in result["runs"]["topk"]["peer_details"].values():
        assert "not installed" in detail["skipped"]
    from jaxsae.bench.report import peer_lines

    assert all("skipped: not installed" in line for line in peer_lines(result["runs"]["topk"]))


@pytest.mark.parametrize("kernels", ["auto", "dense"])
def test_bf16_is_measured(kernels):
    """bfloat16 is the compute dtype of the matmuls (jaxsae.sae.matmul, the sparse step's encoder)."""
    from jaxsae.bench import ours

    opts = {**TINY_OPTS.__dict__, "dtype": "bfloat16", "breakdown": False, "kernels": kernels}
    out = ours.run(BenchOptions(**opts))
    assert out["kernels"] == {"auto": "sparse", "dense": "dense"}[kernels]
    assert out["tokens_per_s"] > 0 and out["dtype"] == "bfloat16"
    assert np.isfinite(out["aux_loss"]) and out["memory"]["batch_bytes"] == 64 * 32 * 2


def test_a_failed_process_is_reported_with_its_output():
    with pytest.raises(runner.BenchError, match=r"no_such_module failed \(exit 1\)") as failed:
        runner.Live("jaxsae.bench.no_such_module", TINY_OPTS, {}).finish()
    assert "No module named" in str(failed.value)


def test_options_round_trip_and_mesh():
    opts = BenchOptions(d_in=16, expansion=2, breakdown=False, dead_fraction=0.5, mesh="data=2")
    assert BenchOptions.from_argv(opts.to_argv()) == opts
    assert parse_mesh("sae=2,data=4,model=1").data == 4
    with pytest.raises(ConfigError):
        parse_mesh("data=x")
    assert [p.name for p in PEERS if p.library == "sparsify"] == ["sparsify-topk"]


@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu"])
def test_sparse_step_and_its_breakdown_run_in_process(architecture):
    """The step the targets are measured on: sparse kernels, the fused update, on one device, with every
    piece of the breakdown (the fused pieces call jaxsae.fused_step directly, not through the step)."""
    from jaxsae.bench import ours

    sparse = {"kernels": "sparse", "architecture": architecture, "mesh": "data=1"}
    opts = BenchOptions(**{**TINY_OPTS.__dict__, **sparse})
    out = ours.run(opts)
    assert out["kernels"] == "sparse" and out["tokens_per_s"] > 0
    assert out["screen"] == (architecture == "batchtopk" and cpu.available() and cpu.can_screen())
    assert set(out["breakdown_s"]) >= {"encoder_matmul", "selection", "decode", "backward", "optimizer"}
    assert all(seconds >= 0 for seconds in out["breakdown_s"].values())
