// Host-only check of the Hopper kernels' tile geometry (tests/test_sm90_geometry.py).
// Runs the kernels' own FwdTile (forward, dQ) and KeyTile (dK/dV) code on the CPU, for
// the tile shapes gna_plan.h picks, against a brute force over the window math:
//   query-outer: every key a valid query of the tile sees lies in a visited key tile,
//                each key tile is visited once, and a tile marked full is entirely seen
//                by every valid query (and does not run past the key block);
//   key-outer:   every query that sees a valid key of the tile lies in a visited query
//                tile, once; full is exact; the per-key query intervals are exact;
//   first_reaching / last_reaching (closed forms) equal the binary searches over window();
//   the forward's element masks (window_bits, skipping the axes full_axes reports full, as
//   the kernel does) equal the brute force for every thread's columns of every visited
//   tile pair (rows queries, columns keys).
// The geometry takes its divisions from tile_divs (FastDiv), as the kernels do.
// stdin: one problem per line: rank, then per axis L k s causal q0 qn kv0 kvn.
// stdout: "ok <checks>" per problem, or "FAIL <what>" (and exit code 1).
// With --fast-div: only FastDiv against `/` ("ok <checks>" or FAIL lines).
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <vector>

#include "gna_bwd_sm90.cuh"
#include "gna_plan.h"

using gna::Axis;
using gna::Params;

static int failures = 0;
static long checks = 0;
#define CHECK(cond, ...)                         \
  do {                                           \
    ++checks;                                    \
    if (!(cond)) {                               \
      ++failures;                                \
      if (failures < 20) {                       \
        std::printf("FAIL " __VA_ARGS__);        \
        std::printf("\n");                       \
      }                                          \
    }                                            \
  } while (0)

static bool sees(const Axis& x, int q, int k) {
  int lo, hi;
  gna::window(x, 0, q, lo, hi);
  return lo <= k && k <= hi;
}

// The binary searches that first_reaching / last_reaching replace in closed form.
static int search_first(const Axis& x, int a, int b, int j) {
  while (a <= b) {
    const int m = (a + b) / 2;
    int lo, hi;
    gna::window(x, 0, m, lo, hi);
    if (hi >= j) b = m - 1; else a = m + 1;
  }
  return a;
}
static int search_last(const Axis& x, int a, int b, int j) {
  while (a <= b) {
    const int m = (a + b) / 2;
    int lo, hi;
    gna::window(x, 0, m, lo, hi);
    if (lo <= j) a = m + 1; else b = m - 1;
  }
  return b;
}

// The closed forms equal the searches for every key near the key block and query ranges
// [a, b] inside the query block (the kernels pass the whole block).
static void closed_forms(const Params& p) {
  for (int ax = 0; ax < 3; ++ax) {
    const Axis& x = p.ax[ax];
    const int ranges[3][2] = {{x.q0, x.q0 + x.qn - 1}, {x.q0 + 1, x.q0 + x.qn - 1}, {x.q0, x.q0 + x.qn / 2}};
    for (const auto& r : ranges) {
      if (r[0] > r[1]) continue;
      for (int j = x.kv0 - 3; j <= x.kv0 + x.kvn + 2; ++j) {
        const gna::FastDiv sd(x.s);
        const int f = gna::sm90::first_reaching(x, sd, r[0], r[1], j), l = gna::sm90::last_reaching(x, sd, r[0], r[1], j);
        const int sf = search_first(x, r[0], r[1], j), sl = search_last(x, r[0], r[1], j);
        CHECK(f == sf && l == sl, "axis %d key %d queries [%d, %d]: closed forms [%d, %d], searches [%d, %d]", ax, j,
              r[0], r[1], f, l, sf, sl);
      }
    }
  }
}

// In-tile coordinates of element m of a box with extents n (row-major).
static void coords(int m, const int (&n)[3], int (&o)[3]) {
  o[2] = m % n[2];
  o[1] = m / n[2] % n[1];
  o[0] = m / (n[2] * n[1]);
}

