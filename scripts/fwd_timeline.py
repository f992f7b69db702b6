"""Where a Hopper forward CTA's time goes (a GPU measurement aid, 1-D problems).

Needs the library built with GNA_FWD_TIMELINE=1 (csrc/gna_fwd_sm90.cuh): each CTA's
first consumer thread then writes %globaltimer stamps over the lse of its tile's
first eight queries. Prints, over the tiles of one (warm) call: the kernel's span,
the medians of each phase, when the tiles start (waves) and, on one SM, the gap
between one tile's end and the next one's start and the tensor-idle handover (last
P V done to the next first S done).

usage (on the GPU): python3 scripts/fwd_timeline.py [tokens window stride heads] ...
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_gna import cuda
from jax_gna.params import Problem

PHASES = ["entry->Q landed", "Q->first S done", "key-tile loop", "last P V", "epilogue"]


def run(tokens: int, window: int, stride: int, heads: int) -> None:
    p = Problem(shape=(tokens,), kernel_size=(window,), stride=(stride,), dilation=(1,),
                is_causal=(False,), scale=128 ** -0.5)
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, tokens, heads, 128), jnp.bfloat16) for kk in key)
    if tokens % 128:
        raise SystemExit(f"tokens must be a multiple of the 128-token tile, got {tokens}")
    fn = jax.jit(lambda q, k, v: cuda.attention(q, k, v, p)[1])
    for _ in range(20):  # warm (clocks, caches); the last call is read
        lse = fn(q, k, v)
    raw = np.asarray(lse)[0].view(np.uint32)  # [tokens, heads]
    ntile = tokens // 128
    st = np.stack([raw[128 * t:128 * t + 8, h] for h in range(heads) for t in range(ntile)])
    t = st[:, 0:6].astype(np.int64)
    ns = (t - t[:, 0].min()) % (1 << 32)  # ns since the first CTA's entry (32-bit stamps)
    sm = st[:, 6]
    if (sm >= 1024).any() or (st[:, 7] >= 1 << 20).any():  # real lse values, not stamps
        raise SystemExit("no stamps in the lse: build the library with GNA_FWD_TIMELINE=1")
    print(f"== {tokens} w{window} s{stride} H{heads}: {len(st)} CTAs, {st[0, 7]} key tiles each; "
          f"span {ns[:, 5].max() / 1e3:.2f} us (first entry to last epilogue end)")
    for i, name in enumerate(PHASES):
        d_ns = ns[:, i + 1] - ns[:, i]
        print(f"  {name:18s} median {np.median(d_ns) / 1e3:7.2f} us, "
              f"max {d_ns.max() / 1e3:7.2f} us")
    starts = np.sort(ns[:, 0]) / 1e3
    print("  CTA entry times (us, percentiles 0/25/50/75/100):",
          " ".join(f"{x:.2f}" for x in np.percentile(starts, [0, 25, 50, 75, 100])))
    gaps, handover = [], []
    for s in np.unique(sm):
        rows = ns[sm == s]
        rows = rows[np.argsort(rows[:, 0])]
        gaps += list(rows[1:, 0] - rows[:-1, 5])
        handover += list(rows[1:, 2] - rows[:-1, 4])
    if gaps:
        print(f"  same SM, end of one tile's epilogue to the next tile's start: median "
              f"{np.median(gaps) / 1e3:.2f} us, max {np.max(gaps) / 1e3:.2f} us ({len(gaps)} gaps)")
        print(f"  same SM, one tile's last P V done to the next tile's first S done: median "
              f"{np.median(handover) / 1e3:.2f} us, max {np.max(handover) / 1e3:.2f} us")


if __name__ == "__main__":
    a = sys.argv[1:] or ["32768", "2048", "2048", "1"]
    for i in range(0, len(a), 4):
        run(*(int(x) for x in a[i:i + 4]))
