"""A markdown table of the Hopper kernel instances from an nvcc -Xptxas=-v build log.

    python3 scripts/ptxas_report.py build/dev90a/build.log > benchmarks/results/hopper-ptxas.md

(scripts/build_cuda_lib.sh writes that log.) Registers are the launch-bound allocation
(384 threads x 168); `setmaxnreg` then moves them to 40 (producer) / 232 (consumers) in the
forward and dQ kernels, 24 / 240 in the dK/dV kernel.
"""

from __future__ import annotations

import re
import sys

TYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16"}


def rows(log: str):
    pat = re.compile(r"Compiling entry function '_ZN3gna4sm90\d+(\w+?_sm90_kernel)I(6__half|13__nv_bfloat16)"
                     r"Li(\d+)ELi(\d+)E\w*' for '(sm_\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                     r"(\d+) bytes spill loads.*?Used (\d+) registers", re.S)
    for m in pat.finditer(log):
        name, ty, d, stages, arch, stack, st, ld, regs = m.groups()
        yield name, TYPES[ty], int(d), int(stages), arch, int(regs), int(stack), int(st), int(ld)


def main(path: str) -> None:
    found = sorted(set(rows(open(path).read())))
    print("# ptxas report of the Hopper kernels (sm_90a)\n")
    print(f"From `{path}` (`bash scripts/build_cuda_lib.sh`, nvcc -Xptxas=-v).\n")
    print("| kernel | dtype | head dim | stages | arch | registers | stack bytes | spill stores | spill loads |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in found:
        print("| " + " | ".join(str(x) for x in r) + " |")
    spilled = [r for r in found if r[7] or r[8]]
    print(f"\n{len(found)} instances, {len(spilled)} with spills.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/dev90a/build.log")
