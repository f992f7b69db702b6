// XLA FFI handlers: decode and check the call, build the problem description
// (gna::Params), launch on XLA's stream. Host code only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "gna_ffi.h"
#include "gna_launch.h"

namespace ffi = xla::ffi;
using I64s = ffi::Span<const int64_t>;

namespace gna {
namespace {

struct Attrs {
  I64s shape, kernel_size, stride, dilation, is_causal, q_origin, q_extent, kv_origin, kv_extent;
  float scale;
  // Per-device block origins (sharded calls; empty otherwise): the device with ordinal
  // device_ordinals[i] takes q_origin / kv_origin from entries [i * rank, (i + 1) * rank)
  // of device_q_origin / device_kv_origin. One SPMD program serves every shard, so
  // each device's handler picks its own static problem here (no conditional on the GPU).
  // device_q_range (forward only; empty: the whole buffer) narrows each device's query
  // block to rows [lo, hi) of the query buffer per axis, entries [2 i rank, 2 (i+1) rank)
  // as lo, hi per axis: the call computes and writes only those rows (out and lse keep
  // the rest: a sharded forward runs its interior rows before the halo arrives and the
  // border rows after, into one aliased buffer). An empty range launches nothing.
  I64s device_ordinals, device_q_origin, device_kv_origin, device_q_range;
};

std::string dims_str(ffi::AnyBuffer::Dimensions d) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < d.size(); ++i) s << (i ? ", " : "") << d[i];
  s << "]";
  return s.str();
}

ffi::Error bad(const std::string& m) { return ffi::Error::InvalidArgument("jax_gna: " + m); }

// Query/key tile extents (group coordinates, product 64): grow, one doubling at a
// time, the axis whose window overhang (k - 1) is largest relative to its tile,
// while the tile still fits the block; ties go to the faster axis.
void choose_tile(int rank, const int k[3], const int n[3], int t[3]) {
  t[0] = t[1] = t[2] = 1;
  for (int prod = 1; prod < 64; prod *= 2) {
    int best = -1;
    double bv = -1.0;
    for (int a = 3 - rank; a < 3; ++a) {
      if (t[a] >= n[a]) continue;
      const double v = static_cast<double>(k[a]) / t[a];
      if (v >= bv) { bv = v; best = a; }
    }
    if (best < 0) best = 2;
    t[best] *= 2;
  }
}