static void query_outer(const Params& p) {
  const gna::sm90::TileDivs divs = gna::sm90::tile_divs(p);
  const int n = p.ax[0].nqt * p.ax[1].nqt * p.ax[2].nqt;
  for (int bid = 0; bid < n; ++bid) {
    const gna::sm90::FwdTile t(p, divs, bid);
    std::set<std::vector<int>> seen;
    gna::sm90::BoxWalk walk;
    for (int it = 0; it < t.ntiles; ++it, walk.next(t.nkt)) {
      int ks[3], kw[3];
      t.key_tile(p, it, ks);
      t.key_tile(p, walk, kw);
      CHECK(ks[0] == kw[0] && ks[1] == kw[1] && ks[2] == kw[2], "query tile %d step %d: the walk differs", bid, it);
      CHECK(seen.insert({ks[0], ks[1], ks[2]}).second, "query tile %d visits a key tile twice", bid);
      int full = 0;  // brute force, per axis: every valid query sees every key, none padded
      for (int a = 0; a < 3; ++a) {
        const Axis& x = p.ax[a];
        bool all = true;
        for (int k = x.kv0 + ks[a]; k < x.kv0 + ks[a] + x.kt; ++k) {
          all &= k < x.kv0 + x.kvn;
          for (int q = t.qs[a]; q <= t.qe[a] && all; ++q) all = sees(x, q, k);
        }
        full |= all << a;
      }
      int g[3] = {ks[0] + p.ax[0].kv0, ks[1] + p.ax[1].kv0, ks[2] + p.ax[2].kv0};
      const int f = t.full_axes(p, g);
      CHECK(f == full, "query tile %d key tile %d: full axes %d, brute force %d", bid, it, f, full);
      // The forward's element mask (window_bits, the axes in f skipped) for each thread's
      // rows m and m + 8 (m < 8 mod 16) against the brute force, on the valid rows.
      const int qn[3] = {p.ax[0].qt, p.ax[1].qt, p.ax[2].qt}, kn[3] = {p.ax[0].kt, p.ax[1].kt, p.ax[2].kt};
      for (int m = 0; m < qn[0] * qn[1] * qn[2]; ++m) {
        if (m % 16 >= 8) continue;
        int o[2][3], lo[2][3], hi[2][3];
        bool valid[2];
        for (int r = 0; r < 2; ++r) {
          coords(m + 8 * r, qn, o[r]);
          t.query_window(p, divs, o[r], lo[r], hi[r]);
          valid[r] = true;
          for (int a = 0; a < 3; ++a) {
            lo[r][a] -= g[a];
            hi[r][a] -= g[a];
            valid[r] &= t.qs[a] + o[r][a] <= t.qe[a];
          }
        }
        for (int tig = 0; tig < 4; ++tig) {
          uint32_t vis[2][2];
          gna::sm90::window_bits(divs.kcol, lo, hi, f, tig, vis);
          for (int j = 0; j < kn[0] * kn[1] * kn[2] / 8; ++j)
            for (int r = 0; r < 2; ++r)
              for (int e = 0; e < 2 && valid[r]; ++e) {
                int c[3];
                coords(8 * j + 2 * tig + e, kn, c);
                bool want = true;
                for (int a = 0; a < 3; ++a) want &= sees(p.ax[a], t.qs[a] + o[r][a], g[a] + c[a]);
                const bool got = gna::sm90::window_bit(vis, 4 * j + 2 * r + e);
                CHECK(got == want, "query tile %d step %d row %d column %d: mask bit %d, brute force %d", bid, it,
                      m + 8 * r, 8 * j + 2 * tig + e, (int)got, (int)want);
              }
        }
      }
    }
    CHECK((int)seen.size() == t.ntiles, "query tile %d", bid);
    // The consumers' rows: in-tile coordinates (row-major, by shifts and masks) and windows.
    const int sh2 = __builtin_ctz(p.ax[2].qt), sh1 = __builtin_ctz(p.ax[1].qt);
    for (int m = 0; m < p.ax[0].qt * p.ax[1].qt * p.ax[2].qt; ++m) {
      int o[3], lo[3], hi[3];
      gna::sm90::box_coords(m, sh2, sh1, p.ax[1].qt - 1, p.ax[2].qt - 1, o);
      CHECK((o[0] * p.ax[1].qt + o[1]) * p.ax[2].qt + o[2] == m && o[1] < p.ax[1].qt && o[2] < p.ax[2].qt,
            "query tile %d row %d: coordinates %d %d %d", bid, m, o[0], o[1], o[2]);
      t.query_window(p, divs, o, lo, hi);
      for (int a = 0; a < 3; ++a) {
        int wl, wh;
        gna::window(p.ax[a], 0, t.qs[a] + o[a], wl, wh);
        CHECK(lo[a] == wl && hi[a] == wh, "query tile %d row %d axis %d: window", bid, m, a);
      }
    }
    for (int a = 0; a < 3; ++a) {  // every seen key is in the visited box (per axis)
      const Axis& x = p.ax[a];
      CHECK(t.qs[a] <= t.qe[a] && t.qe[a] < x.q0 + x.qn, "query tile %d range on axis %d", bid, a);
      for (int q = t.qs[a]; q <= t.qe[a]; ++q)
        for (int k = 0; k < x.L; ++k)
          if (sees(x, q, k)) {
            const int j = (k - x.kv0) / x.kt;
            CHECK(k >= x.kv0 && j >= t.kt0[a] && j < t.kt0[a] + t.nkt[a],
                  "query %d sees key %d outside the visited tiles (axis %d)", q, k, a);
          }
    }
  }
}

