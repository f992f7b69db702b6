// Tile shapes of the Hopper kernels (host only): query and key tiles of 128 tokens (the
// backward kernels: 64-token inner tiles)
// with power-of-two extents per axis, chosen to visit the fewest key tiles in total
// (the same per-axis window counts as jax_gna.sim; tiles that need the element mask
// weigh 1.25). The total factorizes over axes: for query tile q and key tile k,
//   visits = prod_a visits_a(q_a, k_a),  unmasked = prod_a full_a(q_a, k_a).
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <vector>

#include "gna_problem.h"

namespace gna {

constexpr int kPlanTileTokens = 128;

// The key tiles [first, last] (of kt tokens from x.kv0) that the query tile starting at
// query q (qt tokens, clipped to the axis) visits along x; lo1 and hi0 bound the keys
// that every query of the tile sees (a key tile inside them needs no element mask).
inline void key_tile_range(const Axis& x, int q, int qt, int kt, int& first, int& last, int& lo1, int& hi0) {
  const int qe = std::min(q + qt, x.q0 + x.qn) - 1;
  int lo0, hi1;
  window(x, 0, q, lo0, hi0);
  window(x, 0, qe, lo1, hi1);
  first = (lo0 - x.kv0) / kt;
  last = (hi1 - x.kv0) / kt;
}

// Key tiles visited (and how many of them need no mask), summed over the query tiles
// of one axis, for query tile qt and key tile kt (dilation 1).
inline void axis_cost(const Axis& x, int qt, int kt, int64_t& visits, int64_t& full) {
  visits = full = 0;
  for (int q = x.q0; q < x.q0 + x.qn; q += qt) {
    int a, b, lo1, hi0;
    key_tile_range(x, q, qt, kt, a, b, lo1, hi0);
    visits += b - a + 1;
    for (int j = a; j <= b; ++j) {
      const int s = x.kv0 + j * kt;
      full += s >= lo1 && s + kt - 1 <= hi0;
    }
  }
}

inline int pow2_cap(int n, int tokens = kPlanTileTokens) {
  int c = 1;
  while (c < n && c < tokens) c *= 2;
  return c;
}

// Every split of `tokens` into power-of-two extents per axis, none above cap.
inline std::vector<std::array<int, 3>> tile_shapes(const int cap[3], int tokens = kPlanTileTokens) {
  std::vector<std::array<int, 3>> r;
  for (int a = 1; a <= cap[0]; a *= 2)
    for (int b = 1; b <= cap[1]; b *= 2) {
      const int c = tokens / (a * b);
      if (c >= 1 && a * b * c == tokens && c <= cap[2]) r.push_back({a, b, c});
    }
  return r;
}

struct Plan {
  bool ok = false;
  int qt[3], kt[3];
  double visits = 0;  // key tiles visited, summed over the query tiles (of one batch and head)
};

// Picks the query and key tile shapes that visit the fewest key tiles in total
// (tiles needing the element mask count 1.25x). The total factorizes over axes.
inline Plan choose_tiles(const Params& p, int q_tokens = kPlanTileTokens, int kv_tokens = kPlanTileTokens) {
  int qcap[3], kcap[3];
  for (int a = 0; a < 3; ++a) {
    qcap[a] = pow2_cap(p.ax[a].qn, q_tokens);
    kcap[a] = pow2_cap(p.ax[a].kvn, kv_tokens);
  }
  const auto qs = tile_shapes(qcap, q_tokens), ks = tile_shapes(kcap, kv_tokens);
  Plan best;
  if (qs.empty() || ks.empty()) return best;
  // Per-axis costs for every power-of-two (qt, kt) pair.
  int64_t v[3][8][8], f[3][8][8];
  for (int a = 0; a < 3; ++a)
    for (int i = 0, qt = 1; qt <= qcap[a]; ++i, qt *= 2)
      for (int j = 0, kt = 1; kt <= kcap[a]; ++j, kt *= 2) axis_cost(p.ax[a], qt, kt, v[a][i][j], f[a][i][j]);
  double best_cost = 0;
  for (const auto& q : qs)
    for (const auto& k : ks) {
      double visits = 1, full = 1;
      for (int a = 0; a < 3; ++a) {
        const int i = __builtin_ctz(q[a]), j = __builtin_ctz(k[a]);
        visits *= static_cast<double>(v[a][i][j]);
        full *= static_cast<double>(f[a][i][j]);
      }
      const double cost = visits + 0.25 * (visits - full);
      if (!best.ok || cost < best_cost) {
        best.ok = true;
        best_cost = cost;
        best.visits = visits;
        for (int a = 0; a < 3; ++a) { best.qt[a] = q[a]; best.kt[a] = k[a]; }
      }
    }
  return best;
}

// The Hopper forward's key tiles at head dims <= 128 (gna_sm90.cu, fwd_plan): 64
// tokens where the plan for them visits at most kShortKeysColumns of the key columns of the
// plan for 128-token tiles (both with 128-token query tiles). The threshold is measured
// (benchmarks/results/short-key-tiles-h200.md); tests/test_plan.py pins the measured choices.
constexpr double kShortKeysColumns = 0.8;
inline bool short_keys_pay(const Plan& keys128, const Plan& keys64) {
  return keys128.ok && keys64.ok && 64 * keys64.visits <= kShortKeysColumns * 128 * keys128.visits;
}

// The Hopper forward's query tiles per CTA (gna_sm90.cu, fwd_items), for a plan with
// `nqtiles` query tiles visiting `visits` key tiles per batch and head, `ctas` batches x
// heads, on `sms` SMs. Several tiles per CTA spare the tensor cores a CTA change per query
// tile (about 4 us of their idle time per SM, session 18, against 0.8-1.35 us per key
// tile) but make fewer, longer CTAs. So the count of 1, 2, 4, 8 with the least estimated
// time, in key tiles per SM: rounds of CTAs per SM x (items x key tiles per query tile +
// kCtaFixedTiles), where it beats 1 by at least kItemsMargin. H200, bf16, kernel time, 8
// per CTA against 1: 1-D windows 33-129 D 128 -15 to -17%, D 64 -15%; 4096 tokens window
// 129 4 heads batch 8 -21% (one round of 128 CTAs); 2-D 128x128 window 7 D 64 -5.6%,
// window 21 -3.3%, 3-D 8x64x64 window 3 -6.6%; 1-D 32768 tokens window 2048 one head D 64
// +263% (32 CTAs) (benchmarks/results/fwd-items-h200.md).
// `item_tiles`: what each further query tile of a CTA costs besides its key tiles, in key
// tiles: 0 for the kernel with two Q slots (the next Q is loaded by then), and
// kOneSlotItemTiles for the one with one Q slot (D 128 with 128-token key tiles), whose
// next Q loads only after the last S (the handover from a tile's last P V to the next
// tile's first S: 2.0-2.1 us, the Q landing 1.6-2.0 us after its load went out against
// 0.9-1.0 us in a new CTA; fwd_timeline.py, session 38) and whose key-tile loop measured
// up to 3% slower. With 3 the estimate gives the kernel-time changes measured on the 1-D
// problems (window 2048, 32768 tokens, one head, 2 per CTA: -2.5% estimated, -2.4 to
// -3.1% measured; 65536 tokens -2.5 / -3.6%; window 4096 -1.4 / -1.3%; 24 heads, 8 per
// CTA: -2.3 / -1.6%); it overestimates the gain on the multi-dimensional 24-head paper
// problems (2 per CTA -0.2 to -0.9% estimated, +0.6 to +3.2% measured), which stay at 1
// by the margin. kItemsMargin 2%: 3% left the 1-D one-head paper problems at 1 (sessions
// 37-38); tests/test_plan.py pins the counts (3 +- 0.5 changes some).
constexpr double kCtaFixedTiles = 4, kItemsMargin = 0.02, kOneSlotItemTiles = 3;
inline int forward_items(int64_t nqtiles, double visits, int64_t ctas, int sms, double item_tiles = 0) {
  if (sms <= 0 || nqtiles <= 0) return 1;
  const double tiles = visits / static_cast<double>(nqtiles);  // key tiles per query tile
  auto cost = [&](int items) {  // (a CTA runs at most nqtiles query tiles)
    const int64_t n = (nqtiles + items - 1) / items * ctas;
    const int64_t per = std::min<int64_t>(items, nqtiles);
    return static_cast<double>((n + sms - 1) / sms) * (per * tiles + (per - 1) * item_tiles + kCtaFixedTiles);
  };
  int best = 1;
  double best_cost = (1 - kItemsMargin) * cost(1);
  for (int items = 2; items <= 8; items *= 2)
    if (const double c = cost(items); c < best_cost) {
      best = items;
      best_cost = c;
    }
  return best;
}

// The clusters of the forward's pair grid (gna_sm90.cu, fwd_pair_sm90_kernel) for a plan
// with `nqtiles` query tiles and pairs along `axis` (pair_axis, >= 0): one per pair of
// neighbouring tiles along the axis and one per lone last tile of an odd count.
inline int64_t pair_clusters(const Params& p, int axis, int64_t nqtiles) {
  const int64_t na = p.ax[axis].nqt;
  return nqtiles / na * ((na + 1) / 2);
}

// Whether the Hopper forward runs its pairs of query tiles (gna_sm90.cu, fwd_sm90: the
// one-tile path at head dim 128 where pair_axis finds an axis), for a grid of `ctas` CTAs
// (two per cluster) on `sms` SMs whose `nqtiles` query tiles visit `visits` key tiles per
// batch and head. A cluster's handshakes cost a short CTA time that the shared K/V loads
// earn back only over long runs under the power cap: pairs only where the grid fills more
// than 1.75 waves and each query tile visits at least kPairMinKeyTiles key tiles. H200,
// bf16, kernel time, pairs against none (sessions 42-44, benchmarks/results/pairs-h200.md
// sections 12-14): 2 key tiles per query tile, one wave +10.6%, 2.9 waves +5.0%; 8 tiles,
// one wave +3.3%, 2.9 waves +4.8%; 16 tiles, one wave +2.7%, 2.9 waves -0.8% (+1.6% in
// one jit); 50 tiles, one wave +0.9%, 1.45 waves +1.1%, 1.9-7.8 waves -4.7 to +2.1%
// (noise); 128 tiles, 1.67 waves +1.2% (every round), 3.3-8.3 waves -1.7 to -3.2%; the
// paper problems (50-375 tiles, 93+ waves) -1.3 to -4.3%. The wave threshold sits between
// the losses at 1.45 and 1.67 waves and the 1.94-wave problem (-4.7%, +0.4% in one jit).
// tests/test_plan.py pins the measured choices.
constexpr double kPairMinKeyTiles = 16;
inline bool pairs_pay(int64_t ctas, int sms, double visits, int64_t nqtiles) {
  return 4 * ctas > 7 * static_cast<int64_t>(sms) && visits >= kPairMinKeyTiles * static_cast<double>(nqtiles);
}

// Puts a plan's tile shapes into the problem; returns the number of query tiles
// (query_outer) or key tiles of the blocks.
inline int64_t apply_plan(Params& p, const Plan& plan, bool query_outer) {
  int64_t n = 1;
  for (int a = 0; a < 3; ++a) {
    Axis& x = p.ax[a];
    x.qt = plan.qt[a];
    x.nqt = (x.qn + x.qt - 1) / x.qt;
    x.kt = plan.kt[a];
    x.nkt = (x.kvn + x.kt - 1) / x.kt;
    n *= query_outer ? x.nqt : x.nkt;
  }
  return n;
}

// The Hopper forward's pairs (gna_sm90.cu, fwd_pair_sm90_kernel): an axis along which
// query tiles 2i and 2i + 1 visit the same key tiles for every i with 2i + 1 < its tile
// count, or -1. Then a cluster of two CTAs running such a pair loads each K/V tile once
// for both; with an odd count the last tile runs alone, so of such axes the one whose
// pairs cover the most of its tiles (an even count: all), the fastest of equals.
// `p` with a plan applied (apply_plan; dilation 1: the Hopper path's).
inline int pair_axis(const Params& p) {
  int best = -1;
  double covered = 0;
  for (int a = 2; a >= 0; --a) {
    const Axis& x = p.ax[a];
    if (x.nqt < 2) continue;
    bool same = true;
    for (int i = 0; same && i + 1 < x.nqt; i += 2) {
      int first[2], last[2], lo1, hi0;
      for (int j = 0; j < 2; ++j) key_tile_range(x, x.q0 + (i + j) * x.qt, x.qt, x.kt, first[j], last[j], lo1, hi0);
      same = first[0] == first[1] && last[0] == last[1];
    }
    const double c = static_cast<double>(x.nqt / 2 * 2) / x.nqt;
    if (same && c > covered) {
      best = a;
      covered = c;
    }
  }
  return best;
}

// The axis geometry a tiling depends on, after `head`: a cache key.
inline std::vector<int> geometry_key(const Params& p, std::initializer_list<int> head) {
  std::vector<int> key(head);
  for (int a = 0; a < 3; ++a) {
    const Axis& x = p.ax[a];
    key.insert(key.end(), {x.L, x.k, x.s, x.d, x.causal, x.q0, x.qn, x.kv0, x.kvn});
  }
  return key;
}

// A per-process cache of host-side results by key (thread safe; `make` runs under the
// lock; emptied once past 1024 entries). Values are returned by copy.
template <typename V>
struct HostCache {
  std::mutex mu;
  std::map<std::vector<int>, V> map;
  template <typename F>
  V get(const std::vector<int>& key, F make) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = map.find(key);
    if (it != map.end()) return it->second;
    if (map.size() > 1024) map.clear();
    return map.emplace(key, make()).first->second;
  }
};

// Plans are cached by the axis geometry (the search is cheap but runs per call).
inline Plan cached_plan(const Params& p, int q_tokens = kPlanTileTokens, int kv_tokens = kPlanTileTokens) {
  static HostCache<Plan> cache;
  return cache.get(geometry_key(p, {q_tokens, kv_tokens}), [&] { return choose_tiles(p, q_tokens, kv_tokens); });
}

}  // namespace gna
