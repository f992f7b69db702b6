"""Pairs against one CTA per tile, bitwise, on two problems (JAX_GNA_FWD_PAIR read per call)."""
import os, sys
sys.path.insert(0, "scripts")
import jax, numpy as np
from profile_sm90 import problem
for prob in (("256x256", "80x80", "16x16", "4"), ("30x48x80", "30x40x40", "1x32x8", "2"), ("64x64", "16", "16", "3")):
    op, qkv = problem(*prob)
    f = jax.jit(op)
    outs = []
    for env in ("0", "1"):
        os.environ["JAX_GNA_FWD_PAIR"] = env
        outs.append(np.asarray(jax.block_until_ready(f(*qkv))).view(np.uint16))
    os.environ.pop("JAX_GNA_FWD_PAIR")
    print(prob, "bitwise equal:", bool((outs[0] == outs[1]).all()), "finite:", bool(np.isfinite(outs[1].view(jax.numpy.bfloat16)).all()), flush=True)