static void key_outer(const Params& p) {
  const gna::sm90::TileDivs divs = gna::sm90::tile_divs(p);
  const int n = p.ax[0].nkt * p.ax[1].nkt * p.ax[2].nkt;
  for (int bid = 0; bid < n; ++bid) {
    const gna::sm90::KeyTile t(p, divs, bid);
    std::set<std::vector<int>> seen;
    gna::sm90::BoxWalk walk;
    for (int it = 0; it < 2 * t.ntiles; ++it, walk.next(t.nqt)) {  // two heads: the walk wraps
      int qs[3], qw[3];
      t.query_tile(p, it % t.ntiles, qs);
      t.query_tile(p, walk, qw);
      CHECK(qs[0] == qw[0] && qs[1] == qw[1] && qs[2] == qw[2], "key tile %d step %d: the walk differs", bid, it);
      if (it >= t.ntiles) continue;
      CHECK(seen.insert({qs[0], qs[1], qs[2]}).second, "key tile %d visits a query tile twice", bid);
      int g[3];
      bool full = true;
      for (int a = 0; a < 3; ++a) {
        const Axis& x = p.ax[a];
        g[a] = qs[a] + x.q0;
        for (int q = g[a]; q < g[a] + x.qt && q < x.q0 + x.qn; ++q)
          for (int k = t.ks[a]; k <= t.ke[a]; ++k) full &= sees(x, q, k);
      }
      CHECK(t.full(p, g) == full, "key tile %d query tile %d: full flag %d, brute force %d", bid, it,
            (int)t.full(p, g), (int)full);
    }
    CHECK((int)seen.size() == t.ntiles, "key tile %d", bid);
    bool any_all_axes = true;
    for (int a = 0; a < 3; ++a) {
      const Axis& x = p.ax[a];
      bool any = false;
      for (int k = t.ks[a]; k <= t.ke[a]; ++k) {
        int first = x.q0 + x.qn, last = x.q0 - 1;
        for (int q = x.q0; q < x.q0 + x.qn; ++q)
          if (sees(x, q, k)) {
            first = q < first ? q : first;
            last = q;
            any = true;
            const int i = (q - x.q0) / x.qt;
            CHECK(t.nqt[a] > 0 && i >= t.qt0[a] && i < t.qt0[a] + t.nqt[a],
                  "key %d is seen by query %d outside the visited tiles (axis %d)", k, q, a);
          }
        const int f = gna::sm90::first_reaching(x, divs.s[a], x.q0, x.q0 + x.qn - 1, k);
        const int l = gna::sm90::last_reaching(x, divs.s[a], x.q0, x.q0 + x.qn - 1, k);
        if (first <= last) {
          CHECK(f == first && l == last, "key %d: queries [%d, %d], searches give [%d, %d]", k, first, last, f, l);
        } else {
          CHECK(f > l, "key %d: no query sees it, searches give [%d, %d]", k, f, l);
        }
      }
      any_all_axes &= any;
    }
    if (!any_all_axes) CHECK(t.ntiles == 0, "key tile %d: no query sees it but %d query tiles are visited", bid, t.ntiles);
  }
}

