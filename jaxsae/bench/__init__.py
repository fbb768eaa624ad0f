"""`jaxsae bench`: the whole training step timed after compilation, its floor (one dense encoder matmul),
a breakdown of its parts, peak memory, and the PyTorch peers' training steps on the same shapes.

Modules: `inputs` (the shared batch and dead latents, numpy only), `timing` (clocks and RSS), `ours`
(our step, in its own process), `breakdown` (separately jitted pieces), `peers/` (one module per peer
library, each run in its own process), `runner` (runs those processes), `report` (the table), `machine`.
Nothing here imports jax or torch at module level except `ours` and `breakdown` (jax) and the peers (torch).
"""
