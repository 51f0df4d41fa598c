// The SLA tensor-core forward (sla_cuda.cu: chunk_state_kernel, scan_kernel, chunk_output_kernel)
// run on the CPU through the index maps of sla/sla_chunk.h:
//   (a) the mma.m16n8k16 A/B/C fragment maps and the ldmatrix.x4 lane addressing against the PTX
//       ISA's tables (a model of ldmatrix / mma written here from the ISA text, not from the
//       header), the C -> A fragment reuse, bank-conflict-free padded rows, phi on packed pairs
//       for every bf16 / fp16 bit pattern;
//   (b) the whole forward serially per block / warp / lane, with the operands rounded to bf16 or
//       fp16 where the kernel holds them so (inputs, P, S_prev) and fp32 accumulation, against a
//       float64 reference: causal and non-causal, N in {1, 5, 63, 64, 65, 130, 200}, D and Dv in
//       {16, 32, 64, 128} and mixed, key-padding masks with NaN in the masked-out rows; every
//       output element written exactly once.
#include <algorithm>
#include <cstring>

#include "check.h"
#include "sla/sla_chunk.h"
#include "sla/sla_math.h"

using namespace slab::sla;
using namespace slab::sla::chunk;

// ---- 16-bit floating point on the host (round to nearest even) ----------------------------------
enum class Half { kBf16, kFp16 };

static float bits_to_float(uint16_t h, Half t) {
  if (t == Half::kBf16) {
    const uint32_t w = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
  const int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
  double v = exp == 0 ? std::ldexp(man, -24) : exp == 31 ? (man ? NAN : INFINITY) : std::ldexp(1024 + man, exp - 25);
  return float(sign ? -v : v);
}

static uint16_t float_to_bits(float f, Half t) {
  if (t == Half::kBf16) {
    uint32_t w;
    std::memcpy(&w, &f, 4);
    if (std::isnan(f)) return 0x7fc0;
    w += 0x7fff + ((w >> 16) & 1);
    return uint16_t(w >> 16);
  }
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to infinity (>= 65520)
  if (ax < 0x38800000u)                                    // below 2^-14: subnormal, units of 2^-24
    return uint16_t(sign | uint32_t(std::nearbyint(double(std::abs(f)) * 16777216.0)));
  uint32_t r = ((((ax >> 23) - 127 + 15) << 10) | ((ax & 0x7fffffu) >> 13));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // to nearest even; a carry bumps the exponent
  return uint16_t(sign | r);
}

static uint32_t inf_bits(Half t) { return t == Half::kBf16 ? 0x7f80u : 0x7c00u; }

// ---- the PTX ISA's tables (mma.m16n8k16 .bf16/.f16, ldmatrix .m8n8 .b16), written independently --
// groupID = laneid >> 2, threadID_in_group = laneid % 4.
static Pos isa_a(int lane, int i) {  // a0..a3 hold elements i = 0..7 (two per register)
  const int g = lane >> 2, t = lane % 4;
  const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
  const int col = i < 4 ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8;
  return {row, col};
}
static Pos isa_b(int lane, int i) {  // b0, b1 hold i = 0..3
  const int g = lane >> 2, t = lane % 4;
  return {i < 2 ? t * 2 + (i & 1) : t * 2 + (i & 1) + 8, g};
}
static Pos isa_c(int lane, int i) {  // c0..c3
  const int g = lane >> 2, t = lane % 4;
  return {i < 2 ? g : g + 8, t * 2 + (i & 1)};
}

// A shared tile of 16-bit values (row stride ld) and a warp's registers.
struct Tile {
  int ld = 0;
  std::vector<uint16_t> v;
  Tile(int rows, int ld_) : ld(ld_), v(size_t(rows) * size_t(ld_), 0) {}
  uint16_t& at(int r, int c) { return v.at(size_t(r) * size_t(ld) + size_t(c)); }
};
using Regs = uint32_t[32][4];
using Acc = float[32][4];

// ldmatrix.x4 as the ISA defines it: lanes 8 j .. 8 j + 7 give the row addresses of matrix j; without
// .trans lane l receives row l / 4, elements 2 (l % 4), +1 of each matrix; with .trans the
// elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
static void ldsm(Regs& out, Tile& tile, Ldsm kind, int r0, int c0) {
  Pos rows[32];
  for (int l = 0; l < 32; ++l) rows[l] = ldsm_row(kind, l, r0, c0);
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) {
      uint32_t w = 0;
      for (int e = 0; e < 2; ++e) {
        const int mr = ldsm_trans(kind) ? 2 * (l % 4) + e : l / 4, mc = ldsm_trans(kind) ? l / 4 : 2 * (l % 4) + e;
        const Pos p = rows[8 * j + mr];
        w |= uint32_t(tile.at(p.row, p.col + mc)) << (16 * e);
      }
      out[l][j] = w;
    }
}

static float reg_half(uint32_t w, int e, Half t) { return bits_to_float(uint16_t(w >> (16 * e)), t); }

// d += a b over the warp (b from registers b_lo, b_hi of `b`), products exact, fp32 sums.
static void mma(Acc& d, const Regs& a, const Regs& b, int b_lo, Half t) {
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) A[isa_a(l, i).row][isa_a(l, i).col] = reg_half(a[l][i / 2], i % 2, t);
    for (int i = 0; i < 4; ++i) B[isa_b(l, i).row][isa_b(l, i).col] = reg_half(b[l][b_lo + i / 2], i % 2, t);
  }
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      const Pos p = isa_c(l, i);
      float s = d[l][i];
      for (int k = 0; k < 16; ++k) s += A[p.row][k] * B[k][p.col];
      d[l][i] = s;
    }
}

static void phi_regs(Regs& r, Half t) {
  for (auto& lane : r)
    for (auto& w : lane) w = phi_pair(w, inf_bits(t));
}

static uint32_t pack2(float lo, float hi, Half t) {
  return uint32_t(float_to_bits(lo, t)) | (uint32_t(float_to_bits(hi, t)) << 16);
}

