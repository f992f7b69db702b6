// XLA FFI handlers of jax_gna (C symbols, handed to Python by python_module.cc).
//
//   jax_gna_fwd(q, k, v) -> (o, lse)
//   jax_gna_bwd(q, k, v, dout, lse, delta) -> (dq, dk, dv)
//   jax_gna_fwd_tokens(q, k, v, xk, xv) -> (o, lse): the forward with additional tokens
//   xk / xv ([batch dims, S, Hkv, D]) that every query sees (Hopper forward kernel only)
//   *_aliased: the same with the outputs also passed as trailing inputs (aliased to
//   the results by the caller); the tests use them to poison outputs with NaN.
// Attributes (all int64 arrays of length rank, except scale: f32): shape,
// kernel_size, stride, dilation, is_causal, q_origin, q_extent, kv_origin, kv_extent;
// and a per-device table for sharded calls (empty arrays otherwise): device_ordinals
// (n entries), device_q_origin and device_kv_origin (n * rank entries): the device with
// ordinal device_ordinals[i] uses the i-th q_origin / kv_origin instead of the above.
#pragma once
#include <cstddef>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_fwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_bwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_fwd_aliased);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_bwd_aliased);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_fwd_tokens);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_fwd_tokens_aliased);
// The same six without the command-buffer trait (XLA calls them on every execution).
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_fwd_nocb);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_bwd_nocb);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_fwd_aliased_nocb);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_bwd_aliased_nocb);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_fwd_tokens_nocb);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_gna_fwd_tokens_aliased_nocb);

// Largest dynamic shared memory (bytes) the kernels take for head dims d, d_v and
// dtype 0 = float16, 1 = bfloat16, 2 = float32; the current device's opt-in limit
// per block (-1 if unknown).
extern "C" size_t jax_gna_max_smem_bytes(int dtype, int d, int d_v);
extern "C" int jax_gna_device_smem_optin();
// How many times a forward or backward handler has launched its kernels in this process
// (a diagnostic: calls replayed from a CUDA graph do not count).
extern "C" uint64_t jax_gna_handler_runs();
