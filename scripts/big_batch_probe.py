"""The cuda backend on a batch above 65535 (CUDA's largest grid z: several launches), step by
step with timings, each step logged as it ends, the Python stacks dumped after PROBE_LIMIT
seconds (default 80: a hang shows where). 1-D, window 9, one head, inputs repeating every 7
batch entries: checks every entry is finite and equal to its twin 7k entries before.
usage (on the GPU): python3 scripts/big_batch_probe.py BATCH LENGTH HEAD_DIM fwd|time|bwd [DTYPE]
  time: also the forward's wall time per call (median of 15); bwd: also dq, dk, dv."""
import faulthandler, os, sys, time
faulthandler.dump_traceback_later(float(os.environ.get("PROBE_LIMIT", "80")), exit=True)
import jax, jax.numpy as jnp
from jax_gna import cuda
from jax_gna.params import Problem

b, n, d, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dt = jnp.bfloat16 if len(sys.argv) < 6 else jnp.dtype(sys.argv[5])
problem = Problem(shape=(n,), kernel_size=(9,), stride=(1,), dilation=(1,), is_causal=(False,), scale=d ** -0.5)
period = 7
t0 = time.time()
def log(*a):
    print(f"[{time.time() - t0:7.2f}s]", *a, flush=True)
log("b", b, "n", n, "d", d, mode, dt.__name__ if hasattr(dt, "__name__") else dt, "PDL", os.environ.get("JAX_GNA_PDL"))
log(cuda.kernel_path(problem, (b, n, 1, d), (b, n, 1, d), dt))
entry = jnp.arange(b) % period
small = [jax.random.normal(jax.random.PRNGKey(i), (period, n, 1, d), jnp.float32).astype(dt) for i in range(3)]
big = [x[entry] for x in small]
jax.block_until_ready(big); log("inputs")
f = jax.jit(lambda q, k, v: cuda._attention_poisoned(q, k, v, problem))
low = f.lower(*big); comp = low.compile(); log("compiled")
out, lse = comp(*big); jax.block_until_ready((out, lse)); log("forward ran")
bad = ~jnp.isfinite(out.astype(jnp.float32)).all(axis=(1, 2, 3))
log("non-finite entries:", int(bad.sum()), "first", int(jnp.argmax(bad)) if bool(bad.any()) else None)
diff = jnp.abs(out.astype(jnp.float32) - out[:period].astype(jnp.float32)[entry]).max(axis=(1, 2, 3))
log("largest difference from its period twin:", float(diff.max()), "at", int(jnp.argmax(diff)))
if mode == "time":
    import numpy as np
    g = jax.jit(lambda q, k, v: cuda.attention(q, k, v, problem))
    jax.block_until_ready(g(*big))
    ts = []
    for _ in range(15):
        t = time.perf_counter(); jax.block_until_ready(g(*big)); ts.append(time.perf_counter() - t)
    log(f"forward median {np.median(ts) * 1e3:.3f} ms over 15 (min {min(ts) * 1e3:.3f})")
if mode == "bwd":
    w = jax.random.normal(jax.random.PRNGKey(9), (period, n, 1, d), jnp.float32)[entry]
    g = jax.jit(jax.grad(lambda q, k, v, w: jnp.sum(cuda._attention_poisoned(q, k, v, problem)[0].astype(jnp.float32) * w),
                         argnums=(0, 1, 2)))
    gc = g.lower(*big, w).compile(); log("bwd compiled")
    grads = gc(*big, w); jax.block_until_ready(grads); log("backward ran")
    for name, x in zip(("dq", "dk", "dv"), grads):
        x = x.astype(jnp.float32)
        bad = ~jnp.isfinite(x).all(axis=(1, 2, 3))
        diff = jnp.abs(x - x[:period][entry]).max(axis=(1, 2, 3))
        log(name, "non-finite entries:", int(bad.sum()), "largest twin difference:", float(diff.max()), "at", int(jnp.argmax(diff)))
log("done")