// The dK/dV block order: a permutation of the key tiles, heaviest first, ties in tile order
// (tile order past kMaxOrder key tiles).
static void block_order(const Params& p) {
  const int64_t nk = int64_t{p.ax[0].nkt} * p.ax[1].nkt * p.ax[2].nkt;
  static gna::sm90::TileOrder o;
  gna::sm90::dkv_order(p, nk, o);
  const gna::sm90::TileDivs divs = gna::sm90::tile_divs(p);
  if (nk > gna::sm90::kMaxOrder) {
    CHECK(o.n == 0, "%lld key tiles: an order of %d", (long long)nk, o.n);
    return;
  }
  CHECK(o.n == nk, "%lld key tiles: an order of %d", (long long)nk, o.n);
  std::vector<int> seen(static_cast<size_t>(nk), 0);
  for (int i = 0; i < o.n; ++i) {
    const int t = o.tile[i];
    CHECK(t < nk && !seen[t]++, "block %d: key tile %d out of range or taken twice", i, t);
    if (i == 0) continue;
    const int prev = o.tile[i - 1];
    const int wp = gna::sm90::KeyTile(p, divs, prev).ntiles, wt = gna::sm90::KeyTile(p, divs, t).ntiles;
    CHECK(wp > wt || (wp == wt && prev < t), "blocks %d, %d: tiles %d (%d steps), %d (%d steps)", i - 1, i, prev, wp,
          t, wt);
  }
}

// FastDiv (the kernels' divisions by a host-made magic number) equals `/` on every
// divisor up to 4096 and on large ones, for numerators near 0, near multiples of the
// divisor and up to 2^31 - 1.
static void fast_div() {
  std::vector<int> ds;
  for (int d = 1; d <= 4096; ++d) ds.push_back(d);
  for (int e = 12; e < 31; ++e)
    for (int d : {(1 << e) - 1, 1 << e, (1 << e) + 1, 3 << (e - 1)}) ds.push_back(d);
  ds.push_back(2147483647);
  for (int d : ds) {
    const gna::FastDiv f(d);
    std::vector<int64_t> ns = {0, 1, 2, 2147483647, 2147483646, 2147483647 - int64_t{d}};
    for (int64_t m = 1; m < 40; ++m) ns.insert(ns.end(), {m * d - 1, m * d, m * d + 1});
    for (uint64_t i = 1; i <= 64; ++i) ns.push_back(static_cast<int64_t>(2654435761u * i * (uint64_t(d) + 7) % 2147483648u));
    for (int64_t n : ns)
      if (n >= 0 && n <= 2147483647) {
        const int q = f(static_cast<int>(n));
        CHECK(q == n / d, "FastDiv(%d)(%lld) = %d, not %lld", d, (long long)n, q, (long long)(n / d));
      }
  }
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--fast-div") {
    fast_div();
    std::printf("%s %ld checks\n", failures ? "FAIL" : "ok", checks);
    return failures ? 1 : 0;
  }
  char line[512];
  while (std::fgets(line, sizeof line, stdin)) {
    std::vector<long> v;
    for (char* s = line; *s;) {
      char* e;
      const long x = std::strtol(s, &e, 10);
      if (e == s) break;
      v.push_back(x);
      s = e;
    }
    if (v.empty()) continue;
    const int rank = static_cast<int>(v[0]);
    Params p{};
    p.rank = rank;
    p.H = p.Hkv = 1;
    for (int a = 0; a < 3; ++a) p.ax[a] = Axis{1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1};
    for (int i = 0; i < rank; ++i) {
      const long* f = &v[1 + 8 * i];
      Axis& x = p.ax[3 - rank + i];
      x.L = f[0]; x.k = f[1]; x.s = f[2]; x.causal = f[3];
      x.q0 = f[4]; x.qn = f[5]; x.kv0 = f[6]; x.kvn = f[7];
    }
    const long before = checks;
    const int before_fail = failures;
    const int tokens[3][2] = {{128, 128}, {128, 64}, {64, 128}};
    int plans = 0;
    for (const auto& tk : tokens) {
      const gna::Plan plan = gna::choose_tiles(p, tk[0], tk[1]);
      if (!plan.ok) continue;
      ++plans;
      Params q = p;
      const int64_t nq = gna::apply_plan(q, plan, true);  // sets both tilings
      // plan.visits (the forward's choice of key tile size compares it) against the walk.
      const gna::sm90::TileDivs divs = gna::sm90::tile_divs(q);
      double visits = 0;
      for (int64_t bid = 0; bid < nq; ++bid) visits += gna::sm90::FwdTile(q, divs, static_cast<int>(bid)).ntiles;
      CHECK(visits == plan.visits, "plan %dx%d: %.0f key tiles visited, plan.visits %.0f", tk[0], tk[1], visits,
            plan.visits);
      query_outer(q);
      key_outer(q);
      block_order(q);
      closed_forms(q);
    }
    if (failures == before_fail) std::printf("ok %ld checks, %d plans\n", checks - before, plans);
  }
  return failures ? 1 : 0;
}
