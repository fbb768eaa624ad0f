"""Eight simulated CPU devices for the mesh tests; set before JAX initialises. Tests that train on
one device say so with MeshConfig(data=1)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
