#!/usr/bin/env bash
# A NATTEN source tarball for scripts/device_peers.sh (build/peers/natten-<version>.tar.gz),
# made from git repositories instead of the PyPI sdist: NATTEN's tree at REV (default HEAD)
# plus the include/ folder of the CUTLASS commit that NATTEN pins as its submodule
# (third_party/cutlass). Tests, docs (but the README setup.py reads) and the rest of
# CUTLASS are left out.
# usage: bash scripts/natten_tarball.sh NATTEN_GIT_DIR CUTLASS_GIT_DIR [REV]
#   (e.g. the fetch tool's mirrors /work/.mirror/SHI-Labs+NATTEN/repo and
#    /work/.mirror/NVIDIA+cutlass/repo; the CUTLASS repository must hold the pinned commit)
set -euo pipefail
NATTEN=${1:?NATTEN git dir} CUTLASS=${2:?CUTLASS git dir} REV=${3:-HEAD}
cd "$(dirname "$0")/.."
pin=$(git -C "$NATTEN" ls-tree "$REV" third_party/cutlass | awk '{print $3}')
version=$(git -C "$NATTEN" show "$REV:src/natten/version.py" | sed -nE 's/^__version__ = "(.*)"/\1/p')
tmp=$(mktemp -d)
top=$tmp/natten-$version
mkdir -p "$top/third_party/cutlass" "$top/docs"
git -C "$NATTEN" archive --format=tar "$REV" | tar x -C "$top"
rm -rf "$top/tests" "$top/docs"/*
git -C "$NATTEN" show "$REV:docs/README_pypi.md" > "$top/docs/README_pypi.md"
git -C "$CUTLASS" archive --format=tar "$pin" include | tar x -C "$top/third_party/cutlass"
mkdir -p build/peers
tar czf "build/peers/natten-$version.tar.gz" -C "$tmp" "natten-$version"
rm -rf "$tmp"
echo "build/peers/natten-$version.tar.gz (NATTEN $(git -C "$NATTEN" rev-parse --short "$REV"), CUTLASS ${pin:0:7})"
