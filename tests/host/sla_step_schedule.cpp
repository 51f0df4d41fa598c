// sla_step's CUDA schedule (step_layout, step_rows, step_column_sum in sla/sla.h) run serially
// over the block's threads, phase by phase as the kernel does, against a float64 reference:
// every state element updated exactly once, the output and z right, for D, Dv in odd and
// pack-sized values, aligned and misaligned state (the scalar path).
#include "check.h"
#include "sla/sla.h"
#include "sla/sla_math.h"

using namespace slab::sla;

template <typename A>
static void run_case(int D, int Dv, bool misalign, uint32_t seed) {
  const auto q = host_test::randn(D, seed), k = host_test::randn(D, seed + 1), v = host_test::randn(Dv, seed + 2);
  const auto s0 = host_test::randn(int64_t(D) * Dv, seed + 3);
  auto z0 = host_test::randn(D, seed + 4);
  for (auto& x : z0) x = std::abs(x);
  // The state buffer, 16-byte aligned, optionally shifted by one element.
  std::vector<A> buf(size_t(D) * Dv + 8);
  A* base = buf.data();
  while (!slab::vec_aligned(base)) ++base;
  A* state = base + (misalign ? 1 : 0);
  for (int64_t i = 0; i < int64_t(D) * Dv; ++i) state[i] = A(s0[size_t(i)]);
  std::vector<A> z(z0.begin(), z0.end());
  const double eps = 1e-6;

  // Reference.
  std::vector<double> s_ref(s0), o_ref(size_t(Dv), 0.0);
  double qz = 0;
  for (int d = 0; d < D; ++d) qz += std::max(q[d], 0.0) * (z0[d] + std::max(k[d], 0.0));
  for (int d = 0; d < D; ++d)
    for (int c = 0; c < Dv; ++c) {
      s_ref[size_t(d) * Dv + c] += std::max(k[d], 0.0) * v[c];
      o_ref[size_t(c)] += std::max(q[d], 0.0) * s_ref[size_t(d) * Dv + c];
    }
  for (auto& o : o_ref) o /= qz + eps;

  // The kernel's schedule.
  constexpr int kW = slab::kPackWidth<A>;
  const StepLayout lay = step_layout(Dv, kW, slab::all_vec_aligned(state));
  HOST_CHECK(lay.width == ((!misalign && Dv % kW == 0) ? kW : 1), "width %d for Dv=%d misalign=%d", lay.width, Dv,
             misalign);
  HOST_CHECK(lay.tile * lay.groups == kStepThreads && (lay.tile & (lay.tile - 1)) == 0, "tile %d", lay.tile);
  std::vector<A> fq(static_cast<size_t>(D)), fk(static_cast<size_t>(D)), o(static_cast<size_t>(Dv), A(-1));
  A qz_k = 0;
  for (int d = 0; d < D; ++d) {
    fq[size_t(d)] = phi(A(q[size_t(d)])), fk[size_t(d)] = phi(A(k[size_t(d)]));
    qz_k += fq[size_t(d)] * (z[size_t(d)] + fk[size_t(d)]);
  }
  const A inv_den = A(1) / denominator(qz_k, A(eps));
  std::vector<A> part(size_t(kStepThreads) * kW);
  std::vector<int> touched(size_t(D) * Dv, 0);
  for (int64_t tile0 = 0; tile0 < lay.packs; tile0 += lay.tile) {
    for (int tid = 0; tid < kStepThreads; ++tid) {
      const int j = tid % lay.tile, group = tid / lay.tile;
      const int64_t c = (tile0 + j) * lay.width;
      A s[kW] = {};
      if (c < Dv) {
        A vc[kW] = {};
        for (int i = 0; i < lay.width; ++i) vc[i] = A(v[size_t(c + i)]);
        if (lay.width == kW) {
          step_rows<kW>(state + c, Dv, D, group, lay.groups, fk.data(), fq.data(), vc, s);
        } else {
          A v1[1] = {vc[0]}, s1[1] = {};
          step_rows<1>(state + c, Dv, D, group, lay.groups, fk.data(), fq.data(), v1, s1);
          s[0] = s1[0];
        }
        for (int d = group; d < D; d += lay.groups)
          for (int i = 0; i < lay.width; ++i) ++touched[size_t(d) * Dv + size_t(c + i)];
      }
      for (int i = 0; i < lay.width; ++i) part[size_t(tid * lay.width + i)] = s[i];
    }
    for (int j = 0; j < lay.tile; ++j) {
      const int64_t c = (tile0 + j) * lay.width;
      if (c >= Dv) continue;
      for (int i = 0; i < lay.width; ++i) {
        const A sum = lay.width == kW ? step_column_sum<kW>(part.data(), lay.tile, lay.groups, j, i)
                                      : step_column_sum<1>(part.data(), lay.tile, lay.groups, j, i);
        o[size_t(c + i)] = sum * inv_den;
      }
    }
  }
  for (int d = 0; d < D; ++d) z[size_t(d)] += fk[size_t(d)];

  const double tol = sizeof(A) == 4 ? 2e-5 : 1e-12;
  for (int64_t i = 0; i < int64_t(D) * Dv; ++i) {
    HOST_CHECK(touched[size_t(i)] == 1, "D=%d Dv=%d: state element %lld updated %d times", D, Dv, (long long)i,
               touched[size_t(i)]);
    HOST_CHECK(host_test::close(state[i], s_ref[size_t(i)], tol, tol), "state[%lld] %g vs %g", (long long)i,
               double(state[i]), s_ref[size_t(i)]);
  }
  for (int c = 0; c < Dv; ++c)
    HOST_CHECK(host_test::close(o[size_t(c)], o_ref[size_t(c)], tol, tol), "D=%d Dv=%d misalign=%d: o[%d] %g vs %g", D,
               Dv, misalign, c, double(o[size_t(c)]), o_ref[size_t(c)]);
  for (int d = 0; d < D; ++d)
    HOST_CHECK(host_test::close(z[size_t(d)], z0[size_t(d)] + std::max(k[size_t(d)], 0.0), tol, tol), "z[%d]", d);
}

int main() {
  uint32_t seed = 1;
  for (int D : {1, 3, 16, 64, 128, 256})
    for (int Dv : {1, 2, 5, 16, 63, 64, 128, 256, 257, 1030})
      for (bool misalign : {false, true}) {
        run_case<float>(D, Dv, misalign, seed += 7);
        if (D <= 128) run_case<double>(D, Dv, misalign, seed += 7);
      }
  return host_test::finish();
}
