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
COLUMNS = ("head dim", "key tokens", "stages", "Q slots")
# Each kernel template's integer parameters after the element type, by name (csrc/gna_*sm90*.cuh);
# a kernel not named here: COLUMNS in order.
PARAMS = {
    "fwd_sm90_kernel": ("head dim", "key tokens", "stages"),
    "fwd_items_sm90_kernel": ("head dim", "key tokens", "stages", "Q slots"),
    "fwd_tokens_sm90_kernel": ("head dim", "stages"),
    "dq_sm90_kernel": ("head dim", "stages"),
    "dkv_sm90_kernel": ("head dim", "stages"),
}


def rows(log: str):
    """(kernel, dtype, head dim, key tokens, stages, Q slots, arch, registers, stack, spill
    stores, spill loads) per sm90 kernel instance in the log; '-' where a kernel has no such
    template parameter."""
    pat = re.compile(r"Compiling entry function '_ZN3gna4sm90\d+(\w+?_sm90_kernel)I(6__half|13__nv_bfloat16)"
                     r"((?:Li\d+E)+)E\w*' for '(sm_\w+)'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                     r"(\d+) bytes spill loads.*?Used (\d+) registers", re.S)
    for m in pat.finditer(log):
        name, ty, ints, arch, stack, st, ld, regs = m.groups()
        values = dict(zip(PARAMS.get(name, COLUMNS), (int(v) for v in re.findall(r"Li(\d+)E", ints))))
        yield (name, TYPES[ty], *(values.get(c, "-") for c in COLUMNS), arch, int(regs), int(stack), int(st),
               int(ld))


def main(path: str) -> None:
    found = sorted(set(rows(open(path).read())), key=lambda r: tuple(str(x).zfill(4) for x in r))
    print("# ptxas report of the Hopper kernels (sm_90a)\n")
    print(f"From `{path}` (`bash scripts/build_cuda_lib.sh`, nvcc -Xptxas=-v).\n")
    print("| kernel | dtype | head dim | key tokens | stages | Q slots | arch | registers | stack bytes |"
          " spill stores | spill loads |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in found:
        print("| " + " | ".join(str(x) for x in r) + " |")
    spilled = [r for r in found if r[-2] or r[-1]]
    print(f"\n{len(found)} instances, {len(spilled)} with spills.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/dev90a/build.log")