// ---- (a) the maps ---------------------------------------------------------------------------------
static void check_maps() {
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) {
      HOST_CHECK(mma_a_pos(l, i).row == isa_a(l, i).row && mma_a_pos(l, i).col == isa_a(l, i).col, "A lane %d e %d", l,
                 i);
      const CFrag f = cfrag_of_a(i);  // the C element reused as this A element, n-tile 2 kk + tile
      HOST_CHECK(isa_c(l, f.e).row == isa_a(l, i).row && isa_c(l, f.e).col + 8 * f.tile == isa_a(l, i).col,
                 "C->A lane %d e %d", l, i);
    }
    for (int i = 0; i < 4; ++i) {
      HOST_CHECK(mma_b_pos(l, i).row == isa_b(l, i).row && mma_b_pos(l, i).col == isa_b(l, i).col, "B lane %d", l);
      HOST_CHECK(mma_c_pos(l, i).row == isa_c(l, i).row && mma_c_pos(l, i).col == isa_c(l, i).col, "C lane %d", l);
    }
  }
  // ldmatrix: a tile of distinct values; the registers must be the operand's fragments.
  for (int cols : {16, 32, 48, 64, 80, 128}) {
    const int ld = smem_ld(cols);
    Tile tile(64, ld);
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < ld; ++c) tile.at(r, c) = uint16_t(r * 256 + c);
    auto val = [&](int r, int c) { return uint16_t(r * 256 + c); };
    auto half = [](const Regs& R, int l, int i) { return uint16_t(R[l][i / 2] >> (16 * (i % 2))); };
    for (int r0 = 0; r0 + 16 <= 64; r0 += 16)
      for (int c0 = 0; c0 + 16 <= cols; c0 += 16) {
        Regs R;
        ldsm(R, tile, Ldsm::kA, r0, c0);  // A(m, k) = tile[r0 + m][c0 + k]
        for (int l = 0; l < 32; ++l)
          for (int i = 0; i < 8; ++i)
            HOST_CHECK(half(R, l, i) == val(r0 + isa_a(l, i).row, c0 + isa_a(l, i).col), "kA lane %d", l);
        ldsm(R, tile, Ldsm::kAT, r0, c0);  // A(m, k) = tile[r0 + k][c0 + m]
        for (int l = 0; l < 32; ++l)
          for (int i = 0; i < 8; ++i)
            HOST_CHECK(half(R, l, i) == val(r0 + isa_a(l, i).col, c0 + isa_a(l, i).row), "kAT lane %d", l);
        ldsm(R, tile, Ldsm::kB, r0, c0);  // B_nt(k, n) = tile[r0 + 8 nt + n][c0 + k]
        for (int l = 0; l < 32; ++l)
          for (int nt = 0; nt < 2; ++nt)
            for (int i = 0; i < 4; ++i)
              HOST_CHECK(half(R, l, 4 * nt + i) == val(r0 + 8 * nt + isa_b(l, i).col, c0 + isa_b(l, i).row),
                         "kB lane %d", l);
        ldsm(R, tile, Ldsm::kBT, r0, c0);  // B_nt(k, n) = tile[r0 + k][c0 + 8 nt + n]
        for (int l = 0; l < 32; ++l)
          for (int nt = 0; nt < 2; ++nt)
            for (int i = 0; i < 4; ++i)
              HOST_CHECK(half(R, l, 4 * nt + i) == val(r0 + isa_b(l, i).row, c0 + 8 * nt + isa_b(l, i).col),
                         "kBT lane %d", l);
        // Each 8-lane phase reads 8 rows of 16 bytes: with the padded stride they fill all 32 banks.
        for (Ldsm kind : {Ldsm::kA, Ldsm::kAT, Ldsm::kB, Ldsm::kBT})
          for (int j = 0; j < 4; ++j) {
            uint32_t banks = 0;
            for (int r = 0; r < 8; ++r) {
              const Pos p = ldsm_row(kind, 8 * j + r, r0, c0);
              const int64_t byte = (int64_t(p.row) * ld + p.col) * 2;
              HOST_CHECK(byte % 16 == 0, "ldmatrix row not 16-byte aligned");
              for (int w = 0; w < 4; ++w) banks |= 1u << ((byte / 4 + w) % 32);
            }
            HOST_CHECK(banks == 0xffffffffu, "bank conflict: cols %d kind %d", cols, int(kind));
          }
      }
  }
  // phi on packed pairs, every bit pattern in both halves' positions (and the host codecs round-trip).
  for (Half t : {Half::kBf16, Half::kFp16})
    for (uint32_t h = 0; h < 65536; ++h) {
      const float x = bits_to_float(uint16_t(h), t), want = phi(x);
      HOST_CHECK(std::isnan(x) || float_to_bits(x, t) == h, "codec %04x", h);
      if (!std::isnan(x) && std::isfinite(x) && (h & 0x7fffu) != 0 && (h & 0x7fffu) < inf_bits(t) - 1) {
        const float up = bits_to_float(uint16_t(h + 1), t), mid = x + (up - x) / 2;  // a tie: to even
        HOST_CHECK(float_to_bits(mid, t) == ((h & 1) ? h + 1 : h), "tie %04x", h);
      }
      for (int s = 0; s < 2; ++s) {
        const uint32_t w = s == 0 ? h | 0x3c000000u : (h << 16) | 0x3c00u;
        const uint32_t out = phi_pair(w, inf_bits(t));
        const float got = bits_to_float(uint16_t(out >> (16 * s)), t);
        HOST_CHECK((std::isnan(want) && std::isnan(got)) || got == want, "phi(%04x) = %g, want %g", h, got, want);
        HOST_CHECK((out >> (16 * (1 - s)) & 0xffffu) == (w >> (16 * (1 - s)) & 0xffffu), "phi touched the other half");
      }
    }
}

// ---- (b) the forward ----------------------------------------------------------------------------------
struct Problem {
  int B, H, N, D, Dv;
  bool causal, masked;
  Half t;
  std::vector<uint16_t> q, k, v;  // [B, H, N, D|Dv] contiguous bits
  std::vector<bool> mask;         // [B, N]
  bool kept(int b, int n) const { return !masked || mask[size_t(b) * N + n]; }
};

