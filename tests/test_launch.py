"""Cluster launch scripts: their dry runs print the command each would run."""

import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry(script: str, env: dict, *args: str) -> list[str]:
    """The printed (shell-quoted) command, split back into its arguments."""
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / script), "--dry-run", *args],
        capture_output=True, text=True, env={**os.environ, **env}, check=True,
    )  # fmt: skip
    return shlex.split(proc.stdout)


def test_tpu_pod_runs_the_same_command_on_every_worker():
    out = _dry(
        "tpu_pod.sh", {"TPU_NAME": "pod", "ZONE": "us-central2-b"}, "configs/x.yaml", "--train.lr=1e-3"
    )
    assert (
        out[:-1] == "gcloud compute tpus tpu-vm ssh pod --zone us-central2-b --worker=all --command".split()
    )
    assert "JAXSAE_EXTRAS=tpu,dev" in out[-1]
    assert out[-1].endswith("jaxsae train --distributed configs/x.yaml --train.lr=1e-3")


def test_slurm_starts_one_process_per_node():
    out = _dry("slurm_gpu.sh", {"NODES": "4", "GPUS_PER_NODE": "8", "PARTITION": "gpu"}, "run.yaml")
    assert out[:5] == "sbatch --job-name=jaxsae --nodes=4 --ntasks-per-node=1 --gpus-per-node=8".split()
    assert "--partition=gpu" in out and out[-2] == "--wrap"
    assert out[-1].endswith("srun .venv/bin/jaxsae train --distributed run.yaml")


def test_missing_settings_are_refused():
    proc = subprocess.run(
        ["bash", str(ROOT / "launch/tpu_pod.sh"), "x.yaml"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")},
    )
    assert proc.returncode != 0 and "TPU_NAME" in proc.stderr
