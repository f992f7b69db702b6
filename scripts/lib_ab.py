"""Kernel times of several builds of the library side by side: the records that
scripts/device_session.sh's `libab` stage writes (scripts/kernel_profile.py run once per
build and round, builds alternating, the other builds through LD_PRELOAD), as a markdown
table with each build's per-round medians and the change of its mean against the build
named "base" (else the first build). Per record its longest kernel (the forward's), for
"ours bwd" the GPU time per call (the backward's kernels summed).

usage: python3 scripts/lib_ab.py DIR   (DIR holds NAME_ROUND.json, e.g. base_1.json)
"""

from __future__ import annotations

import json
import os
import re
import sys


def load(folder: str) -> tuple[list[str], dict[tuple[str, str, str], dict[str, list[float]]]]:
    """The builds in the order they first appear (by round, then name), and kernel_s (gpu_s
    for "ours bwd") per (problem, dtype, who) per build, one value per round (rounds in
    order)."""
    files = [f for f in os.listdir(folder) if re.fullmatch(r".+_[0-9]+\.json", f)]
    if not files:
        raise SystemExit(f"no NAME_ROUND.json records in {folder}")
    builds: list[str] = []
    times: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for f in sorted(files, key=lambda f: (int(f.rsplit("_", 1)[1][:-5]), f)):
        name = f.rsplit("_", 1)[0]
        if name not in builds:
            builds.append(name)
        with open(os.path.join(folder, f)) as fh:
            for r in json.load(fh)["records"]:
                key = (r["problem"], r["dtype"], r["who"])
                # The backward's kernels summed (GPU time per call); else the longest kernel.
                t = r["gpu_s"] if r["who"] == "ours bwd" else r["kernel_s"]
                times.setdefault(key, {}).setdefault(name, []).append(t)
    return builds, times


def table(builds: list[str], times: dict, base: str | None = None) -> str:
    """Markdown: one row per (problem, dtype, who), per build its rounds and, after the
    first (or ``base``), the change of the mean against it."""
    base = base or ("base" if "base" in builds else builds[0])
    us = lambda s: f"{s * 1e6:.1f}" if s < 1e-3 else f"{s * 1e3:.3f}e3"  # noqa: E731
    head = "| problem | dtype | kernel | " + " | ".join(
        b + ("" if b == base else f" (vs {base})") for b in builds) + " |"
    out = [head, "|" + " --- |" * (3 + len(builds))]
    for (prob, dt, who), per in times.items():
        cells = []
        for b in builds:
            t = per.get(b, [])
            cell = ", ".join(us(x) for x in t) or "-"
            if b != base and t and per.get(base):
                m, m0 = sum(t) / len(t), sum(per[base]) / len(per[base])
                cell += f" ({100 * (m / m0 - 1):+.1f}%)"
            cells.append(cell)
        out.append(f"| {prob} | {dt} | {who} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n\nTimes in us (e3: ms); each build's rounds in order.\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(table(*load(argv[0])), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
