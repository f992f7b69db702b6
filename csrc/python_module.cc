// pybind11 module jax_gna._gna_ffi: hands Python the XLA FFI handler capsules.
// All CUDA code lives in libjax_gna_cuda.so; this module only takes addresses.
#include <pybind11/pybind11.h>

#include "gna_ffi.h"

namespace py = pybind11;

namespace {
template <typename Fn>
py::capsule capsule(Fn* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

PYBIND11_MODULE(_gna_ffi, m) {
  m.doc() = "XLA FFI handlers of jax_gna's CUDA kernels";
  m.def("registrations", []() {
    py::dict d;
    d["jax_gna_fwd"] = capsule(jax_gna_fwd);
    d["jax_gna_bwd"] = capsule(jax_gna_bwd);
    d["jax_gna_fwd_aliased"] = capsule(jax_gna_fwd_aliased);
    d["jax_gna_bwd_aliased"] = capsule(jax_gna_bwd_aliased);
    return d;
  });
}
