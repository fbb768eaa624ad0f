"""Where the step's time goes: separately jitted pieces built from the library's own functions.

`breakdown(cfg, mesh, state, x, ks)` returns seconds (median over `steps` calls) of:
  encoder_matmul  (x − b_dec) W_enc + b_enc                      one SAE, one device
  selection       sae.activate (TopK / BatchTopK / JumpReLU) + aux-k's top-k over dead latents
  decode          codes @ W_dec + b_dec, and aux-k's decode of the chosen dead latents
  forward         the step's loss (jaxsae.step.sharded_loss: every SAE, on the mesh)
  backward        (loss and gradient) − forward
  optimizer       gradient projection + Adam + unit-norm decoder rows (jaxsae.optimizer.update)
The first three run on one SAE, unsharded, on the first device; the last three on the mesh, like the step.
When the step uses sparse kernels (jaxsae.sparse_loss), the encoder matmul and decode are the sparse
step's kernels, and selection is the fused encoder-and-selection (sparse_loss.select) less the matmul.
When it also takes the fused update (jaxsae.fused_step, on one device), backward is its forward and
backward less forward, and optimizer the rest of its update: the gradient scatters fused with Adam.

To time another implementation of a piece, pass `pieces={"selection": my_piece, ...}`: a piece is a
function `Ctx -> (jitted function, args)`; a "backward" piece, when given, is timed directly instead
of being derived from forward_backward − forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from jaxsae import fused_step, sae, sparse_loss
from jaxsae import optimizer as optim
from jaxsae.bench import timing
from jaxsae.config import RunConfig
from jaxsae.kernels import ops
from jaxsae.selection import topk_mask
from jaxsae.step import (
    TrainState,
    frozen,
    loss_hparams,
    sharded_loss,
    trainable,
    use_fused_update,
    use_sparse_kernels,
)


@dataclass(frozen=True)
class Ctx:
    """Everything a piece may need, built once: the step's inputs on the mesh, and one SAE's
    arrays (params, scaled rows, dead mask, pre-activations, codes) on the first device."""

    cfg: RunConfig
    mesh: jax.sharding.Mesh
    state: TrainState
    x: jax.Array  # [L, B, d_in] raw, sharded like the step's batch
    ks: jax.Array  # [S]
    params: dict  # SAE 0
    rows: jax.Array  # [B, d_in] scaled rows of SAE 0's layer
    dead: jax.Array  # [F] bool
    k: int
    pre: jax.Array  # [B, F]
    codes: jax.Array  # [B, F]
    aux_mask: jax.Array  # [B, F] bool: aux-k's chosen dead latents


Piece = Callable[[Ctx], tuple[Callable, tuple]]


def _aux_mask(params: dict, pre: jax.Array, dead: jax.Array) -> jax.Array:
    """As jaxsae.losses.aux_k_loss chooses: each row's d_in/2 largest dead ReLU activations."""
    k_aux = min(params["W_dec"].shape[1] // 2, pre.shape[1])
    dead_acts = jnp.where(dead, jax.nn.relu(pre), -1.0)
    return topk_mask(dead_acts, k_aux, k_aux, None) & dead


def encoder_matmul(ctx: Ctx) -> tuple[Callable, tuple]:
    return jax.jit(sae.pre_activations), (ctx.params, ctx.rows)


def selection(ctx: Ctx) -> tuple[Callable, tuple]:
    cfg = ctx.cfg.sae

    def select(params, pre, dead):
        codes, _ = sae.activate(cfg, params, pre, training=True, k=ctx.k)
        if cfg.architecture in ("topk", "batchtopk"):
            return codes, _aux_mask(params, pre, dead)
        return codes

    return jax.jit(select), (ctx.params, ctx.pre, ctx.dead)


def decode(ctx: Ctx) -> tuple[Callable, tuple]:
    cfg = ctx.cfg.sae

    def dec(params, codes, pre, aux_mask):
        x_hat = sae.decode(cfg, params, codes)
        if cfg.architecture in ("topk", "batchtopk"):
            return x_hat, jnp.where(aux_mask, jax.nn.relu(pre), 0.0) @ params["W_dec"]
        return x_hat

    return jax.jit(dec), (ctx.params, ctx.codes, ctx.pre, ctx.aux_mask)


def _loss_args(ctx: Ctx) -> tuple:
    state, cfg = ctx.state, ctx.cfg
    dead = state.tokens_since_fired >= cfg.train.dead_tokens
    hp = jax.vmap(partial(loss_hparams, cfg))(ctx.ks, state.step)
    params = trainable(state.params)
    return params, frozen(state.params), ctx.x, dead, hp, state.input_scale, state.layer


def forward(ctx: Ctx) -> tuple[Callable, tuple]:
    return jax.jit(sharded_loss(ctx.cfg, ctx.mesh)), _loss_args(ctx)


def forward_backward(ctx: Ctx) -> tuple[Callable, tuple]:
    return jax.jit(jax.grad(sharded_loss(ctx.cfg, ctx.mesh), has_aux=True)), _loss_args(ctx)


def optimizer(ctx: Ctx) -> tuple[Callable, tuple]:
    """The step's optimiser update (jaxsae.optimizer.update), on copies of the params and Adam state
    that it donates and replaces call after call, as the step does (in place)."""
    grads, _ = forward_backward(ctx)[0](*_loss_args(ctx))
    ok = jnp.ones(ctx.state.step.shape, bool)
    update = jax.jit(partial(optim.update, ctx.cfg.train, ctx.mesh), donate_argnums=(0, 2))
    box = [jax.tree.map(jnp.copy, (trainable(ctx.state.params), ctx.state.opt_state))]

    def step(grads):
        box[0] = update(box[0][0], grads, box[0][1], ok)
        return box[0]

    return step, (grads,)


def fused_backward(ctx: Ctx) -> tuple[Callable, tuple]:
    """The fused step's forward and backward (jaxsae.fused_step.tap_gradients: the small parameters' and
    the taps' gradients, no [F, d] gradient), on one device."""
    params, fixed, x, dead, hp, scale, layer = _loss_args(ctx)
    return jax.jit(partial(fused_step.tap_gradients, ctx.cfg)), (params, fixed, x, dead, hp, scale, layer)


def fused_update(ctx: Ctx) -> tuple[Callable, tuple]:
    """The fused step's whole update (jaxsae.fused_step.update: backward, scatters and Adam in one), on
    copies of the params and Adam state that it donates and replaces call after call."""
    params, fixed, x, dead, hp, scale, layer = _loss_args(ctx)
    update = jax.jit(partial(fused_step.update, ctx.cfg, ctx.mesh), donate_argnums=(0, 2))
    box = [jax.tree.map(jnp.copy, (params, ctx.state.opt_state))]
    everyone = jnp.ones(ctx.state.step.shape, bool)

    def step(*args):
        new_params, new_opt, _, _ = update(box[0][0], fixed, box[0][1], *args)
        box[0] = (new_params, new_opt)
        return box[0]

    return step, (x, dead, hp, scale, layer, everyone)


def _sparse_select(ctx: Ctx) -> tuple[Callable, tuple]:
    """The sparse step's whole selection (jaxsae.sparse_loss.select: on the CPU the encoder fused with
    the per-row selections), for SAE 0."""
    hp = loss_hparams(ctx.cfg, ctx.k, ctx.state.step[0])
    select = partial(sparse_loss.select, ctx.cfg.sae, hp=hp, k_max=ctx.k)
    return jax.jit(select), (ctx.params, ctx.rows, ctx.dead)


def sparse_encoder_matmul(ctx: Ctx) -> tuple[Callable, tuple]:
    """The encoder matmul as the sparse step's kernels compute it (on the CPU: OpenBLAS in row blocks)."""
    def encode(p, rows):
        return ops.encode(rows - p["b_dec"], p["W_enc"], p["b_enc"])

    return jax.jit(encode), (ctx.params, ctx.rows)


def sparse_decode(ctx: Ctx) -> tuple[Callable, tuple]:
    """The sparse decode of the codes and of aux-k's dead latents (chunked ELL, jaxsae.kernels)."""
    fn, args = _sparse_select(ctx)
    sel = fn(*args)

    def dec(params, sel):
        b = ctx.rows.shape[0]
        main = ops.decode(sel.row, sel.idx, jax.nn.relu(sel.pre), params["W_dec"], b)
        aux = ops.decode(sel.aux_row, sel.aux_idx, jax.nn.relu(sel.aux_pre), params["W_dec"], b)
        return main, aux

    return jax.jit(dec), (ctx.params, sel)


# The fused step (jaxsae.fused_step, one device): backward = its gradients − forward, optimizer = the
# scatters of W_enc's and W_dec's gradients fused with Adam (+ the small parameters' Adam) = the rest.
FUSED_PIECES: dict[str, Piece] = {"fused_backward": fused_backward, "fused_update": fused_update}

SPARSE_PIECES: dict[str, Piece] = {
    "encoder_matmul": sparse_encoder_matmul,
    "encode_select": _sparse_select,  # selection = encode_select − encoder_matmul (they are fused)
    "decode": sparse_decode,
}


PIECES: dict[str, Piece] = {
    "encoder_matmul": encoder_matmul,
    "selection": selection,
    "decode": decode,
    "forward": forward,
    "forward_backward": forward_backward,
    "optimizer": optimizer,
}


def make_ctx(cfg: RunConfig, mesh, state: TrainState, x: jax.Array, ks: jax.Array) -> Ctx:
    """SAE 0's arrays gathered onto the first device, and its pre-activations, codes and aux-k choice."""
    device = jax.devices()[0]
    params = jax.device_put({n: v[0] for n, v in state.params.items()}, device)
    layer, scale = int(state.layer[0]), state.input_scale[0]
    rows = jax.device_put((x[layer] * scale).astype(jnp.float32), device)
    dead = jax.device_put(state.tokens_since_fired[0] >= cfg.train.dead_tokens, device)
    k = cfg.sae_ks()[0]
    pre = jax.jit(sae.pre_activations)(params, rows)
    codes, _ = jax.jit(partial(sae.activate, cfg.sae, training=True, k=k))(params, pre)
    aux_mask = jax.jit(_aux_mask)(params, pre, dead)
    return Ctx(cfg, mesh, state, x, ks, params, rows, dead, k, pre, codes, aux_mask)


def time_piece(piece: Piece, ctx: Ctx, steps: int) -> float:
    """Median seconds of the piece's jitted function, after one compiling call."""
    fn, args = piece(ctx)
    return timing.summary(timing.time_calls(lambda: fn(*args), steps, 1, jax.block_until_ready))["median"]


def breakdown(
    cfg: RunConfig,
    mesh,
    state: TrainState,
    x: jax.Array,
    ks: jax.Array,
    *,
    steps: int = 3,
    pieces: dict[str, Piece] | None = None,
) -> dict[str, float]:
    """Seconds of each part of the step (see the module docstring); `pieces` replaces some of PIECES."""
    sparse = use_sparse_kernels(cfg, mesh)
    fused = use_fused_update(cfg, mesh) and mesh.devices.size == 1
    skip = {"selection"} if sparse else set()
    skip |= {"forward_backward", "optimizer"} if fused else set()
    base = {n: p for n, p in PIECES.items() if n not in skip}
    extra = {**(SPARSE_PIECES if sparse else {}), **(FUSED_PIECES if fused else {})}
    pieces = {**base, **extra, **(pieces or {})}
    ctx = make_ctx(cfg, mesh, state, x, ks)
    measured = {name: time_piece(piece, ctx, steps) for name, piece in pieces.items()}
    if "encode_select" in measured:
        measured["selection"] = max(measured.pop("encode_select") - measured["encoder_matmul"], 0.0)
    if "fused_update" in measured:
        backward = measured.pop("fused_backward")
        measured["optimizer"] = max(measured.pop("fused_update") - backward, 0.0)
        measured["forward_backward"] = backward
    if "backward" not in measured:
        measured["backward"] = max(measured["forward_backward"] - measured["forward"], 0.0)
    order = ("encoder_matmul", "selection", "decode", "forward", "backward", "optimizer")
    return {name: measured[name] for name in order} | {n: v for n, v in measured.items() if n not in order}