// load_chunk: rows n0 .. n0 + 63, zero past N and (keys) for masked-out tokens.
static Tile load_chunk(const Problem& P, const std::vector<uint16_t>& x, int cols, int b, int h, int n0, bool keys) {
  Tile tile(kChunk, smem_ld(cols));
  for (int r = 0; r < kChunk; ++r) {
    const int n = n0 + r;
    if (n >= P.N || (keys && !P.kept(b, n))) continue;
    for (int c = 0; c < cols; ++c) tile.at(r, c) = x[((size_t(b) * P.H + h) * P.N + n) * cols + c];
  }
  return tile;
}

struct Outputs {
  std::vector<float> o, den, ws, state, z;
  std::vector<int> o_writes, den_writes;
};

// The backward's G = grad_o / den rounded to the input type, and gden (load_g_chunk's inputs).
struct Grad {
  std::vector<uint16_t> g;  // [B, H, N, Dv]
  std::vector<float> gden;  // [B, H, N]
};

// chunk_state_kernel<kGrad>: forward phi(K)^T V, sum phi(K); backward (g) phi(Q)^T G, phi(Q)^T gden.
static void state_pass(const Problem& P, std::vector<float>& slots, const Grad* g) {
  const int64_t chunks = num_chunks(P.N), E = slot_elems(P.D, P.Dv);
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.H; ++h)
      for (int64_t c = 0; c < chunks; ++c) {
        const int n0 = int(c) * kChunk, rows = std::min(kChunk, P.N - n0);
        const size_t row0 = (size_t(b) * P.H + h) * P.N + size_t(n0);
        Tile ks = g ? load_chunk(P, P.q, P.D, b, h, n0, false) : load_chunk(P, P.k, P.D, b, h, n0, true);
        Tile vs = g ? load_chunk(P, g->g, P.Dv, b, h, n0, false) : load_chunk(P, P.v, P.Dv, b, h, n0, true);
        float* slot = &slots[size_t(((b * P.H + h) * chunks + c) * E)];
        for (int d = 0; d < P.D; ++d) {
          float s = 0;
          for (int r = 0; r < rows; ++r) s += phi(bits_to_float(ks.at(r, d), P.t)) * (g ? g->gden[row0 + r] : 1.0f);
          slot[P.D * P.Dv + d] = s;
        }
        std::vector<int> unit_done(size_t(state_units(P.D, P.Dv)), 0);
        for (int warp = 0; warp < kWarps; ++warp)
          for (int u = warp; u < state_units(P.D, P.Dv); u += kWarps) {
            ++unit_done[size_t(u)];
            const StateUnit unit = state_unit(u, P.Dv);
            Acc acc[8] = {};
            for (int kt = 0; kt * 16 < rows; ++kt) {
              Regs a;
              ldsm(a, ks, Ldsm::kAT, 16 * kt, unit.row0);
              phi_regs(a, P.t);
              for (int np = 0; np < 4; ++np) {
                if (unit.col0 + 16 * np >= P.Dv) break;
                Regs bv;
                ldsm(bv, vs, Ldsm::kBT, 16 * kt, unit.col0 + 16 * np);
                mma(acc[2 * np], a, bv, 0, P.t);
                mma(acc[2 * np + 1], a, bv, 2, P.t);
              }
            }
            for (int nt = 0; nt < 8; ++nt) {
              const int col0 = unit.col0 + 8 * nt;
              if (col0 >= P.Dv) break;
              for (int lane = 0; lane < 32; ++lane)
                for (int e = 0; e < 4; ++e) {
                  const Pos at = mma_c_pos(lane, e);
                  slot[(unit.row0 + at.row) * P.Dv + col0 + at.col] = acc[nt][lane][e];
                }
            }
          }
        for (int x : unit_done) HOST_CHECK(x == 1, "state unit run %d times", x);
      }
}

// scan_kernel: the slots of each (b, h) in order (reverse for dS), prefixes with `prefix`, totals out.
static void scan_pass(const Problem& P, std::vector<float>& slots, std::vector<float>& s_tot, std::vector<float>& z_tot,
                      bool prefix, bool reverse) {
  const int64_t chunks = num_chunks(P.N), E = slot_elems(P.D, P.Dv);
  for (int64_t bh = 0; bh < int64_t(P.B) * P.H; ++bh)
    for (int64_t e = 0; e < E; ++e) {
      float* first = &slots[size_t((bh * chunks + (reverse ? chunks - 1 : 0)) * E + e)];
      const float total = scan_slots(first, chunks, reverse ? -E : E, prefix);
      if (e < int64_t(P.D) * P.Dv)
        s_tot[size_t(bh * P.D * P.Dv + e)] = total;
      else
        z_tot[size_t(bh * P.D + e - P.D * P.Dv)] = total;
    }
}

