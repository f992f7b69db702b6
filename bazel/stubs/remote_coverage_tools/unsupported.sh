#!/bin/sh
echo "coverage is not supported in the offline Bazel build of jax_gna" >&2
exit 1
