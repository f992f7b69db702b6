// CPU driver for tests/test_plan.py: runs the Hopper tile planner (csrc/gna_plan.h)
// on problems read from stdin, one per line:
//   rank  then per axis (outermost first):  L k s causal q0 qn kv0 kvn
// (dilation 1: the only case the Hopper path takes). The gna::Params is filled as
// csrc/gna_ffi.cu's make_params fills these fields: padded to rank 3, unused leading
// axes are Axis{1, 1, 1, 1, 0, 0, 1, 0, 1, ...}.
// Output, one block per problem (tile shapes in rank-3 order, unused axes first):
//   plan OK QT0 QT1 QT2 KT0 KT1 KT2 VISITS FULL COST
//   keys V128 V64 SHORT      the forward's key-tile choice at head dims <= 128: key tiles
//                            visited by the plans for 128- and 64-token key tiles, and
//                            gna::short_keys_pay (1: 64-token tiles)
//   pair A128 A64            (where both plans are ok) gna::pair_axis for the forward's
//                            plan with 128- and with 64-token key tiles: the axis of its
//                            pairs of query tiles with the same key tiles, or -1
//   items NQ N N1            (only where the line ends with CTAS SMS: batches x heads and
//                            SMs, and the plan is ok) the forward's plan at head dims
//                            <= 128 (the one keys picks): its query tiles and
//                            gna::forward_items for the kernel with two Q slots (N) and
//                            with one (N1: head dim 128 with 128-token key tiles)
//   pairs A CTAS P           (with items) the forward plan's gna::pair_axis, the CTAs of
//                            its pair grid (batches x heads x 2 x clusters) and
//                            gna::pairs_pay for that grid (1: the pair kernel runs where
//                            items is 1 at head dim 128)
//   cand QT0 QT1 QT2 KT0 KT1 KT2 VISITS FULL          (only with argv[1] == "all")
//   end
// VISITS / FULL: visited (query tile, key tile) pairs over the query block and how
// many need no element mask, from gna::axis_cost (the products choose_tiles uses);
// COST = VISITS + 0.25 * (VISITS - FULL), the planner's objective.
#include <cstdio>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>

#include "gna_plan.h"

namespace {

void totals(const gna::Params& p, const int qt[3], const int kt[3], long long& visits,
            long long& full) {
  visits = full = 1;
  for (int a = 0; a < 3; ++a) {
    int64_t v, f;
    gna::axis_cost(p.ax[a], qt[a], kt[a], v, f);
    visits *= v;
    full *= f;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool all = argc > 1 && std::strcmp(argv[1], "all") == 0;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    int rank;
    if (!(in >> rank)) continue;
    if (rank < 1 || rank > 3) {
      std::fprintf(stderr, "bad rank %d\n", rank);
      return 2;
    }
    gna::Params p{};
    p.rank = rank;
    const int off = 3 - rank;
    for (int a = 0; a < 3; ++a) {
      gna::Axis& x = p.ax[a];
      x = gna::Axis{1, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1};
      if (a < off) continue;
      if (!(in >> x.L >> x.k >> x.s >> x.causal >> x.q0 >> x.qn >> x.kv0 >> x.kvn)) {
        std::fprintf(stderr, "bad problem line: %s\n", line.c_str());
        return 2;
      }
      x.d = 1;
    }
    const gna::Plan plan = gna::choose_tiles(p);
    long long v = 0, f = 0;
    if (plan.ok) totals(p, plan.qt, plan.kt, v, f);
    std::printf("plan %d %d %d %d %d %d %d %lld %lld %.17g\n", plan.ok ? 1 : 0,
                plan.ok ? plan.qt[0] : 0, plan.ok ? plan.qt[1] : 0, plan.ok ? plan.qt[2] : 0,
                plan.ok ? plan.kt[0] : 0, plan.ok ? plan.kt[1] : 0, plan.ok ? plan.kt[2] : 0, v, f,
                v + 0.25 * static_cast<double>(v - f));
    const gna::Plan k64 = gna::choose_tiles(p, gna::kPlanTileTokens, 64);
    const bool short_keys = gna::short_keys_pay(plan, k64);
    std::printf("keys %.17g %.17g %d\n", plan.visits, k64.visits, short_keys ? 1 : 0);
    long long ctas;
    int sms;
    const gna::Plan& fwd = short_keys ? k64 : plan;
    if (plan.ok && k64.ok) {
      gna::Params p128 = p, p64 = p;
      gna::apply_plan(p128, plan, true);
      gna::apply_plan(p64, k64, true);
      std::printf("pair %d %d\n", gna::pair_axis(p128), gna::pair_axis(p64));
    }
    if (in >> ctas >> sms && fwd.ok) {
      int64_t nq = 1;
      for (int a = 0; a < 3; ++a) nq *= (p.ax[a].qn + fwd.qt[a] - 1) / fwd.qt[a];
      std::printf("items %lld %d %d\n", static_cast<long long>(nq), gna::forward_items(nq, fwd.visits, ctas, sms),
                  gna::forward_items(nq, fwd.visits, ctas, sms, gna::kOneSlotItemTiles));
      gna::Params pf = p;
      gna::apply_plan(pf, fwd, true);
      const int axis = gna::pair_axis(pf);
      const int64_t clusters = axis >= 0 ? gna::pair_clusters(pf, axis, nq) : nq;
      std::printf("pairs %d %lld %d\n", axis, static_cast<long long>(2 * clusters * ctas),
                  axis >= 0 && gna::pairs_pay(2 * clusters * ctas, sms, fwd.visits, nq) ? 1 : 0);
    }
    if (all) {
      int qcap[3], kcap[3];
      for (int a = 0; a < 3; ++a) {
        qcap[a] = gna::pow2_cap(p.ax[a].qn);
        kcap[a] = gna::pow2_cap(p.ax[a].kvn);
      }
      for (const auto& q : gna::tile_shapes(qcap))
        for (const auto& k : gna::tile_shapes(kcap)) {
          totals(p, q.data(), k.data(), v, f);
          std::printf("cand %d %d %d %d %d %d %lld %lld\n", q[0], q[1], q[2], k[0], k[1], k[2], v, f);
        }
    }
    std::printf("end\n");
  }
  return 0;
}
