"""Two processes joined by jax.distributed on 127.0.0.1 train like one process."""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from jaxsae.config import MeshConfig

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    import distributed_worker as worker

    port, out = _free_port(), tmp_path / "params.npz"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), str(out)], stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errors)
    got = dict(np.load(out))
    want = worker.train_params(worker.config(MeshConfig(1, 1, 1)))
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