static void output_pass(const Problem& P, Outputs& out, float eps) {
  const int64_t chunks = num_chunks(P.N), E = slot_elems(P.D, P.Dv);
  const int D = P.D, Dv = P.Dv, kDvTile = Dv <= 32 ? 32 : Dv <= 64 ? 64 : 128;
  const bool intra = P.causal;
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.H; ++h)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t bh = int64_t(b) * P.H + h;
        const int n0 = int(c) * kChunk;
        Tile qs = load_chunk(P, P.q, D, b, h, n0, false);
        Tile ks = load_chunk(P, P.k, D, b, h, n0, true), vs = load_chunk(P, P.v, Dv, b, h, n0, true);
        const float* s_src = intra ? &out.ws[size_t((bh * chunks + c) * E)] : &out.state[size_t(bh * D * Dv)];
        const float* z_src = intra ? s_src + D * Dv : &out.z[size_t(bh * D)];
        float smax = 0;  // the fp16 state scale (state_scale_of)
        for (int i = 0; i < D * Dv; ++i) smax = std::max(smax, std::abs(s_src[i]));
        const float scale = P.t == Half::kFp16 ? state_scale(smax) : 1.0f, inv_scale = 1.0f / scale;
        Tile ss(D, smem_ld(Dv));
        for (int d = 0; d < D; ++d)
          for (int col = 0; col < Dv; ++col) ss.at(d, col) = float_to_bits(s_src[d * Dv + col] * inv_scale, P.t);
        for (int warp = 0; warp < kWarps; ++warp) {
          const int m0 = 16 * warp;
          float qz[32][2] = {}, den[32][2] = {};
          auto add_qz = [&](const Regs& a, int kt) {
            for (int lane = 0; lane < 32; ++lane)
              for (int e = 0; e < 8; ++e) {
                const Pos at = mma_a_pos(lane, e);
                qz[lane][at.row >> 3] += reg_half(a[lane][e >> 1], e & 1, P.t) * z_src[16 * kt + at.col];
              }
          };
          auto quad_den = [&](float (&x)[32][2]) {  // quad_sum by the two xor shuffles, then eps
            for (int r = 0; r < 2; ++r) {
              float t1[32], t2[32];
              for (int lane = 0; lane < 32; ++lane) t1[lane] = x[lane][r] + x[lane ^ 1][r];
              for (int lane = 0; lane < 32; ++lane) t2[lane] = t1[lane] + t1[lane ^ 2];
              for (int lane = 0; lane < 32; ++lane) den[lane][r] = denominator(t2[lane], eps);
            }
          };
          Acc acc[16] = {};
          if (intra) {
            Acc pc[8] = {};
            for (int kt = 0; kt < D / 16; ++kt) {
              Regs a;
              ldsm(a, qs, Ldsm::kA, m0, 16 * kt);
              phi_regs(a, P.t);
              add_qz(a, kt);
              for (int np = 0; np < 4; ++np) {
                if (!key_tile_needed(true, warp, np)) break;
                Regs bk;
                ldsm(bk, ks, Ldsm::kB, 16 * np, 16 * kt);
                phi_regs(bk, P.t);
                mma(pc[2 * np], a, bk, 0, P.t);
                mma(pc[2 * np + 1], a, bk, 2, P.t);
              }
            }
            float rsq[32][2] = {};
            for (int lane = 0; lane < 32; ++lane) {
              for (int nt = 0; nt < 8; ++nt)
                for (int e = 0; e < 4; ++e) {
                  const Pos at = mma_c_pos(lane, e);
                  if (!keep_causal(m0 + at.row, 8 * nt + at.col)) pc[nt][lane][e] = 0;
                  rsq[lane][e >> 1] += pc[nt][lane][e];
                }
              for (int r = 0; r < 2; ++r) rsq[lane][r] += qz[lane][r];
            }
            quad_den(rsq);
            Regs pa[4];
            for (int lane = 0; lane < 32; ++lane)
              for (int kk = 0; kk < 4; ++kk)
                for (int r = 0; r < 4; ++r) {
                  const CFrag f = cfrag_of_a(2 * r);
                  const float inv = 1.0f / den[lane][f.e >> 1];
                  pa[kk][lane][r] =
                      pack2(pc[2 * kk + f.tile][lane][f.e] * inv, pc[2 * kk + f.tile][lane][f.e + 1] * inv, P.t);
                }
            for (int kk = 0; kk < 4; ++kk) {
              if (!key_tile_needed(true, warp, kk)) break;
              for (int np = 0; np < kDvTile / 16; ++np) {
                if (16 * np >= Dv) break;
                Regs bv;
                ldsm(bv, vs, Ldsm::kBT, 16 * kk, 16 * np);
                mma(acc[2 * np], pa[kk], bv, 0, P.t);
                mma(acc[2 * np + 1], pa[kk], bv, 2, P.t);
              }
            }
            for (int nt = 0; nt < kDvTile / 8; ++nt)
              for (int lane = 0; lane < 32; ++lane)
                for (int e = 0; e < 4; ++e) acc[nt][lane][e] *= den[lane][e >> 1] * inv_scale;
          }
          for (int kt = 0; kt < D / 16; ++kt) {
            Regs a;
            ldsm(a, qs, Ldsm::kA, m0, 16 * kt);
            phi_regs(a, P.t);
            if (!intra) add_qz(a, kt);
            for (int np = 0; np < kDvTile / 16; ++np) {
              if (16 * np >= Dv) break;
              Regs bs;
              ldsm(bs, ss, Ldsm::kBT, 16 * kt, 16 * np);
              mma(acc[2 * np], a, bs, 0, P.t);
              mma(acc[2 * np + 1], a, bs, 2, P.t);
            }
          }
          if (!intra) quad_den(qz);
          const int rows = P.N - n0;
          for (int lane = 0; lane < 32; ++lane)
            for (int r = 0; r < 2; ++r) {
              const Pos at = mma_c_pos(lane, 2 * r);
              if (m0 + at.row >= rows) continue;
              const int64_t n = bh * P.N + n0 + m0 + at.row;
              if (lane % 4 == 0) out.den[size_t(n)] = den[lane][r], ++out.den_writes[size_t(n)];
              const float f = scale / den[lane][r];
              for (int nt = 0; nt < kDvTile / 8; ++nt) {
                if (8 * nt >= Dv) break;
                const uint32_t w = pack2(acc[nt][lane][2 * r] * f, acc[nt][lane][2 * r + 1] * f, P.t);
                for (int e = 0; e < 2; ++e) {
                  const size_t at_o = size_t(n * Dv + 8 * nt + at.col + e);
                  out.o[at_o] = reg_half(w, e, P.t);
                  ++out.o_writes[at_o];
                }
              }
            }
        }
      }
}

// ---- the backward (bf16): chunk_dq_kernel, chunk_dkdv_kernel through their warp helpers ------------

