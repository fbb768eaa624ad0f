"""What every peer process shares: its options, torch set-up, the timing loop and its one JSON line.

A peer module defines `build(opts) -> Built` (importing its library inside, so that a missing library
becomes a "not installed" message) and calls `main(name_of, build)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import NamedTuple

from jaxsae.bench import inputs, rounds, timing
from jaxsae.bench.options import BenchOptions


class Built(NamedTuple):
    step: Callable[[], object]  # one whole training step
    aux_active: Callable[[], bool]  # whether the last step computed the aux-k loss (dead latents seen)
    notes: str  # settings worth knowing (optimizer, aux-k, decoder norm handling)


def setup_torch():
    """torch with one thread per core (the peers' best on the CPU); returns the module."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def batch_tensor(opts: BenchOptions):
    """The shared batch as a float32 torch tensor [B, d_in]."""
    import torch

    return torch.from_numpy(inputs.make_batch(opts.d_in, opts.batch))


def dead_index(opts: BenchOptions):
    """Indices of the latents made dead, as a torch long tensor."""
    import torch

    return torch.from_numpy(inputs.dead_latents(opts.d_sae, opts.dead_fraction)).long()


def measure(name: str, built: Built, opts: BenchOptions) -> dict:
    """The peer's step timed `opts.steps` times after `opts.warmup`, or, interleaved, in the rounds that
    the caller asks for (jaxsae.bench.rounds)."""
    if opts.interleave:  # warmed up in the rounds
        times = rounds.serve(built.step, lambda _: None)
    else:
        times = timing.time_calls(built.step, opts.steps, opts.warmup, lambda _: None)
    step = timing.summary(times)["median"]
    return {
        "name": name,
        "tokens_per_s": opts.batch / step,
        "step_s": timing.summary(times),
        "aux_active": built.aux_active(),
        "threads": os.cpu_count(),
        "peak_rss_bytes": timing.peak_rss_bytes(),
        "load_average": list(os.getloadavg()),  # after timing: how busy the machine was
        "notes": built.notes,
    }


def main(name_of: Callable[[BenchOptions], str], build: Callable[[BenchOptions], Built], argv=None) -> int:
    """Runs one peer and prints its JSON line: a measurement, or {"skipped": why}."""
    opts = BenchOptions.from_argv(argv)
    name = name_of(opts)
    try:
        built = build(opts)
    except ImportError as e:
        out = {"name": name, "skipped": f"not installed ({e})"}
    except Unsupported as e:
        out = {"name": name, "skipped": str(e)}
    else:
        out = measure(name, built, opts)
    print(json.dumps(out))
    return 0


class Unsupported(Exception):
    """The peer cannot run these settings (e.g. bfloat16); the message says why."""
