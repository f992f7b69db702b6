"""Compare the SASS of the kernels two builds share (``cuobjdump -sass`` dumps).

usage: python3 scripts/sass_compare.py OLD.sass NEW.sass [REGEX]

For every function whose mangled name matches REGEX (default: all) and is in both dumps:
``same`` when their instruction sequences are equal (addresses and encodings dropped),
else the instruction counts and the first differing line.
"""

from __future__ import annotations

import re
import sys


def functions(path: str) -> dict[str, list[str]]:
    """Mangled name -> its instructions (opcode and operands, as printed)."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in open(path, errors="replace"):
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if m and cur is not None:
            cur.append(m.group(1))
    return out


def main(argv: list[str]) -> int:
    old, new = functions(argv[0]), functions(argv[1])
    pattern = re.compile(argv[2] if len(argv) > 2 else ".")
    differ = 0
    for name in sorted(set(old) & set(new)):
        if not pattern.search(name):
            continue
        a, b = old[name], new[name]
        if a == b:
            print(f"same  {len(a):6d}  {name}")
            continue
        differ += 1
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"DIFF  {len(a):6d} -> {len(b):6d}  {name}\n      first at {i}: "
              f"{a[i] if i < len(a) else '-'!r} -> {b[i] if i < len(b) else '-'!r}")
    only = sorted(n for n in set(new) - set(old) if pattern.search(n))
    for name in only:
        print(f"new   {len(new[name]):6d}  {name}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
