"""A tiny deterministic audio "model" for fast export runs: `--model tests.reliability.tiny_encoder:make`.

Frames are non-overlapping windows of 320 samples (50 per second at 16 kHz); layer 1 is a fixed random
projection of each window to 16 values, layer 2 is tanh of a projection of layer 1. A frame depends on its
own window only, so any batching gives the same rows; a run takes milliseconds per clip. With
`nonfinite_every` n > 0, frame t of every clip is NaN in layer 1 where t % n == 3 and +Inf in layer 2 where
t % n == 5 (a model that overflows now and then).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from encoders.models import ANY, Encoder

HOP = 320
D = 16


class TinyEncoder(Encoder):
    batching = ANY

    def __init__(self, nonfinite_every: int = 0) -> None:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(HOP, D), torch.nn.Linear(D, D))
        super().__init__("tiny-frames", f"v1-nonfinite{nonfinite_every}", net, 16000, 16000 / HOP)
        self.nonfinite_every = nonfinite_every

    def layer_names(self) -> list[str]:
        return ["1", "2"]

    def hook_name(self, layer: str) -> str:
        return f"net.{int(layer) - 1}"

    def dim(self, layer: str) -> int:
        return D

    def n_frames(self, n_samples: int) -> int:
        return n_samples // HOP

    def _forward(self, waves: list[np.ndarray], layers: list[str]) -> dict[str, torch.Tensor]:
        """{layer: float32 [B, T, 16]}: windows [B, T, 320] of the zero-padded batch, projected."""
        t = max(len(w) for w in waves) // HOP
        x = torch.zeros(len(waves), t * HOP)
        for i, w in enumerate(waves):
            n = min(len(w), t * HOP)
            x[i, :n] = torch.from_numpy(w[:n])
        h1 = self.model[0](x.reshape(len(waves), t, HOP))
        h2 = torch.tanh(self.model[1](h1))
        if self.nonfinite_every:
            frames = torch.arange(t)
            h1[:, frames % self.nonfinite_every == 3] = float("nan")
            h2[:, frames % self.nonfinite_every == 5] = float("inf")
        out = {"1": h1, "2": h2}
        return {ly: out[ly] for ly in layers}


def make() -> TinyEncoder:
    """The encoder the CLI loads; TINY_NONFINITE_EVERY in the environment sets `nonfinite_every`."""
    return TinyEncoder(int(os.environ.get("TINY_NONFINITE_EVERY", "0")))
