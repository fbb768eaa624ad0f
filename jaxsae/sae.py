"""The SAE as pure functions over a dict of arrays.

Params (float32): `W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_in] (unit-norm rows),
`b_dec` [d_in]; `log_threshold` [d_sae] for jumprelu (θ = exp(log θ), trained); `threshold` [] for
batchtopk (the inference threshold, an EMA of the smallest kept value; not trained, -1 until set).

pre = (x − b_dec) W_enc + b_enc;  x̂ = f(pre) W_dec + b_dec. The SAE works on scaled inputs
(x · input_scale, see `estimate_input_scale`); `fold_input_scale` makes an SAE that takes raw inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.activations import jumprelu
from jaxsae.config import SAEConfig
from jaxsae.selection import batchtopk_mask, topk_mask, vary

Params = dict[str, jax.Array]

# Parameters the optimiser updates; the rest (batchtopk's threshold) is set by the training step.
TRAINABLE = ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")


def init(cfg: SAEConfig, key: jax.Array, sample: jax.Array | None = None) -> Params:
    """Decoder rows random unit vectors, W_enc = W_decᵀ, b_enc 0, b_dec the geometric median of
    `sample` [N, d_in] (zeros without one)."""
    w_dec = jax.random.normal(key, (cfg.d_sae, cfg.d_in), jnp.float32)
    w_dec = unit_rows(w_dec)
    b_dec = geometric_median(sample) if sample is not None else jnp.zeros(cfg.d_in, jnp.float32)
    params = {
        "W_enc": w_dec.T,
        "b_enc": jnp.zeros(cfg.d_sae, jnp.float32),
        "W_dec": w_dec,
        "b_dec": b_dec.astype(jnp.float32),
    }
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = jnp.full(cfg.d_sae, np.log(cfg.jumprelu_init_threshold), jnp.float32)
    if cfg.architecture == "batchtopk":
        params["threshold"] = jnp.array(-1.0, jnp.float32)
    return params


def unit_rows(w: jax.Array) -> jax.Array:
    """Rows of `w` [F, d] scaled to unit L2 norm."""
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)


def project_out_parallel(w_dec: jax.Array, grad: jax.Array) -> jax.Array:
    """Removes from each gradient row its component along the (unit) decoder row."""
    return grad - jnp.sum(grad * w_dec, axis=-1, keepdims=True) * w_dec


def geometric_median(x: jax.Array, iters: int = 32) -> jax.Array:
    """Weiszfeld's geometric median of rows of `x` [N, d]; robust to a few huge rows."""
    x = jnp.asarray(x, jnp.float32)
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), 1e-8)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


def matmul(a: jax.Array, b: jax.Array, dtype: str = "float32") -> jax.Array:
    """a @ b with both operands rounded to `dtype` (float32 or bfloat16), accumulated and returned in
    float32; gradients reach a and b in their own dtypes."""
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def pre_activations(params: Params, x: jax.Array, dtype: str = "float32") -> jax.Array:
    """[B, d_in] -> [B, d_sae] float32: (x − b_dec) W_enc + b_enc, the matmul in `dtype`."""
    return matmul(x - params["b_dec"], params["W_enc"], dtype) + params["b_enc"]


def activate(
    cfg: SAEConfig,
    params: Params,
    pre: jax.Array,
    *,
    training: bool = False,
    k: jax.Array | int | None = None,
    k_max: int | None = None,
    data: str | None = None,
    model: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Codes [B, d_sae] from pre-activations, and a scalar: batchtopk's smallest kept value (0 otherwise).

    batchtopk keeps exactly k·B codes of the batch when `training`, else those above `threshold`.
    `k` overrides cfg.k (it may be traced; then `k_max` bounds it). Inside shard_map, `data` and
    `model` name the mesh axes that split the rows and the latents."""
    k = cfg.k if k is None else k
    k_max = k_max or (k if isinstance(k, int) else cfg.k)
    zero = jnp.zeros((), pre.dtype)
    acts = jax.nn.relu(pre)
    if cfg.architecture == "relu":
        return acts, zero
    if cfg.architecture == "topk":
        return jnp.where(topk_mask(acts, k, k_max, model), acts, 0.0), zero
    if cfg.architecture == "jumprelu":
        return jumprelu(pre, vary(jnp.exp(params["log_threshold"]), data), cfg.jumprelu_bandwidth), zero
    if training:
        mask, smallest = batchtopk_mask(acts, k, data, model)
        return jnp.where(mask, acts, 0.0), smallest
    return jnp.where(acts > params["threshold"], acts, 0.0), zero


def encode(cfg: SAEConfig, params: Params, x: jax.Array, *, training: bool = False) -> jax.Array:
    """[B, d_in] -> codes [B, d_sae] (see `activate`)."""
    return activate(cfg, params, pre_activations(params, x), training=training)[0]


def decode(cfg: SAEConfig, params: Params, codes: jax.Array) -> jax.Array:
    """codes [B, d_sae] -> reconstruction [B, d_in]."""
    del cfg
    return codes @ params["W_dec"] + params["b_dec"]


def fold_input_scale(params: Params, scale: float | jax.Array) -> Params:
    """An SAE on raw inputs equal to `params` applied to `x · scale` (decoded back to raw units):
    W_enc·s, b_dec/s, W_dec/s; thresholds and b_enc unchanged."""
    out = dict(params)
    out["W_enc"] = params["W_enc"] * scale
    out["W_dec"] = params["W_dec"] / scale
    out["b_dec"] = params["b_dec"] / scale
    return out


def estimate_input_scale(sample: np.ndarray) -> float:
    """Scalar s with E‖s·x‖² = d_in over `sample` [N, d_in], ignoring outlier rows (norm > 10× the
    median norm: Whisper's 'massive' frames would otherwise dominate the mean)."""
    sample = np.asarray(sample, np.float32)
    norms = np.linalg.norm(sample, axis=1)
    typical = norms <= 10 * np.median(norms)
    mean_sq = float(np.mean(norms[typical] ** 2))
    if not np.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError("cannot estimate the input scale: the sample is all zeros or not finite")
    return float(np.sqrt(sample.shape[1] / mean_sq))
