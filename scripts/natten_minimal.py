#!/usr/bin/env python3
"""Build a minimal NATTEN from its source distribution: only the kernels a benchmark needs.

NATTEN's build (``setup.py``) generates thousands of kernel instantiations
(``scripts/autogen_*.py`` -> ``csrc/autogen/src/cuda/<category>/source_*.cu``); a full
sm_90 build takes hours on 16 cores. This script keeps every generated function
(so the dispatchers, which are generated separately, still link) but replaces the
body of each kernel whose name does not match ``--keep`` with a stub, and moves the
kept kernels into one source file each, so they compile in parallel.

Two uses:

* ``natten_minimal.py patch-setup SRC_DIR``: patch NATTEN's ``setup.py`` so that, after
  its autogen step, it runs ``natten_minimal.py stub AUTOGEN_DIR`` with the regex in
  ``$NATTEN_KEEP_KERNELS`` (and calls autogen scripts with ``sys.executable``).
* ``natten_minimal.py stub AUTOGEN_DIR --keep REGEX``: rewrite the generated sources.

Stubbed ``__global__`` kernels get an empty body; stubbed host launchers throw.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

_NS = re.compile(r"namespace\s+\w+\s*$")
_IDENT = re.compile(r"[A-Za-z_]\w*$")
_STUB_HOST = ('{\n  throw std::runtime_error("jax_gna minimal NATTEN build: kernel %s was not '
              'compiled");\n}')


def _match(text: str, i: int, open_: str, close: str, step: int) -> int:
    depth = 0
    while 0 <= i < len(text):
        c = text[i]
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise ValueError(f"unbalanced {open_}{close}")


def split_functions(text: str):
    """(prefix, [(name, chunk, body_start, body_end)], suffix) of one generated source.

    A function is a ``{`` at namespace level whose preceding non-blank character is
    ``)``; its chunk runs from the end of the previous item to its closing brace.
    Offsets in the tuples are relative to the chunk.
    """
    funcs = []
    i, first = 0, None
    last_end = 0
    while True:
        j = text.find("{", i)
        if j < 0:
            break
        before = text[:j].rstrip()
        if _NS.search(before[-200:]):  # namespace opening: step inside
            i = j + 1
            last_end = i
            continue
        if not before.endswith(")"):
            # Any other brace at namespace level (none expected in generated code).
            raise ValueError(f"unexpected '{{' at offset {j}: {text[max(0, j - 80):j + 1]!r}")
        close_paren = len(before) - 1
        open_paren = _match(text, close_paren, ")", "(", -1)
        m = _IDENT.search(text[:open_paren].rstrip())
        if not m:
            raise ValueError(f"no function name before offset {open_paren}")
        end = _match(text, j, "{", "}", 1)
        chunk_start = last_end  # banners and blank lines go with the function
        if first is None:
            first = chunk_start  # the prefix ends with the last namespace's brace
        funcs.append((m.group(0), text[chunk_start:end + 1], j - chunk_start,
                      end + 1 - chunk_start))
        last_end = end + 1
        i = end + 1
    if first is None:
        return text, [], ""
    return text[:first], funcs, text[last_end:]


def stub(chunk: str, body_start: int, body_end: int, name: str) -> str:
    head = chunk[:body_start]
    body = "{}" if "__global__" in head else _STUB_HOST % name
    return head + body


def rewrite_dir(path: str, keep: re.Pattern, stubs_per_file: int = 400) -> tuple[int, int]:
    """Rewrite one category's ``source_*.cu``; return (kept, stubbed) counts.

    Sources with different includes (forward / backward) keep their own header.
    """
    files = sorted(f for f in os.listdir(path) if f.endswith(".cu"))
    kept, stubbed = [], {}
    for f in files:
        with open(os.path.join(path, f)) as fh:
            text = fh.read()
        pre, funcs, suf = split_functions(text)
        for name, chunk, b0, b1 in funcs:
            if keep.search(name):
                kept.append((pre, chunk, suf))
            else:
                stubbed.setdefault((pre, suf), []).append(stub(chunk, b0, b1, name))
    if not kept and not stubbed:
        return 0, 0
    for f in files:
        os.remove(os.path.join(path, f))
    for n, (pre, chunk, suf) in enumerate(kept):
        with open(os.path.join(path, f"keep_{n}.cu"), "w") as fh:
            fh.write(pre + chunk + suf)
    n_files = 0
    for (pre, suf), chunks in stubbed.items():
        for n in range(0, len(chunks), stubs_per_file):
            with open(os.path.join(path, f"stubs_{n_files}.cu"), "w") as fh:
                fh.write(pre + "\n\n".join(chunks[n:n + stubs_per_file]) + suf)
            n_files += 1
    return len(kept), sum(len(c) for c in stubbed.values())


def rewrite_autogen(autogen_dir: str, keep: str) -> dict:
    pat = re.compile(keep)
    src = os.path.join(autogen_dir, "src", "cuda")
    out = {}
    for cat in sorted(os.listdir(src)):
        d = os.path.join(src, cat)
        if os.path.isdir(d):
            out[cat] = rewrite_dir(d, pat)
    return out


_HOOK = '''
            # jax_gna: keep only the kernels named by $NATTEN_KEEP_KERNELS (stub the rest).
            if os.getenv("NATTEN_KEEP_KERNELS"):
                subprocess.check_call([sys.executable, os.environ["NATTEN_MINIMAL_SCRIPT"],
                                       "stub", autogen_dir, "--keep",
                                       os.environ["NATTEN_KEEP_KERNELS"]])
'''


def patch_setup(src_dir: str) -> None:
    p = os.path.join(src_dir, "setup.py")
    with open(p) as fh:
        s = fh.read()
    anchor = "                cuda_arch_list=cuda_arch_list,\n            )\n"
    if anchor not in s:
        raise SystemExit("setup.py: autogen call not found (another NATTEN version?)")
    s = s.replace(anchor, anchor + _HOOK, 1)
    s = s.replace('[\n                "python",\n', '[\n                sys.executable,\n', 1)
    with open(p, "w") as fh:
        fh.write(s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("stub")
    a.add_argument("autogen_dir")
    a.add_argument("--keep", required=True)
    b = sub.add_parser("patch-setup")
    b.add_argument("src_dir")
    args = ap.parse_args(argv)
    if args.cmd == "patch-setup":
        patch_setup(args.src_dir)
        print(f"patched {args.src_dir}/setup.py")
        return 0
    res = rewrite_autogen(args.autogen_dir, args.keep)
    for cat, (k, s) in res.items():
        print(f"natten_minimal: {cat}: {k} kernels kept, {s} stubbed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
