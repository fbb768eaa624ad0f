"""Runs our step and the peers, each in a process of its own, and gathers one result dict.

Each process prints one JSON line as its last line of output. Ours gets simulated devices through
XLA_FLAGS (before JAX starts); the peers get GLIBC_TUNABLES that keep large blocks in the heap (glibc
would otherwise hand every [B, F] buffer back to the kernel and re-zero it on the next step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from jaxsae.bench import machine
from jaxsae.bench.options import BenchOptions
from jaxsae.bench.peers import NOTES, Peer, peers_for

GLIBC_KEEP_LARGE_BLOCKS = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


class BenchError(RuntimeError):
    """A benchmark process failed; the message carries the end of its output."""


def _run_json(module: str, opts: BenchOptions, env: dict[str, str], log=None) -> dict:
    """`python -m module <opts>` -> the JSON object of its last output line."""
    cmd = [sys.executable, "-m", module, *opts.to_argv()]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise BenchError(f"{module} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def ours_env(opts: BenchOptions) -> dict[str, str]:
    env = dict(os.environ)
    if opts.devices > 1:
        flag = f"--xla_force_host_platform_device_count={opts.devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return env


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", GLIBC_KEEP_LARGE_BLOCKS)
    return env


def run_ours(opts: BenchOptions) -> dict:
    return _run_json("jaxsae.bench.ours", opts, ours_env(opts))


def run_peer(peer: Peer, opts: BenchOptions) -> dict:
    """One peer on our shapes (its own architecture); {"skipped": why} when it cannot run."""
    return _run_json(peer.module, dataclasses.replace(opts, architecture=peer.architecture), peer_env())


def run_architecture(opts: BenchOptions, libraries: tuple[str, ...], cache: dict, say) -> dict:
    """Ours and the peers compared with `opts.architecture`; a peer measured for an earlier
    architecture (sparsify-topk) is reused from `cache`."""
    say(f"ours {opts.architecture} ({opts.dtype}, d_in {opts.d_in}, d_sae {opts.d_sae}) ...")
    record = run_ours(opts)
    peers = {}
    for peer in peers_for(opts.architecture, libraries):
        if peer.name not in cache:
            say(f"peer {peer.name} ...")
            cache[peer.name] = run_peer(peer, opts)
        peers[peer.name] = cache[peer.name]
    record["peers"] = {name: p.get("tokens_per_s") for name, p in peers.items()}
    record["peer_details"] = peers
    record["speedup"] = _speedups(record, peers)
    record["peer_notes"] = {
        n: NOTES[(opts.architecture, n)] for n in peers if (opts.architecture, n) in NOTES
    }
    return record


def _speedups(record: dict, peers: dict) -> dict:
    ours = record.get("tokens_per_s")
    return {
        n: (ours / p["tokens_per_s"] if ours and p.get("tokens_per_s") else None) for n, p in peers.items()
    }


def run_bench(opts: BenchOptions, architectures: list[str], libraries: tuple[str, ...], say=None) -> dict:
    """The whole benchmark: one record per architecture, plus the summary keys `tokens_per_s` and
    `floor_ratio` (architecture -> value) and `peers` (peer name -> tokens/s, None when skipped)."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    desc = machine.describe()
    cache: dict = {}
    runs = {
        a: run_architecture(dataclasses.replace(opts, architecture=a), libraries, cache, say)
        for a in architectures
    }
    first = next(iter(runs.values()))
    desc["device_kind"] = first.get("device_kind")
    desc["jax_devices"] = first.get("devices")
    config = dataclasses.asdict(opts) | {
        "d_sae": opts.d_sae,
        "architectures": architectures,
        "compare": libraries,
    }
    del config["architecture"]
    return {
        "tokens_per_s": {a: r.get("tokens_per_s") for a, r in runs.items()},
        "floor_ratio": {a: r.get("floor_ratio") for a, r in runs.items()},
        "peers": {n: p.get("tokens_per_s") for n, p in cache.items()},
        "config": config,
        "machine": desc,
        "runs": runs,
    }
