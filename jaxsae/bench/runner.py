"""Runs our step and the peers, each in a process of its own, and gathers one result dict. Each peer's
steps alternate with ours, both processes live (jaxsae.bench.rounds).

Each process prints its JSON result as its last line of output. Ours gets simulated devices through
XLA_FLAGS (before JAX starts) and the allocator settings that `jaxsae train` runs with
(jaxsae.allocator); the peers get GLIBC_TUNABLES that keep large blocks in the heap (glibc would
otherwise hand every [B, F] buffer back to the kernel and re-zero it on the next step), with
transparent huge pages as ours. Both are set here whatever the caller's environment holds.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from jaxsae import allocator
from jaxsae.bench import machine, rounds
from jaxsae.bench.options import BenchOptions
from jaxsae.bench.peers import NOTES, Peer, peers_for
from jaxsae.bench.rounds import BenchError, Live

__all__ = ["BenchError", "run_bench"]

PEER_TUNABLES = (
    "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
)


def ours_env(opts: BenchOptions) -> dict[str, str]:
    env = allocator.training_env({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    if opts.devices > 1:
        flag = f"--xla_force_host_platform_device_count={opts.devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    return env


def peer_env() -> dict[str, str]:
    return dict(os.environ, GLIBC_TUNABLES=PEER_TUNABLES)


def start_ours(opts: BenchOptions) -> Live:
    """Our process, its own measurement done, ready for rounds against the peers."""
    return Live("jaxsae.bench.ours", dataclasses.replace(opts, interleave=True), ours_env(opts))


def run_peer(peer: Peer, opts: BenchOptions, ours: Live) -> dict:
    """One peer on our shapes (its own architecture), its steps alternating with ours (`opts.warmup`
    rounds, then `opts.steps` timed ones, recorded under "rounds"); {"skipped": why} when it cannot run."""
    peer_opts = dataclasses.replace(opts, architecture=peer.architecture, interleave=True)
    live = Live(peer.module, peer_opts, peer_env())
    try:
        timed = rounds.alternate(ours, live, opts.steps, opts.warmup) if live.ready else None
    except BaseException:  # ours failed, or an interrupt: the peer would wait on its stdin
        live.abort()
        raise
    result = live.finish()
    return result if timed is None else {**result, "rounds": timed}


def run_architecture(opts: BenchOptions, libraries: tuple[str, ...], say) -> dict:
    """Ours and the peers compared with `opts.architecture`: each peer's steps alternate with ours, and
    its speedup is the ratio of the two medians in those rounds."""
    say(f"ours {opts.architecture} ({opts.dtype}, d_in {opts.d_in}, d_sae {opts.d_sae}) ...")
    ours = start_ours(opts)
    peers = {}
    try:
        for peer in peers_for(opts.architecture, libraries):
            say(f"peer {peer.name}, {opts.steps} steps alternating with ours ...")
            peers[peer.name] = run_peer(peer, opts, ours)
    finally:
        record = ours.finish()
    record["peers"] = {name: p.get("tokens_per_s") for name, p in peers.items()}
    record["peer_details"] = peers
    record["speedup"] = {n: rounds.speedup(p["rounds"]) if "rounds" in p else None for n, p in peers.items()}
    record["peer_notes"] = {
        n: NOTES[(opts.architecture, n)] for n in peers if (opts.architecture, n) in NOTES
    }
    return record


def run_bench(opts: BenchOptions, architectures: list[str], libraries: tuple[str, ...], say=None) -> dict:
    """The whole benchmark: one record per architecture, plus the summary keys `tokens_per_s` and
    `floor_ratio` (architecture -> value) and `peers` (peer name -> tokens/s, None when skipped)."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    desc = machine.describe()
    runs = {
        a: run_architecture(dataclasses.replace(opts, architecture=a), libraries, say) for a in architectures
    }
    first = next(iter(runs.values()))
    desc["device_kind"] = first.get("device_kind")
    desc["jax_devices"] = first.get("devices")
    config = dataclasses.asdict(opts) | {
        "d_sae": opts.d_sae,
        "architectures": architectures,
        "compare": libraries,
        "glibc_tunables": {"ours": ours_env(opts).get("GLIBC_TUNABLES"), "peers": PEER_TUNABLES},
    }
    del config["architecture"]
    return {
        "tokens_per_s": {a: r.get("tokens_per_s") for a, r in runs.items()},
        "floor_ratio": {a: r.get("floor_ratio") for a, r in runs.items()},
        "peers": {n: v for r in runs.values() for n, v in r["peers"].items()},
        "config": config,
        "machine": desc,
        "runs": runs,
    }