// intra_product: the warp's 16 x 64 product A B^T (A rows m0.. of `as`, B rows of `bs`, over kdim),
// masked (lower: col <= row, else col >= row), plus row_add[row] / col_add[col], as A fragments.
static void intra_product(Regs (&out)[4], Tile& as, Tile& bs, int kdim, int m0, int warp, bool phi_on, bool lower,
                          const float* row_add, const float* col_add, Half t) {
  Acc c[8] = {};
  for (int kt = 0; kt < kdim / 16; ++kt) {
    Regs a;
    ldsm(a, as, Ldsm::kA, m0, 16 * kt);
    if (phi_on) phi_regs(a, t);
    for (int np = 0; np < 4; ++np) {
      if (lower ? !key_tile_needed(true, warp, np) : !query_tile_needed(true, warp, np)) continue;
      Regs b;
      ldsm(b, bs, Ldsm::kB, 16 * np, 16 * kt);
      if (phi_on) phi_regs(b, t);
      mma(c[2 * np], a, b, 0, t);
      mma(c[2 * np + 1], a, b, 2, t);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int nt = 0; nt < 8; ++nt)
      for (int e = 0; e < 4; ++e) {
        const Pos at = mma_c_pos(lane, e);
        const int row = m0 + at.row, col = 8 * nt + at.col;
        const bool keep = lower ? keep_causal(row, col) : keep_causal(col, row);
        const float add = row_add != nullptr ? row_add[row] : (col_add != nullptr ? col_add[col] : 0.0f);
        c[nt][lane][e] = keep ? c[nt][lane][e] + add : 0.0f;
      }
    for (int kk = 0; kk < 4; ++kk)
      for (int r = 0; r < 4; ++r) {
        const CFrag f = cfrag_of_a(2 * r);
        out[kk][lane][r] = pack2(c[2 * kk + f.tile][lane][f.e], c[2 * kk + f.tile][lane][f.e + 1], t);
      }
  }
}

static void intra_apply(Acc* acc, int tile, Regs (&a)[4], Tile& xs, int cols, int warp, bool phi_on, bool lower,
                        Half t) {
  for (int kk = 0; kk < 4; ++kk) {
    if (lower ? !key_tile_needed(true, warp, kk) : !query_tile_needed(true, warp, kk)) continue;
    for (int np = 0; np < tile / 16; ++np) {
      if (16 * np >= cols) break;
      Regs b;
      ldsm(b, xs, Ldsm::kBT, 16 * kk, 16 * np);
      if (phi_on) phi_regs(b, t);
      mma(acc[2 * np], a[kk], b, 0, t);
      mma(acc[2 * np + 1], a[kk], b, 2, t);
    }
  }
}

static void state_apply(Acc* acc, int tile, Tile& as, Tile& xs, int kdim, int cols, int m0, bool phi_on, Ldsm kx,
                        Half t) {
  for (int kt = 0; kt < kdim / 16; ++kt) {
    Regs a;
    ldsm(a, as, Ldsm::kA, m0, 16 * kt);
    if (phi_on) phi_regs(a, t);
    for (int np = 0; np < tile / 16; ++np) {
      if (16 * np >= cols) break;
      Regs b;
      if (kx == Ldsm::kBT)
        ldsm(b, xs, Ldsm::kBT, 16 * kt, 16 * np);
      else
        ldsm(b, xs, Ldsm::kB, 16 * np, 16 * kt);
      mma(acc[2 * np], a, b, 0, t);
      mma(acc[2 * np + 1], a, b, 2, t);
    }
  }
}

template <typename Gate>
static void store_rows(Acc* acc, int tile, std::vector<float>& out, std::vector<int>& writes, int64_t row0,
                       int rows_left, int m0, int cols, const float* add, Gate&& gate, Half t) {
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < 2; ++r) {
      const Pos at = mma_c_pos(lane, 2 * r);
      const int row = m0 + at.row;
      if (row >= rows_left) continue;
      for (int nt = 0; nt < tile / 8; ++nt) {
        if (8 * nt >= cols) break;
        const int col = 8 * nt + at.col;
        float v[2];
        for (int e = 0; e < 2; ++e)
          v[e] = (acc[nt][lane][2 * r + e] + (add != nullptr ? add[col + e] : 0.0f)) * gate(row, col + e);
        const uint32_t w = pack2(v[0], v[1], t);
        for (int e = 0; e < 2; ++e) {
          const size_t i = size_t((row0 + row) * cols + col + e);
          out[i] = reg_half(w, e, t);
          ++writes[i];
        }
      }
    }
}

static Tile state_tile(const float* s, int D, int Dv, Half t) {
  Tile ss(D, smem_ld(Dv));
  for (int d = 0; d < D; ++d)
    for (int c = 0; c < Dv; ++c) ss.at(d, c) = float_to_bits(s[d * Dv + c], t);
  return ss;
}
static int tile_of(int cols) { return cols <= 32 ? 32 : cols <= 64 ? 64 : 128; }

struct Grads {
  std::vector<float> dq, dk, dv;
  std::vector<int> dq_w, dk_w, dv_w;
};

