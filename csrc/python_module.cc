// pybind11 module jax_gna._gna_ffi: hands Python the XLA FFI handler capsules.
// All CUDA code lives in libjax_gna_cuda.so; this module only takes addresses.
#include <pybind11/pybind11.h>

#include <string>

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
  m.def(
      "registrations",
      [](bool command_buffer) {
        py::dict d;
        d["jax_gna_fwd"] = command_buffer ? capsule(jax_gna_fwd) : capsule(jax_gna_fwd_nocb);
        d["jax_gna_bwd"] = command_buffer ? capsule(jax_gna_bwd) : capsule(jax_gna_bwd_nocb);
        d["jax_gna_fwd_aliased"] = command_buffer ? capsule(jax_gna_fwd_aliased) : capsule(jax_gna_fwd_aliased_nocb);
        d["jax_gna_bwd_aliased"] = command_buffer ? capsule(jax_gna_bwd_aliased) : capsule(jax_gna_bwd_aliased_nocb);
        d["jax_gna_fwd_tokens"] = command_buffer ? capsule(jax_gna_fwd_tokens) : capsule(jax_gna_fwd_tokens_nocb);
        d["jax_gna_fwd_tokens_aliased"] =
            command_buffer ? capsule(jax_gna_fwd_tokens_aliased) : capsule(jax_gna_fwd_tokens_aliased_nocb);
        return d;
      },
      py::arg("command_buffer") = true,
      "FFI target name -> handler capsule; command_buffer: the handlers that XLA may record into "
      "CUDA graphs (command buffers), or the ones it calls on every execution.");
  m.def("handler_runs", &jax_gna_handler_runs,
        "How many times a jax_gna handler launched kernels in this process (graph replays do not count).");
  m.def(
      "max_smem_bytes",
      [](const std::string& dtype, int d, int d_v) {
        const int t = dtype == "float16" ? 0 : dtype == "bfloat16" ? 1 : 2;
        return jax_gna_max_smem_bytes(t, d, d_v);
      },
      "Largest dynamic shared memory (bytes) the kernels use for these head dims.");
  m.def("device_smem_optin", &jax_gna_device_smem_optin,
        "Opt-in shared memory per block of the current CUDA device (-1 if unknown).");
}
