"""Repository rules that expose headers from the local Python environment.

`@jax_gna_local` holds:
  - `:ffi_headers`      XLA FFI headers of the installed jaxlib (jax.ffi.include_dir()),
  - `:pybind11_headers` pybind11's headers,
  - `:python_headers`   the interpreter's C headers,
and a `config.bzl` with the extension suffix of that interpreter. The interpreter is
`python3` on the PATH, or the one named by the JAX_GNA_PYTHON environment variable.
"""

_PROBE = """
import importlib.util, os, sysconfig
import pybind11
jaxlib = importlib.util.find_spec("jaxlib").submodule_search_locations[0]
print(os.path.join(jaxlib, "include"))
print(pybind11.get_include())
print(sysconfig.get_paths()["include"])
print(sysconfig.get_config_var("EXT_SUFFIX"))
"""

_BUILD = """
package(default_visibility = ["//visibility:public"])

cc_library(name = "ffi_headers", hdrs = glob(["ffi/**/*.h"]), includes = ["ffi"])
cc_library(name = "pybind11_headers", hdrs = glob(["pybind11/**/*.h"]), includes = ["pybind11"])
cc_library(name = "python_headers", hdrs = glob(["python/**/*.h"]), includes = ["python"])
filegroup(name = "ffi_files", srcs = glob(["ffi/**/*.h"]))
filegroup(name = "pybind11_files", srcs = glob(["pybind11/**/*.h"]))
filegroup(name = "python_files", srcs = glob(["python/**/*.h"]))
"""

def _local_impl(ctx):
    python = ctx.os.environ.get("JAX_GNA_PYTHON", "python3")
    result = ctx.execute([python, "-c", _PROBE])
    if result.return_code != 0:
        fail("jax_gna: could not locate jaxlib/pybind11 with %s: %s" % (python, result.stderr))
    ffi, pybind, include, suffix = result.stdout.strip().split("\n")
    ctx.symlink(ffi, "ffi")
    ctx.symlink(pybind, "pybind11")
    ctx.symlink(include, "python")
    ctx.file("BUILD.bazel", _BUILD)
    ctx.file("config.bzl", "EXT_SUFFIX = %r\n" % suffix)

jax_gna_local_repository = repository_rule(
    implementation = _local_impl,
    environ = ["JAX_GNA_PYTHON", "PATH"],
    local = True,
)

def jax_gna_local_deps():
    jax_gna_local_repository(name = "jax_gna_local")
