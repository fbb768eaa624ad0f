"""Held-out evaluation of trained SAEs in inference mode (batchtopk uses its threshold)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import sae
from jaxsae.config import SAEConfig


def evaluate(cfg: SAEConfig, params: dict, input_scale: float, rows: np.ndarray, batch: int = 4096) -> dict:
    """FVE, normalised MSE, MSE (in scaled units), mean L0 and the fraction of latents that never fired
    on `rows` [N, d_in] (raw activations). `params` are one SAE's (no `sae` axis)."""
    folded = sae.fold_input_scale({k: jnp.asarray(v) for k, v in params.items()}, input_scale)
    err = var = l0 = 0.0
    fired = np.zeros(cfg.d_sae, bool)
    mean = rows.mean(0, dtype=np.float64)
    for i in range(0, rows.shape[0], batch):
        x = jnp.asarray(rows[i : i + batch], jnp.float32)
        codes, x_hat = _forward(cfg, folded, x)
        err += float(jnp.sum((x - x_hat) ** 2))
        var += float(np.sum((np.asarray(x) - mean) ** 2))
        l0 += float(jnp.sum(codes != 0))
        fired |= np.asarray(jnp.any(codes != 0, axis=0))
    nmse = err / max(var, 1e-12)
    return {
        "fve": 1 - nmse,
        "nmse": nmse,
        "mse": err * input_scale**2 / rows.size,
        "l0": l0 / rows.shape[0],
        "dead_fraction": float(1 - fired.mean()),
    }


@partial(jax.jit, static_argnums=0)
def _forward(cfg: SAEConfig, params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    codes = sae.encode(cfg, params, x)
    return codes, sae.decode(cfg, params, codes)
