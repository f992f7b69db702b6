"""Where a Hopper forward CTA's time goes (a GPU measurement aid, 1-D problems).

Needs the library built with GNA_FWD_TIMELINE=1 (csrc/gna_fwd_sm90.cuh): the first
thread of each consumer warpgroup then writes %globaltimer stamps over the lse of its
first rows (the tokens must fill whole 128-query tiles). Prints, over the tiles of one
(warm) call: the kernel's span, the medians of each phase per warpgroup, how far the
second warpgroup trails, when the tiles start (waves), how long a tile's Q took from the
producer's load to warpgroup 0 passing its wait and, on one SM, the gap between one
CTA's end and the next one's entry and the tensor-idle handover (a query tile's last P V
done to the next tile's first S done, the next CTA's or, with several query tiles per
CTA, JAX_GNA_FWD_ITEMS, the same CTA's: point 0 is then the CTA's entry, the others the
tile's; with one Q slot, head dim 128 and 128-token key tiles, "O into shared memory" is
the O's stores to global memory, the barrier and TMA store phases are empty, and the
next tile's Q load is timed from warpgroup 1's loop end, when the slot is released).
The build writes the stamps at the CTA's end, so the gap between CTAs includes that
writing (a cost of the build alone), and stamps only a CTA's first 8 query tiles
(JAX_GNA_FWD_ITEMS <= 8).
(JAX_GNA_BUILD_TAG=tl JAX_GNA_EXTRA_CUDA_FLAGS=-DGNA_FWD_TIMELINE=1 bash
scripts/build_cuda_lib.sh builds it beside the normal one.)

usage (on the GPU): python3 scripts/fwd_timeline.py [tokens window stride heads] ...
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_gna import cuda
from jax_gna.params import Problem

POINTS = 8  # stamps per consumer warpgroup (csrc/gna_fwd_sm90.cuh, Stamps)
PHASES = ["entry->Q landed", "Q->first S done", "key-tile loop", "last P V", "O into shared memory",
          "warpgroup barrier", "TMA store + wait"]


def stamps(lse: np.ndarray, tokens: int, heads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The timeline build's stamps out of the lse ([tokens, heads]): per tile (head-major)
    both warpgroups' POINTS stamps in ns since the first CTA's entry ([tiles, 2, POINTS]),
    the SM, the key-tile count and when the producer issued the tile's Q load (ns)."""
    raw = lse.view(np.uint32)
    ntile = tokens // 128
    rows = [(t, h) for h in range(heads) for t in range(ntile)]
    wg0 = np.stack([raw[128 * t:128 * t + POINTS + 3, h] for t, h in rows])
    wg1 = np.stack([raw[128 * t + 64:128 * t + 64 + POINTS, h] for t, h in rows])
    sm, n = wg0[:, POINTS], wg0[:, POINTS + 1]
    if (sm >= 1024).any() or (n >= 1 << 20).any():  # real lse values, not stamps
        raise SystemExit("no stamps in the lse: build the library with GNA_FWD_TIMELINE=1")
    t = np.stack([wg0[:, :POINTS], wg1], axis=1).astype(np.int64)
    t0 = t[0, 0, 0]

    def since(x):  # 32-bit stamps: differences from one stamp, signed (the kernel lasts < 2 s)
        return (x.astype(np.int64) - t0 + (1 << 31)) % (1 << 32) - (1 << 31)
    d = since(t)
    first = d[:, :, 0].min()  # then from the first entry
    return d - first, sm, n, since(wg0[:, POINTS + 2]) - first


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
    ns, sm, n, qi = stamps(np.asarray(lse)[0], tokens, heads)
    end = ns[:, :, POINTS - 1].max(axis=1)  # the CTA's last warpgroup done
    print(f"== {tokens} w{window} s{stride} H{heads}: {len(ns)} CTAs, {n[0]} key tiles each; "
          f"span {end.max() / 1e3:.2f} us (first entry to last epilogue end)")
    for w in range(2):
        print(f"  consumer warpgroup {w}:")
        for i, name in enumerate(PHASES):
            d_ns = ns[:, w, i + 1] - ns[:, w, i]
            print(f"    {name:22s} median {np.median(d_ns) / 1e3:7.2f} us, max {d_ns.max() / 1e3:7.2f} us")
    lag = ns[:, 1, 4] - ns[:, 0, 4]
    print(f"  warpgroup 1's last P V after warpgroup 0's: median {np.median(lag) / 1e3:.2f} us; "
          f"CTA end after warpgroup 0's end: median {np.median(end - ns[:, 0, POINTS - 1]) / 1e3:.2f} us")
    starts = np.sort(ns[:, 0, 0]) / 1e3
    print("  CTA entry times (us, percentiles 0/25/50/75/100):",
          " ".join(f"{x:.2f}" for x in np.percentile(starts, [0, 25, 50, 75, 100])))
    landed = ns[:, 0, 1] - qi
    print(f"  the Q load issued to warpgroup 0 past its wait: median {np.median(landed) / 1e3:.2f} us, "
          f"max {landed.max() / 1e3:.2f} us")
    gaps, handover, issued = [], [], []
    for s in np.unique(sm):
        idx = np.flatnonzero(sm == s)
        idx = idx[np.argsort(ns[idx, 0, 1])]  # by the time the tile's Q landed
        for a, b in zip(idx[:-1], idx[1:]):
            if ns[b, 0, 0] != ns[a, 0, 0]:  # another CTA
                gaps.append(ns[b, 0, 0] - end[a])
            else:  # the same CTA's next query tile: when its Q load went out
                issued.append(qi[b] - ns[a, 1, 3])
            handover.append(ns[b, :, 2].min() - ns[a, :, 4].max())
    if gaps:
        print(f"  same SM, the CTA's end (both warpgroups' epilogues) to the next one's entry: median "
              f"{np.median(gaps) / 1e3:.2f} us, max {np.max(gaps) / 1e3:.2f} us ({len(gaps)} gaps)")
    if handover:
        print(f"  same SM, a tile's last P V done to the next tile's first S done: median "
              f"{np.median(handover) / 1e3:.2f} us, max {np.max(handover) / 1e3:.2f} us ({len(handover)})")
    if issued:
        print(f"  same CTA, the next tile's Q load issued after warpgroup 1's key-tile loop ended: median "
              f"{np.median(issued) / 1e3:.2f} us, max {np.max(issued) / 1e3:.2f} us ({len(issued)})")


if __name__ == "__main__":
    a = sys.argv[1:] or ["32768", "2048", "2048", "1"]
    for i in range(0, len(a), 4):
        run(*(int(x) for x in a[i:i + 4]))