// Builds Params from attributes and the q / k / v buffers on the device with ordinal
// `ordinal`. lead: leading (batch) dims of q (all folded into B). Key/value may be
// broadcast over the last of them: their leading dims are the query's with a tail of 1s
// (query [B, m, ...] over key/value [B, 1, ...]: p.kvb = m). `empty`: this device's
// query block has no rows (device_q_range), nothing to launch.
ffi::Error make_params(const Attrs& attrs, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k,
                       ffi::AnyBuffer v, Params& p, DType& dt, bool& empty) {
  Attrs at = attrs;
  const size_t rank = at.shape.size();
  if (rank < 1 || rank > 3) return bad("shape must have 1 to 3 entries, got " + std::to_string(rank));
  I64s q_range;  // lo, hi per axis in the query buffer; empty: the whole buffer
  if (const size_t n = at.device_ordinals.size(); n > 0) {
    if (at.device_q_origin.size() != n * rank || at.device_kv_origin.size() != n * rank)
      return bad("device_q_origin and device_kv_origin must have " + std::to_string(rank) +
                 " entries per device of device_ordinals");
    if (at.device_q_range.size() != 0 && at.device_q_range.size() != 2 * n * rank)
      return bad("device_q_range must be empty or have " + std::to_string(2 * rank) +
                 " entries per device of device_ordinals");
    size_t i = 0;
    while (i < n && at.device_ordinals[i] != ordinal) ++i;
    if (i == n) return bad("device " + std::to_string(ordinal) + " is not in the call's device table");
    at.q_origin = I64s(at.device_q_origin.begin() + i * rank, rank);
    at.kv_origin = I64s(at.device_kv_origin.begin() + i * rank, rank);
    if (at.device_q_range.size() != 0) q_range = I64s(at.device_q_range.begin() + 2 * i * rank, 2 * rank);
  } else if (at.device_q_range.size() != 0) {
    return bad("device_q_range needs a device table (device_ordinals)");
  }
  // An empty range on any axis: nothing to compute here, and the call's blocks need not
  // fit this device (a sharded call's other devices have rows to compute).
  empty = false;
  for (size_t i = 0; i < q_range.size(); i += 2) empty |= q_range[i] == q_range[i + 1];
  const I64s* per_axis[] = {&at.kernel_size, &at.stride, &at.dilation, &at.is_causal, &at.q_origin,
                            &at.q_extent, &at.kv_origin, &at.kv_extent};
  const char* names[] = {"kernel_size", "stride", "dilation", "is_causal", "q_origin", "q_extent",
                         "kv_origin", "kv_extent"};
  for (int i = 0; i < 8; ++i)
    if (per_axis[i]->size() != rank)
      return bad(std::string(names[i]) + " must have " + std::to_string(rank) + " entries (one per spatial axis), got " +
                 std::to_string(per_axis[i]->size()));
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const size_t nd = qd.size();
  if (nd < rank + 3 || kd.size() != nd || vd.size() != nd)
    return bad("query/key/value must have rank >= " + std::to_string(rank + 3) + " and agree: got " +
               dims_str(qd) + ", " + dims_str(kd) + ", " + dims_str(vd));
  const size_t lead = nd - rank - 2;
  size_t shared = lead;  // the key/value batch dims before their broadcast tail of 1s
  while (shared > 0 && kd[shared - 1] == 1) --shared;
  int64_t B = 1, Bkv = 1;
  for (size_t i = 0; i < lead; ++i) {
    if (kd[i] != vd[i] || (i < shared && qd[i] != kd[i]))
      return bad("query/key/value batch dims differ (key/value may have 1s where the query's last batch dims "
                 "are not: broadcast): " + dims_str(qd) + ", " + dims_str(kd) + ", " + dims_str(vd));
    B *= qd[i];
    Bkv *= kd[i];
  }
  for (size_t a = 0; a < rank; ++a) {
    if (qd[lead + a] != at.q_extent[a])
      return bad("query spatial shape " + dims_str(qd) + " does not match q_extent on axis " + std::to_string(a));
    if (kd[lead + a] != at.kv_extent[a] || vd[lead + a] != at.kv_extent[a])
      return bad("key/value spatial shape " + dims_str(kd) + " / " + dims_str(vd) +
                 " does not match kv_extent on axis " + std::to_string(a));
  }
  const int64_t H = qd[nd - 2], D = qd[nd - 1], Hkv = kd[nd - 2], Dv = vd[nd - 1];
  if (kd[nd - 1] != D) return bad("query and key head dims differ: " + dims_str(qd) + " vs " + dims_str(kd));
  if (vd[nd - 2] != Hkv) return bad("key and value heads differ: " + dims_str(kd) + " vs " + dims_str(vd));
  if (Hkv < 1 || H % Hkv != 0)
    return bad("query heads (" + std::to_string(H) + ") must be a multiple of key/value heads (" + std::to_string(Hkv) + ")");
  if (D % 8 || Dv % 8 || D < 8 || Dv < 8 || D > 256 || Dv > 256)
    return bad("head dims must be multiples of 8 in [8, 256], got D=" + std::to_string(D) + ", D_v=" + std::to_string(Dv));
  if (B < 1 || B > INT32_MAX) return bad("batch (" + std::to_string(B) + ") must be in [1, 2^31 - 1]");
  if (H > 65535) return bad("heads (" + std::to_string(H) + ") must be at most 65535");
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return bad("query, key and value must have the same dtype");
  switch (q.element_type()) {
    case ffi::DataType::F16: dt = DType::kF16; break;
    case ffi::DataType::BF16: dt = DType::kBF16; break;
    case ffi::DataType::F32: dt = DType::kF32; break;
    default: return bad("dtype must be float16, bfloat16 or float32");
  }

  p = Params{};
  p.rank = static_cast<int>(rank);
  const int off = 3 - static_cast<int>(rank);
  for (int a = 0; a < 3; ++a) {
    Axis& x = p.ax[a];
    x = Axis{1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1};
    p.qpitch[a] = 1;
    p.qoff[a] = 0;
    if (a < off) continue;
    const int i = a - off;
    const int64_t L = at.shape[i], ks = at.kernel_size[i], st = at.stride[i], dl = at.dilation[i];
    const int64_t qbuf = at.q_extent[i], lo = q_range.size() == 0 ? 0 : q_range[2 * i],
                  hi = q_range.size() == 0 ? qbuf : q_range[2 * i + 1];
    const int64_t q0 = at.q_origin[i] + lo, qn = hi - lo, k0 = at.kv_origin[i], kn = at.kv_extent[i];
    const std::string ax = " on axis " + std::to_string(i);
    if (L < 1 || L > (int64_t{1} << 30)) return bad("bad shape" + ax);
    if (at.q_origin[i] < 0 || qbuf < 1 || at.q_origin[i] + qbuf > L)
      return bad("the query buffer must lie inside the global shape" + ax);
    if (lo < 0 || hi < lo || hi > qbuf) return bad("device_q_range must lie inside the query buffer" + ax);
    p.qpitch[a] = static_cast<int>(qbuf);
    p.qoff[a] = static_cast<int>(lo);
    if (empty) continue;
    if (ks < 2 || st < 1 || st > ks || dl < 1 || ks * dl > L)
      return bad("need kernel_size >= 2, 1 <= stride <= kernel_size, dilation >= 1, kernel_size * dilation <= length" + ax +
                 " (got k=" + std::to_string(ks) + ", s=" + std::to_string(st) + ", d=" + std::to_string(dl) + ", L=" + std::to_string(L) + ")");
    if (at.is_causal[i] != 0 && at.is_causal[i] != 1) return bad("is_causal must be 0 or 1" + ax);
    // A key block may run past the grid's end (a sharded call's blocks all have one
    // shape; their rows past the end lie outside every window: a kernel may load them
    // in a key tile, masked, so they must be finite; the sharded op passes zeros).
    if (q0 < 0 || qn < 1 || q0 + qn > L || k0 < 0 || kn < 1 || k0 >= L || k0 + kn > (int64_t{1} << 30))
      return bad("the query block must lie inside the global shape, the key block start inside it" + ax);
    x.L = static_cast<int>(L); x.k = static_cast<int>(ks); x.s = static_cast<int>(st); x.d = static_cast<int>(dl);
    x.causal = static_cast<int>(at.is_causal[i]);
    x.q0 = static_cast<int>(q0); x.qn = static_cast<int>(qn); x.kv0 = static_cast<int>(k0); x.kvn = static_cast<int>(kn);
    // Every window of the query block must lie inside the key block (windows are
    // monotone in the group coordinate: checking each group's ends suffices).
    for (int g = 0; g < x.d; ++g) {
      int f, l;
      group_range(x.q0, x.qn, g, x.d, f, l);
      if (f > l) continue;
      int lo, hi, lo2, hi2;
      window(x, g, f, lo, hi);
      window(x, g, l, lo2, hi2);
      if (g + int64_t{x.d} * lo < k0 || g + int64_t{x.d} * hi2 >= k0 + kn)
        return bad("the key block [" + std::to_string(k0) + ", " + std::to_string(k0 + kn) +
                   ") does not hold every window of the query block [" + std::to_string(q0) + ", " +
                   std::to_string(q0 + qn) + ")" + ax);
    }
  }
  if (empty) return ffi::Error::Success();
  int kk[3], nq[3], nk[3], tq[3], tk[3];
  for (int a = 0; a < 3; ++a) {
    kk[a] = p.ax[a].k;
    nq[a] = (p.ax[a].qn + p.ax[a].d - 1) / p.ax[a].d;
    nk[a] = (p.ax[a].kvn + p.ax[a].d - 1) / p.ax[a].d;
  }
  choose_tile(static_cast<int>(rank), kk, nq, tq);
  choose_tile(static_cast<int>(rank), kk, nk, tk);
  int64_t nqtiles = 1, nktiles = 1;
  for (int a = 0; a < 3; ++a) {
    Axis& x = p.ax[a];
    x.qt = tq[a]; x.nqt = (nq[a] + tq[a] - 1) / tq[a];
    x.kt = tk[a]; x.nkt = (nk[a] + tk[a] - 1) / tk[a];
    nqtiles *= int64_t{x.d} * x.nqt;
    nktiles *= int64_t{x.d} * x.nkt;
  }
  if (nqtiles >= (int64_t{1} << 31) || nktiles >= (int64_t{1} << 31)) return bad("too many tiles");

  p.B = static_cast<int>(B); p.H = static_cast<int>(H); p.Hkv = static_cast<int>(Hkv);
  p.kvb = static_cast<int>(B / Bkv);
  p.D = static_cast<int>(D); p.Dv = static_cast<int>(Dv);
  p.scale = at.scale;
  p.scale_log2 = at.scale * 1.4426950408889634f;
  p.nq = 1; p.nkv = 1;
  for (int a = 0; a < 3; ++a) { p.nq *= p.qpitch[a]; p.nkv *= p.ax[a].kvn; }
  p.q_tok = H * D; p.q_b = p.nq * H * D;
  p.k_tok = Hkv * D; p.k_b = p.nkv * Hkv * D;
  p.v_tok = Hkv * Dv; p.v_b = p.nkv * Hkv * Dv;
  p.o_tok = H * Dv; p.o_b = p.nq * H * Dv;
  p.q = q.untyped_data(); p.k = k.untyped_data(); p.v = v.untyped_data();
  return ffi::Error::Success();
}

