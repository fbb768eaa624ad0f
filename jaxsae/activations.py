"""JumpReLU and its Heaviside step with straight-through (pseudo-derivative) gradients.

Shapes: `pre` is [B, F] (B rows, F latents); thresholds are [F] or scalar. TopK and BatchTopK
selection live in jaxsae.selection.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _rectangle(u: jax.Array) -> jax.Array:
    return (jnp.abs(u) < 0.5).astype(u.dtype)


def _sum_to(g: jax.Array, shape: tuple) -> jax.Array:
    """Sums a broadcast gradient back to `shape` (threshold [F] or scalar against [B, F])."""
    return g.reshape(-1, *shape).sum(0) if shape else g.sum()


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """pre · H(pre − θ). Gradients: ∂/∂pre = H(pre − θ); ∂/∂θ = −(θ/ε)·K((pre − θ)/ε)."""
    return pre * (pre > threshold)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    pre, threshold = res
    d_pre = g * (pre > threshold)
    d_theta = -(threshold / bandwidth) * _rectangle((pre - threshold) / bandwidth) * g
    return d_pre, _sum_to(d_theta, jnp.shape(threshold))


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(pre: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """H(pre − θ) as float. Gradients: ∂/∂pre = 0; ∂/∂θ = −(1/ε)·K((pre − θ)/ε)."""
    return (pre > threshold).astype(pre.dtype)


def _heaviside_fwd(pre, threshold, bandwidth):
    return heaviside(pre, threshold, bandwidth), (pre, threshold)


def _heaviside_bwd(bandwidth, res, g):
    pre, threshold = res
    d_theta = -(1.0 / bandwidth) * _rectangle((pre - threshold) / bandwidth) * g
    return jnp.zeros_like(pre), _sum_to(d_theta, jnp.shape(threshold))


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)