static void backward(const Problem& P, const std::vector<float>& o, const std::vector<float>& den,
                     const std::vector<uint16_t>& go, Grads& out) {
  const int D = P.D, Dv = P.Dv;
  const int64_t rows = int64_t(P.B) * P.H * P.N, chunks = num_chunks(P.N), E = slot_elems(D, Dv);
  const int64_t bhs = int64_t(P.B) * P.H;
  // gden_kernel (fp32) and load_g_chunk's G.
  Grad g;
  g.gden.resize(size_t(rows));
  g.g.resize(size_t(rows * Dv));
  for (int64_t r = 0; r < rows; ++r) {
    float s = 0;
    for (int c = 0; c < Dv; ++c) s += bits_to_float(go[size_t(r * Dv + c)], P.t) * o[size_t(r * Dv + c)];
    g.gden[size_t(r)] = grad_den(s, 1.0f / den[size_t(r)]);
    const float inv_den = 1.0f / den[size_t(r)];
    for (int c = 0; c < Dv; ++c)
      g.g[size_t(r * Dv + c)] = float_to_bits(bits_to_float(go[size_t(r * Dv + c)], P.t) * inv_den, P.t);
  }
  std::vector<float> s_slots(size_t(bhs * chunks * E)), ds_slots(s_slots.size());
  std::vector<float> s_tot(size_t(bhs * D * Dv)), z_tot(size_t(bhs * D)), ds_tot(s_tot.size()), dz_tot(z_tot.size());
  state_pass(P, s_slots, nullptr);
  scan_pass(P, s_slots, s_tot, z_tot, P.causal, false);
  state_pass(P, ds_slots, &g);
  scan_pass(P, ds_slots, ds_tot, dz_tot, P.causal, true);
  const bool intra = P.causal;
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.H; ++h)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t bh = int64_t(b) * P.H + h;
        const int n0 = int(c) * kChunk, rows_left = P.N - n0;
        const int64_t row0 = bh * P.N + n0;
        Tile qs = load_chunk(P, P.q, D, b, h, n0, false), ks = load_chunk(P, P.k, D, b, h, n0, true);
        Tile vs = load_chunk(P, P.v, Dv, b, h, n0, true), gs = load_chunk(P, g.g, Dv, b, h, n0, false);
        float gd[kChunk];
        for (int r = 0; r < kChunk; ++r) gd[r] = n0 + r < P.N ? g.gden[size_t(row0 + r)] : 0.0f;
        const float* s_src = intra ? &s_slots[size_t((bh * chunks + c) * E)] : &s_tot[size_t(bh * D * Dv)];
        const float* z_src = intra ? s_src + D * Dv : &z_tot[size_t(bh * D)];
        const float* ds_src = intra ? &ds_slots[size_t((bh * chunks + c) * E)] : &ds_tot[size_t(bh * D * Dv)];
        const float* dz_src = intra ? ds_src + D * Dv : &dz_tot[size_t(bh * D)];
        Tile ss = state_tile(s_src, D, Dv, P.t), dss = state_tile(ds_src, D, Dv, P.t);
        for (int warp = 0; warp < kWarps; ++warp) {
          const int m0 = 16 * warp;
          {  // chunk_dq_kernel
            const int tile = tile_of(D);
            Acc acc[16] = {};
            if (intra) {
              Regs m[4];
              intra_product(m, gs, vs, Dv, m0, warp, false, true, gd, nullptr, P.t);
              intra_apply(acc, tile, m, ks, D, warp, true, true, P.t);
            }
            state_apply(acc, tile, gs, ss, Dv, D, m0, false, Ldsm::kB, P.t);
            for (int nt = 0; nt < tile / 8; ++nt)
              for (int lane = 0; lane < 32; ++lane)
                for (int e = 0; e < 4; ++e) {
                  const Pos at = mma_c_pos(lane, e);
                  if (8 * nt + at.col < D) acc[nt][lane][e] += gd[m0 + at.row] * z_src[8 * nt + at.col];
                }
            store_rows(
                acc, tile, out.dq, out.dq_w, row0, rows_left, m0, D, nullptr,
                [&](int row, int col) { return phi_grad_from_phi(phi(bits_to_float(qs.at(row, col), P.t))); }, P.t);
          }
          const int tile = tile_of(std::max(D, Dv));
          {  // chunk_dkdv_kernel: dv
            Acc acc[16] = {};
            if (intra) {
              Regs pt[4];
              intra_product(pt, ks, qs, D, m0, warp, true, false, nullptr, nullptr, P.t);
              intra_apply(acc, tile, pt, gs, Dv, warp, false, false, P.t);
            }
            state_apply(acc, tile, ks, dss, D, Dv, m0, true, Ldsm::kBT, P.t);
            store_rows(
                acc, tile, out.dv, out.dv_w, row0, rows_left, m0, Dv, nullptr, [](int, int) { return 1.0f; }, P.t);
          }
          {  // dk
            Acc acc[16] = {};
            if (intra) {
              Regs mt[4];
              intra_product(mt, vs, gs, Dv, m0, warp, false, false, nullptr, gd, P.t);
              intra_apply(acc, tile, mt, qs, D, warp, true, false, P.t);
            }
            state_apply(acc, tile, vs, dss, Dv, D, m0, false, Ldsm::kB, P.t);
            store_rows(
                acc, tile, out.dk, out.dk_w, row0, rows_left, m0, D, dz_src,
                [&](int row, int col) { return phi_grad_from_phi(phi(bits_to_float(ks.at(row, col), P.t))); }, P.t);
          }
        }
      }
}