ffi::Error same_shape(const char* what, ffi::AnyBuffer::Dimensions got, std::vector<int64_t> want,
                      ffi::DataType gt, ffi::DataType wt) {
  bool ok = got.size() == want.size() && gt == wt;
  for (size_t i = 0; ok && i < want.size(); ++i) ok = got[i] == want[i];
  if (!ok) return bad(std::string(what) + " has shape " + dims_str(got) + " or dtype not as expected");
  return ffi::Error::Success();
}

std::vector<int64_t> with_last(ffi::AnyBuffer::Dimensions d, int drop, std::vector<int64_t> tail) {
  std::vector<int64_t> r(d.begin(), d.end() - drop);
  r.insert(r.end(), tail.begin(), tail.end());
  return r;
}

std::atomic<uint64_t> handler_runs{0};

ffi::Error launched(cudaError_t e) {
  handler_runs.fetch_add(1, std::memory_order_relaxed);
  if (e != cudaSuccess) return ffi::Error::Internal(std::string("jax_gna: CUDA error: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

cudaError_t dispatch(DType dt, const Params& p, cudaStream_t s, bool fwd) {
  bool used = false;
  const cudaError_t e = fwd ? launch_forward_sm90(dt, p, s, used) : launch_backward_sm90(dt, p, s, used);
  if (e != cudaSuccess || used) return e;
  return fwd ? launch_forward(dt, p, s) : launch_backward(dt, p, s);
}

// The forward; with additional tokens xk / xv ([lead..., S, Hkv, D] and [..., Dv], lead
// the query's batch dims; both or neither) out and lse are over each query's window and
// the tokens together, on the Hopper forward kernel only (the caller checks that it
// applies: an error here).
ffi::Error Forward(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, const Attrs& at,
                   const ffi::AnyBuffer* xk = nullptr, const ffi::AnyBuffer* xv = nullptr) {
  if (xk && at.device_ordinals.size() != 0) return bad("the forward with additional tokens takes no device table");
  Params p;
  DType dt;
  bool empty;
  if (auto e = make_params(at, ordinal, q, k, v, p, dt, empty); e.failure()) return e;
  auto qd = q.dimensions();
  const int64_t Dv = v.dimensions()[v.dimensions().size() - 1];
  if (xk) {
    auto xd = xk->dimensions();
    const size_t lead = qd.size() - at.shape.size() - 2;
    if (xd.size() != lead + 3 || xd[lead] < 1 || xd[lead] >= (int64_t{1} << 30))
      return bad("additional keys " + dims_str(xd) + " must be [batch dims, S, heads_kv, D] with S >= 1");
    std::vector<int64_t> want(qd.begin(), qd.begin() + lead);
    want.insert(want.end(), {xd[lead], p.Hkv, p.D});
    if (auto e = same_shape("additional keys", xd, want, xk->element_type(), q.element_type()); e.failure()) return e;
    want.back() = Dv;
    if (auto e = same_shape("additional values", xv->dimensions(), want, xv->element_type(), q.element_type());
        e.failure())
      return e;
    p.nx = static_cast<int>(xd[lead]);
    p.xk = xk->untyped_data();
    p.xv = xv->untyped_data();
  }
  if (auto e = same_shape("out", o->dimensions(), with_last(qd, 1, {Dv}), o->element_type(), q.element_type()); e.failure()) return e;
  if (auto e = same_shape("lse", lse->dimensions(), with_last(qd, 1, {}), lse->element_type(), ffi::DataType::F32); e.failure()) return e;
  if (empty) return launched(cudaSuccess);
  p.o = o->untyped_data();
  p.lse = static_cast<float*>(lse->untyped_data());
  if (!xk) return launched(dispatch(dt, p, stream, true));
  bool used = false;
  const cudaError_t e = launch_forward_sm90(dt, p, stream, used);
  if (e == cudaSuccess && !used)
    return bad("the forward with additional tokens runs on the Hopper forward kernel only (a compute capability "
               "9.0 GPU, float16/bfloat16, head dims D = D_v in {64, 128, 256}, no dilation, blocks of at least "
               "one tile, JAX_GNA_SM90 not 0); this call does not fit it");
  return launched(e);
}

ffi::Error Backward(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer dout, ffi::AnyBuffer lse, ffi::AnyBuffer delta,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                    ffi::Result<ffi::AnyBuffer> dv, const Attrs& at) {
  if (at.device_q_range.size() != 0) return bad("device_q_range is for the forward only");
  Params p;
  DType dt;
  bool empty;
  if (auto e = make_params(at, ordinal, q, k, v, p, dt, empty); e.failure()) return e;
  auto qd = q.dimensions();
  const int64_t Dv = v.dimensions()[v.dimensions().size() - 1];
  const auto T = q.element_type();
  if (auto e = same_shape("dout", dout.dimensions(), with_last(qd, 1, {Dv}), dout.element_type(), T); e.failure()) return e;
  if (auto e = same_shape("lse", lse.dimensions(), with_last(qd, 1, {}), lse.element_type(), ffi::DataType::F32); e.failure()) return e;
  if (auto e = same_shape("delta", delta.dimensions(), with_last(qd, 1, {}), delta.element_type(), ffi::DataType::F32); e.failure()) return e;
  // dK / dV per query batch (the key/value's shape but for broadcast keys), or, where the
  // key/value's last batch dim is 1 (broadcast), with a divisor c of the query's there:
  // the kernels sum each run of m / c query batches (p.dkvb) and the caller the rest
  auto kd = k.dimensions(), vd = v.dimensions();
  const size_t lead = qd.size() - at.shape.size() - 2;
  std::vector<int64_t> dkd(qd.begin(), qd.begin() + lead), dvd;
  if (auto gd = dk->dimensions(); lead > 0 && kd[lead - 1] == 1 && gd.size() == qd.size()) {
    const int64_t m = qd[lead - 1], c = gd[lead - 1];
    if (c >= 1 && m % c == 0) {
      dkd[lead - 1] = c;
      p.dkvb = static_cast<int>(m / c);
    }
  }
  dvd = dkd;
  dkd.insert(dkd.end(), kd.begin() + lead, kd.end());
  dvd.insert(dvd.end(), vd.begin() + lead, vd.end());
  if (auto e = same_shape("dq", dq->dimensions(), std::vector<int64_t>(qd.begin(), qd.end()), dq->element_type(), T); e.failure()) return e;
  if (auto e = same_shape("dk", dk->dimensions(), dkd, dk->element_type(), T); e.failure()) return e;
  if (auto e = same_shape("dv", dv->dimensions(), dvd, dv->element_type(), T); e.failure()) return e;
  p.dout = dout.untyped_data();
  p.lse_in = static_cast<const float*>(lse.untyped_data());
  p.delta = static_cast<const float*>(delta.untyped_data());
  p.dq = dq->untyped_data(); p.dk = dk->untyped_data(); p.dv = dv->untyped_data();
  return launched(dispatch(dt, p, stream, false));
}

#define GNA_ATTR_PARAMS                                                                         \
  I64s shape, I64s kernel_size, I64s stride, I64s dilation, I64s is_causal, I64s q_origin,     \
      I64s q_extent, I64s kv_origin, I64s kv_extent, float scale, I64s device_ordinals,         \
      I64s device_q_origin, I64s device_kv_origin, I64s device_q_range
#define GNA_ATTRS                                                                              \
  Attrs{shape, kernel_size, stride, dilation, is_causal, q_origin, q_extent, kv_origin, kv_extent, \
        scale, device_ordinals, device_q_origin, device_kv_origin, device_q_range}

ffi::Error FwdImpl(cudaStream_t s, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, GNA_ATTR_PARAMS) {
  return Forward(s, ordinal, q, k, v, o, lse, GNA_ATTRS);
}
ffi::Error FwdAliasedImpl(cudaStream_t s, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::AnyBuffer, ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer> o,
                          ffi::Result<ffi::AnyBuffer> lse, GNA_ATTR_PARAMS) {
  return Forward(s, ordinal, q, k, v, o, lse, GNA_ATTRS);
}
ffi::Error FwdTokensImpl(cudaStream_t s, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer xk, ffi::AnyBuffer xv, ffi::Result<ffi::AnyBuffer> o,
                         ffi::Result<ffi::AnyBuffer> lse, GNA_ATTR_PARAMS) {
  return Forward(s, ordinal, q, k, v, o, lse, GNA_ATTRS, &xk, &xv);
}
ffi::Error FwdTokensAliasedImpl(cudaStream_t s, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k,
                                ffi::AnyBuffer v, ffi::AnyBuffer xk, ffi::AnyBuffer xv, ffi::AnyBuffer,
                                ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse,
                                GNA_ATTR_PARAMS) {
  return Forward(s, ordinal, q, k, v, o, lse, GNA_ATTRS, &xk, &xv);
}
ffi::Error BwdImpl(cudaStream_t s, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::AnyBuffer dout, ffi::AnyBuffer lse, ffi::AnyBuffer delta,
                   ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                   ffi::Result<ffi::AnyBuffer> dv, GNA_ATTR_PARAMS) {
  return Backward(s, ordinal, q, k, v, dout, lse, delta, dq, dk, dv, GNA_ATTRS);
}
ffi::Error BwdAliasedImpl(cudaStream_t s, int32_t ordinal, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::AnyBuffer dout, ffi::AnyBuffer lse, ffi::AnyBuffer delta,
                          ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer,
                          ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                          ffi::Result<ffi::AnyBuffer> dv, GNA_ATTR_PARAMS) {
  return Backward(s, ordinal, q, k, v, dout, lse, delta, dq, dk, dv, GNA_ATTRS);
}

}  // namespace

cudaError_t launch_forward(DType t, const Params& p, cudaStream_t s) {
  switch (t) {
    case DType::kF16: return launch_forward_t<__half>(p, s);
    case DType::kBF16: return launch_forward_t<__nv_bfloat16>(p, s);
    default: return launch_forward_t<float>(p, s);
  }
}
cudaError_t launch_backward(DType t, const Params& p, cudaStream_t s) {
  switch (t) {
    case DType::kF16: return launch_backward_t<__half>(p, s);
    case DType::kBF16: return launch_backward_t<__nv_bfloat16>(p, s);
    default: return launch_backward_t<float>(p, s);
  }
}

size_t max_smem_bytes(DType t, int D, int Dv) {
  switch (t) {
    case DType::kF16: return max_smem_bytes_t<__half>(D, Dv);
    case DType::kBF16: return max_smem_bytes_t<__nv_bfloat16>(D, Dv);
    default: return max_smem_bytes_t<float>(D, Dv);
  }
}

int device_smem_optin() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) { cudaGetLastError(); return -1; }
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return v;
}

}  // namespace gna

