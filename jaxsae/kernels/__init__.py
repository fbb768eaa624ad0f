"""Sparse kernels of the training step, one implementation per backend behind one set of functions.

`reference` defines the semantics (pure JAX); `cpu` runs them as C++ custom calls, `pallas` the
decode and gradient kernels as Pallas kernels on GPU/TPU. `backend()` picks the fastest available for
the default JAX platform; the `JAXSAE_KERNELS` environment variable (`reference`, `cpu`, `pallas`)
forces one.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import jax

_log = logging.getLogger(__name__)


@functools.cache
def _load(name: str, platform: str) -> ModuleType | None:
    """The module `jaxsae.kernels.<name>` if it works on `platform`, else None (with the reason logged)."""
    try:
        module = importlib.import_module(f"jaxsae.kernels.{name}")
    except Exception as e:  # a missing compiler or an unsupported jaxlib: fall back, never fail
        _log.warning("jaxsae kernels: %s unavailable (%s)", name, e)
        return None
    if name == "reference":
        return module
    ok = module.available() if name == "cpu" else module.supported(platform)
    return module if ok else None


def kernel(name: str, platform: str | None = None):
    """The function `name` of `backend(platform)`, or the reference's where that backend lacks it
    (the Pallas backend has the decode and gradient kernels; selections run as XLA there)."""
    return getattr(backend(platform), name, None) or getattr(_load("reference", "any"), name)


def backend(platform: str | None = None) -> ModuleType:
    """The kernel module to use on `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    forced = os.environ.get("JAXSAE_KERNELS")
    if forced:
        module = _load(forced, platform)
        if module is None:
            raise RuntimeError(f"JAXSAE_KERNELS={forced}: that backend is not available on {platform}")
        return module
    preferred = "cpu" if platform == "cpu" else "pallas"
    return _load(preferred, platform) or _load("reference", platform)