// float64 reference of the backward from the given o, den (as the kernels take them), with per-row
// scales: the sums of the absolute terms each gradient element adds up.
static void check_backward(const Problem& P, const std::vector<float>& o, const std::vector<float>& den,
                           const std::vector<uint16_t>& go, const Grads& got) {
  const int N = P.N, D = P.D, Dv = P.Dv;
  // The per-row form of the Python tests' bf16 tolerance (tests/test_sla_ops.py grad_scales,
  // assert_close_rows): |got - want| <= 4e-3 scale + 1.6e-2 |want|, scale the row's largest term sum.
  const double atol = 4e-3, rtol = 1.6e-2;
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.H; ++h) {
      const size_t bh = size_t(b) * P.H + h;
      auto val = [&](const std::vector<uint16_t>& x, int cols, int n, int c) {
        return double(bits_to_float(x[(bh * N + n) * cols + c], P.t));
      };
      auto fk = [&](int j, int d) { return P.kept(b, j) ? std::max(val(P.k, D, j, d), 0.0) : 0.0; };
      auto fq = [&](int i, int d) { return std::max(val(P.q, D, i, d), 0.0); };
      auto vv = [&](int j, int c) { return P.kept(b, j) ? val(P.v, Dv, j, c) : 0.0; };
      std::vector<double> g(size_t(N) * Dv), gden(static_cast<size_t>(N)), go_scale(static_cast<size_t>(N));
      for (int i = 0; i < N; ++i) {
        double s = 0, gn = 0, on = 0;
        for (int c = 0; c < Dv; ++c) {
          const double x = val(go, Dv, i, c) / den[bh * N + i], y = o[(bh * N + i) * Dv + c];
          s += val(go, Dv, i, c) * y, gn += x * x, on += y * y;
        }
        gden[size_t(i)] = -s / den[bh * N + i];
        go_scale[size_t(i)] = std::sqrt(gn * on);  // |g_i| |o_i|
        for (int c = 0; c < Dv; ++c) g[size_t(i) * Dv + c] = val(go, Dv, i, c) / den[bh * N + i];
      }
      auto pair = [&](int i, int j) { return !P.causal || j <= i; };
      std::vector<double> dq(size_t(N) * D), dk(dq.size()), dv(size_t(N) * Dv);
      std::vector<double> dq_row(size_t(N), 0.0), dk_row(size_t(N), 0.0), dv_row(size_t(N), 0.0);
      double dv_max = 0;
      std::vector<double> gv_ij(size_t(N) * N), a_ij(size_t(N) * N);  // g_i . v_j + gden_i, phi(q_i) . phi(k_j)
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) {
          double x = gden[size_t(i)], y = 0;
          for (int c = 0; c < Dv; ++c) x += g[size_t(i) * Dv + c] * vv(j, c);
          for (int d = 0; d < D; ++d) y += fq(i, d) * fk(j, d);
          gv_ij[size_t(i) * N + j] = x, a_ij[size_t(i) * N + j] = y;
        }
      for (int i = 0; i < N; ++i) {  // dq_i, and dk_i, dv_i with i as the key
        for (int d = 0; d < D; ++d) {
          double q_sum = 0, q_s = 0, k_sum = 0, k_s = 0;
          for (int j = 0; j < N; ++j) {
            if (pair(i, j)) {  // query i, key j
              const double gv = gv_ij[size_t(i) * N + j];
              q_sum += fk(j, d) * gv;
              q_s += fk(j, d) * (std::abs(gv - gden[size_t(i)]) + go_scale[size_t(i)]);
            }
            if (pair(j, i)) {  // query j, key i
              const double gv = gv_ij[size_t(j) * N + i];
              k_sum += fq(j, d) * gv;
              k_s += fq(j, d) * (std::abs(gv - gden[size_t(j)]) + go_scale[size_t(j)]);
            }
          }
          dq[size_t(i) * D + d] = val(P.q, D, i, d) > 0 ? q_sum : 0.0;
          dk[size_t(i) * D + d] = fk(i, d) > 0 ? k_sum : 0.0;
          dq_row[size_t(i)] = std::max(dq_row[size_t(i)], q_s);
          dk_row[size_t(i)] = std::max(dk_row[size_t(i)], k_s);
        }
        for (int c = 0; c < Dv; ++c) {
          double sum = 0;
          for (int j = 0; j < N; ++j) {
            if (pair(j, i)) sum += a_ij[size_t(j) * N + i] * g[size_t(j) * Dv + c];
          }
          dv[size_t(i) * Dv + c] = sum;
          dv_max = std::max(dv_max, std::abs(sum));
        }
      }
      for (int i = 0; i < N; ++i) {
        for (int d = 0; d < D; ++d) {
          const size_t at = (bh * N + i) * D + d, r = size_t(i) * D + d;
          HOST_CHECK(got.dq_w[at] == 1 && got.dk_w[at] == 1, "dq/dk written %d/%d times", got.dq_w[at], got.dk_w[at]);
          HOST_CHECK(host_test::close(got.dq[at], dq[r], atol * dq_row[size_t(i)] + 1e-30, rtol),
                     "N=%d D=%d Dv=%d causal=%d masked=%d: dq[%d][%d] %g vs %g (row scale %g)", N, D, Dv, P.causal,
                     P.masked, i, d, double(got.dq[at]), dq[r], dq_row[size_t(i)]);
          HOST_CHECK(host_test::close(got.dk[at], dk[r], atol * dk_row[size_t(i)] + 1e-30, rtol),
                     "N=%d D=%d Dv=%d causal=%d masked=%d: dk[%d][%d] %g vs %g (row scale %g)", N, D, Dv, P.causal,
                     P.masked, i, d, double(got.dk[at]), dk[r], dk_row[size_t(i)]);
        }
        for (int c = 0; c < Dv; ++c) {
          const size_t at = (bh * N + i) * Dv + c, r = size_t(i) * Dv + c;
          HOST_CHECK(got.dv_w[at] == 1, "dv written %d times", got.dv_w[at]);
          HOST_CHECK(host_test::close(got.dv[at], dv[r], atol * dv_max + 1e-30, rtol),
                     "N=%d D=%d Dv=%d causal=%d masked=%d: dv[%d][%d] %g vs %g", N, D, Dv, P.causal, P.masked, i, c,
                     double(got.dv[at]), dv[r]);
        }
      }
    }
}