#define GNA_BIND_ATTRS                                                                  \
  .Attr<I64s>("shape").Attr<I64s>("kernel_size").Attr<I64s>("stride").Attr<I64s>("dilation") \
      .Attr<I64s>("is_causal").Attr<I64s>("q_origin").Attr<I64s>("q_extent")                 \
      .Attr<I64s>("kv_origin").Attr<I64s>("kv_extent").Attr<float>("scale")                  \
      .Attr<I64s>("device_ordinals").Attr<I64s>("device_q_origin").Attr<I64s>("device_kv_origin")      \
      .Attr<I64s>("device_q_range")

#define GNA_ARG .Arg<ffi::AnyBuffer>()
#define GNA_RET .Ret<ffi::AnyBuffer>()
#define GNA_BIND ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>()
#define GNA_FWD_BIND GNA_BIND GNA_ARG GNA_ARG GNA_ARG GNA_RET GNA_RET GNA_BIND_ATTRS
#define GNA_FWD_ALIASED_BIND GNA_BIND GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_RET GNA_RET GNA_BIND_ATTRS
#define GNA_FWD_TOKENS_BIND GNA_BIND GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_RET GNA_RET GNA_BIND_ATTRS
#define GNA_FWD_TOKENS_ALIASED_BIND \
  GNA_BIND GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_RET GNA_RET GNA_BIND_ATTRS
