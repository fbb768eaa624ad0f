"""The device mesh and every sharding of the training state, in one place.

Logical layout (leading `sae` axis on every parameter): W_enc [S, d_in, F] -> P('sae', None, 'model');
b_enc, log_threshold, per-latent statistics [S, F] -> P('sae', 'model'); W_dec [S, F, d_in] ->
P('sae', 'model', None); b_dec [S, d_in] -> P('sae', None); per-SAE scalars [S] -> P('sae');
the batch [L, B, d_in] (L layers) -> P(None, 'data', None).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsae.config import ConfigError, MeshConfig
from jaxsae.selection import DATA, MODEL, SAE

# Parameter and statistic names -> spec of one SAE's array; the `sae` axis is prepended.
_LATENT_SPECS = {
    "W_enc": (None, MODEL),
    "b_enc": (MODEL,),
    "log_threshold": (MODEL,),
    "W_dec": (MODEL, None),
    "b_dec": (None,),
    "threshold": (),
}
BATCH = P(None, DATA, None)


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """Mesh ('sae', 'data', 'model') over the first sae·data·model of `devices` (default: all; with
    `data` 0, all of them). Auto axes, so that code outside shard_map is partitioned by the compiler."""
    devices = list(jax.devices() if devices is None else devices)
    data = cfg.data or len(devices) // (cfg.sae * cfg.model)
    n = cfg.sae * data * cfg.model
    if data == 0 or n > len(devices) or (cfg.data == 0 and n != len(devices)):
        raise ConfigError(
            f"mesh: sae {cfg.sae} × data {cfg.data or 'auto'} × model {cfg.model} does not fit "
            f"the {len(devices)} devices"
        )
    grid = np.array(devices[:n]).reshape(cfg.sae, data, cfg.model)
    return Mesh(grid, (SAE, DATA, MODEL), axis_types=(AxisType.Auto,) * 3)


def param_spec(name: str) -> P:
    """Spec of a parameter (or of its Adam moments) with the leading `sae` axis."""
    return P(SAE, *_LATENT_SPECS[name])


def params_specs(params: dict) -> dict:
    return {name: param_spec(name) for name in params}


def named(mesh: Mesh, specs):
    """A pytree of PartitionSpecs -> the same tree of NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


# TrainState fields holding one value per latent; every other unnamed leaf is one value per SAE.
_PER_LATENT_FIELDS = ("tokens_since_fired", "fire_count")
# Adam's moments are used element-wise only, so those of the two matrices are split over `data` as
# well (ZeRO-1): one copy per data replica would double the optimiser's memory.
_MOMENT_SPECS = {"W_enc": ((DATA, MODEL), 1), "W_dec": ((MODEL, DATA), 2)}  # spec, index of the d_in axis


def state_specs(state, data_size: int = 1) -> object:
    """PartitionSpecs for a TrainState (or any pytree of params, Adam moments and per-SAE values),
    found from each leaf's path: a parameter name gives its spec (Adam moments of W_enc / W_dec also
    split d_in over `data`, when `data_size` divides it), a per-latent field P('sae', 'model'),
    anything else P('sae')."""

    def spec(path, leaf) -> P:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        for name in reversed(names):
            if name in _MOMENT_SPECS and {"mu", "nu"} & set(names):
                moment_spec, d_axis = _MOMENT_SPECS[name]
                if leaf.shape[d_axis] % data_size == 0:
                    return P(SAE, *moment_spec)
            if name in _LATENT_SPECS:
                return param_spec(name)
            if name in _PER_LATENT_FIELDS:
                return P(SAE, MODEL)
        return P(SAE)

    return jax.tree_util.tree_map_with_path(spec, state)


def state_shardings(state, mesh: Mesh):
    """NamedShardings of a TrainState on `mesh` (see state_specs)."""
    return named(mesh, state_specs(state, mesh.shape[DATA]))