static void run_case(int B, int H, int N, int D, int Dv, bool causal, bool masked, Half t, uint32_t seed,
                     double scale = 1.0) {
  Problem P{B, H, N, D, Dv, causal, masked, t, {}, {}, {}, {}};
  auto make = [&](int cols, uint32_t s) {
    const auto x = host_test::randn(int64_t(B) * H * N * cols, s, scale);
    std::vector<uint16_t> bits(x.size());
    for (size_t i = 0; i < x.size(); ++i) bits[i] = float_to_bits(float(x[i]), t);
    return bits;
  };
  P.q = make(D, seed), P.k = make(D, seed + 1), P.v = make(Dv, seed + 2);
  P.mask.assign(size_t(B) * N, true);
  if (masked) {
    std::mt19937 gen(seed + 3);
    for (int b = 0; b < B; ++b)
      for (int n = 0; n < N; ++n) P.mask[size_t(b) * N + n] = (gen() % 4) != 0 || n == 0;
    for (int b = 0; b < B; ++b)  // masked-out rows hold NaN: they must never be read
      for (int h = 0; h < H; ++h)
        for (int n = 0; n < N; ++n)
          if (!P.kept(b, n)) {
            for (int d = 0; d < D; ++d) P.k[((size_t(b) * H + h) * N + n) * D + d] = 0x7fc0;
            for (int d = 0; d < Dv; ++d) P.v[((size_t(b) * H + h) * N + n) * Dv + d] = 0x7fc0;
          }
  }
  const float eps = 1e-6f;
  Outputs out;
  const int64_t rows = int64_t(B) * H * N;
  out.o.assign(size_t(rows * Dv), NAN), out.den.assign(size_t(rows), NAN);
  out.ws.assign(size_t(int64_t(B) * H * num_chunks(N) * slot_elems(D, Dv)), NAN);
  out.state.assign(size_t(int64_t(B) * H * D * Dv), NAN), out.z.assign(size_t(int64_t(B) * H * D), NAN);
  out.o_writes.assign(out.o.size(), 0), out.den_writes.assign(out.den.size(), 0);
  state_pass(P, out.ws, nullptr);
  scan_pass(P, out.ws, out.state, out.z, causal, false);
  output_pass(P, out, eps);

  // float64 reference on the rounded inputs; o within the Python tests' table (slab.reference.compare
  // TOLERANCES: bf16 rtol 1.6e-2, atol 4e-3, fp16 2e-3, 5e-4, atol times the largest |o|).
  const double rtol = t == Half::kBf16 ? 1.6e-2 : 2e-3, atol = t == Half::kBf16 ? 4e-3 : 5e-4;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const size_t bh = size_t(b) * H + h;
      auto val = [&](const std::vector<uint16_t>& x, int cols, int n, int c) {
        return double(bits_to_float(x[(bh * N + n) * cols + c], t));
      };
      std::vector<double> S(size_t(D) * Dv, 0.0), z(size_t(D), 0.0), want(size_t(N) * Dv);
      auto add_key = [&](int j) {
        if (!P.kept(b, j)) return;
        for (int d = 0; d < D; ++d) {
          const double fk = std::max(val(P.k, D, j, d), 0.0);
          z[size_t(d)] += fk;
          for (int c = 0; c < Dv; ++c) S[size_t(d) * Dv + c] += fk * val(P.v, Dv, j, c);
        }
      };
      if (!causal)
        for (int j = 0; j < N; ++j) add_key(j);
      double omax = 0;
      for (int i = 0; i < N; ++i) {
        if (causal) add_key(i);
        double qz = eps;
        for (int d = 0; d < D; ++d) qz += std::max(val(P.q, D, i, d), 0.0) * z[size_t(d)];
        const size_t row = bh * N + i;
        HOST_CHECK(out.den_writes[row] == 1, "den row %zu written %d times", row, out.den_writes[row]);
        HOST_CHECK(host_test::close(out.den[row], qz, 1e-5 * qz, 1e-4), "N=%d D=%d Dv=%d causal=%d: den[%d] %g vs %g",
                   N, D, Dv, causal, i, double(out.den[row]), qz);
        for (int c = 0; c < Dv; ++c) {
          double num = 0;
          for (int d = 0; d < D; ++d) num += std::max(val(P.q, D, i, d), 0.0) * S[size_t(d) * Dv + c];
          want[size_t(i) * Dv + c] = num / qz;
          omax = std::max(omax, std::abs(num / qz));
        }
      }
      for (int i = 0; i < N; ++i)
        for (int c = 0; c < Dv; ++c) {
          const size_t at = (bh * N + i) * Dv + c;
          HOST_CHECK(out.o_writes[at] == 1, "o written %d times", out.o_writes[at]);
          HOST_CHECK(host_test::close(out.o[at], want[size_t(i) * Dv + c], atol * omax, rtol),
                     "N=%d D=%d Dv=%d causal=%d masked=%d fp16=%d: o[%d][%d] %g vs %g", N, D, Dv, causal, masked,
                     t == Half::kFp16, i, c, double(out.o[at]), want[size_t(i) * Dv + c]);
        }
      double smax = 1e-30;
      for (double x : S) smax = std::max(smax, std::abs(x));
      for (int d = 0; d < D; ++d) {
        HOST_CHECK(host_test::close(out.z[bh * D + d], z[size_t(d)], 1e-5 * N, 1e-5), "z[%d] %g vs %g", d,
                   double(out.z[bh * D + d]), z[size_t(d)]);
        for (int c = 0; c < Dv; ++c)
          HOST_CHECK(host_test::close(out.state[(bh * D + d) * Dv + c], S[size_t(d) * Dv + c], 1e-5 * smax, 1e-5),
                     "state[%d][%d] %g vs %g", d, c, double(out.state[(bh * D + d) * Dv + c]), S[size_t(d) * Dv + c]);
      }
    }
  if (t == Half::kBf16) {  // the tensor-core backward runs for bf16
    std::vector<uint16_t> go(size_t(rows) * size_t(Dv));
    const auto x = host_test::randn(rows * Dv, seed + 9);
    for (size_t i = 0; i < go.size(); ++i) go[i] = float_to_bits(float(x[i]), t);
    Grads g;
    g.dq.assign(size_t(rows * D), NAN), g.dk.assign(g.dq.size(), NAN), g.dv.assign(size_t(rows * Dv), NAN);
    g.dq_w.assign(g.dq.size(), 0), g.dk_w.assign(g.dk.size(), 0), g.dv_w.assign(g.dv.size(), 0);
    backward(P, out.o, out.den, go, g);
    check_backward(P, out.o, out.den, go, g);
  }
}

int main() {
  check_maps();
  uint32_t seed = 11;
  struct Dims {
    int D, Dv;
  };
  for (Dims dims : {Dims{16, 16}, Dims{32, 32}, Dims{64, 64}, Dims{128, 128}, Dims{16, 48}, Dims{64, 32}, Dims{32, 128},
                    Dims{128, 80}})
    for (int N : {1, 5, 63, 64, 65, 130, 200})
      for (bool causal : {true, false}) {
        if (dims.D * dims.Dv >= 8192 && N != 65 && N != 130) continue;  // keep the run short
        run_case(1, 2, N, dims.D, dims.Dv, causal, false, Half::kBf16, seed += 5);
        if (N == 130 || N == 5) {
          run_case(2, 1, N, dims.D, dims.Dv, causal, true, Half::kBf16, seed += 5);
          run_case(1, 1, N, dims.D, dims.Dv, causal, N == 130, Half::kFp16, seed += 5);
        }
      }
  // 16-bit inputs of size ~100: P and S_prev reach ~1e6, past fp16's range (P / den and the
  // state scale keep the operands in it).
  for (bool causal : {true, false}) {
    run_case(1, 1, 200, 64, 32, causal, false, Half::kFp16, seed += 5, 100.0);
    run_case(1, 1, 200, 64, 32, causal, false, Half::kBf16, seed += 5, 100.0);
  }
  HOST_CHECK(state_scale(0.0f) == 1.0f && state_scale(16383.0f) == 1.0f && state_scale(16384.0f) == 2.0f, "scale");
  HOST_CHECK(state_scale(3e6f) == 256.0f && state_scale(NAN) == 1.0f && state_scale(INFINITY) == 1.0f, "scale");
  return host_test::finish();
}