#define GNA_BWD_BIND GNA_BIND GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_RET GNA_RET GNA_RET GNA_BIND_ATTRS
#define GNA_BWD_ALIASED_BIND \
  GNA_BIND GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_ARG GNA_RET GNA_RET GNA_RET GNA_BIND_ATTRS

// Each handler twice: command-buffer compatible (XLA may record the call into a CUDA
// graph and replay it without calling the handler: it only launches kernels on XLA's
// stream, with everything they need passed by value) and not (every call runs the
// handler: what JAX_GNA_COMMAND_BUFFER=0 registers).
#define GNA_CMD_BUFFER {ffi::Traits::kCmdBufferCompatible}
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_fwd, gna::FwdImpl, GNA_FWD_BIND, GNA_CMD_BUFFER);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_fwd_aliased, gna::FwdAliasedImpl, GNA_FWD_ALIASED_BIND, GNA_CMD_BUFFER);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_bwd, gna::BwdImpl, GNA_BWD_BIND, GNA_CMD_BUFFER);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_bwd_aliased, gna::BwdAliasedImpl, GNA_BWD_ALIASED_BIND, GNA_CMD_BUFFER);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_fwd_tokens, gna::FwdTokensImpl, GNA_FWD_TOKENS_BIND, GNA_CMD_BUFFER);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_fwd_tokens_aliased, gna::FwdTokensAliasedImpl, GNA_FWD_TOKENS_ALIASED_BIND,
                              GNA_CMD_BUFFER);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_fwd_nocb, gna::FwdImpl, GNA_FWD_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_fwd_tokens_nocb, gna::FwdTokensImpl, GNA_FWD_TOKENS_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_fwd_tokens_aliased_nocb, gna::FwdTokensAliasedImpl, GNA_FWD_TOKENS_ALIASED_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_fwd_aliased_nocb, gna::FwdAliasedImpl, GNA_FWD_ALIASED_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_bwd_nocb, gna::BwdImpl, GNA_BWD_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_gna_bwd_aliased_nocb, gna::BwdAliasedImpl, GNA_BWD_ALIASED_BIND);

extern "C" size_t jax_gna_max_smem_bytes(int dtype, int d, int d_v) {
  const gna::DType t = dtype == 0 ? gna::DType::kF16 : dtype == 1 ? gna::DType::kBF16 : gna::DType::kF32;
  return gna::max_smem_bytes(t, d, d_v);
}
extern "C" int jax_gna_device_smem_optin() { return gna::device_smem_optin(); }
extern "C" uint64_t jax_gna_handler_runs() { return gna::handler_runs.load(std::memory_order_relaxed); }
