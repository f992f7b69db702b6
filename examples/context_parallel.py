"""Training step of a neighborhood-attention layer on a (data, context) mesh.

Activations are split over the batch ("data") and along the first spatial axis
("context"); parameters are replicated. Nothing else is needed: under ``jax.jit`` the
attention sees the sharded queries and exchanges only the halo rows of keys/values with
the neighbouring shards (collective-permute), never an all-gather of the sequence.

Runs on CPU with 8 fake devices (set below), or as it is on the GPUs of one machine,
any power-of-two number of them up to 128 (the mesh is (2, N / 2) for N >= 4 devices,
else (1, N); the 64 rows along X split over the N / 2 or N context shards):

    python examples/context_parallel.py
"""

import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from jax_gna import nn as gnn  # noqa: E402
from jax_gna import sharding  # noqa: E402


def main(steps: int = 5) -> None:
    n = jax.device_count()
    data = 2 if n >= 4 and n % 2 == 0 else 1
    # Auto axes: the op partitions under jit (custom partitioning); jax.make_mesh's
    # default, Explicit axes, would take its shard_map path
    mesh = jax.make_mesh((data, n // data), ("data", "context"), axis_types=(AxisType.Auto,) * 2)
    shape, kernel, channels = (64, 32), (7, 7), 64  # 2-D tokens, e.g. a latent image
    layer = gnn.NeighborhoodAttention2D(4, channels, kernel_size=kernel, stride=(1, 1),
                                        num_kv_heads=2, rope=True, normalize_qk=True,
                                        rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer, nnx.Param)

    rng = np.random.default_rng(0)
    acts = NamedSharding(mesh, P("data", "context", None, None))  # [B, X, Y, C]
    x = jax.device_put(jnp.asarray(rng.standard_normal((4, *shape, channels)), jnp.float32), acts)
    y = jax.device_put(jnp.asarray(rng.standard_normal((4, *shape, channels)), jnp.float32), acts)
    params = jax.device_put(params, NamedSharding(mesh, P()))

    @jax.jit
    def step(params, x, y):
        def loss(p):
            return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)

    hlo = step.lower(params, x, y).compile().as_text()
    counts = {op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
              for op in ("collective-permute", "all-gather", "all-to-all", "all-reduce")}
    print("collectives in the compiled step:", counts)
    shards = n // data
    (left, right), = sharding.halo_sizes(shape, kernel, shards={0: shards}).values()
    print(f"mesh {dict(mesh.shape)}; halo rows per shard along X: left={left}, right={right} "
          f"(an all-gather would bring {shape[0] - shape[0] // shards} rows)")
    for i in range(steps):
        value, params = step(params, x, y)
        print(f"step {i}: loss {float(value):.5f}")


if __name__ == "__main__":
    main()
