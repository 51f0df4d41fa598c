// Host simulation of the W4A8 CUDA kernels that no GPU here can run (w4a8_sm90_cuda.cu, the decode
// kernel of w4a8_cuda.cu): the wgmma and mma fragment maps against the PTX ISA tables (transcribed
// here independently of w4a8_math.h), the kSm90 weight layout (a bijection onto the padded codes,
// tile for tile the kTiled bytes), the 128-byte-swizzled shared-memory B operand against the
// hardware's descriptor address rule, and the whole decomposition of both kernels (every CTA,
// warpgroup / warp, lane, stage, k32 step, group fold, epilogue, split and the ordered split
// reduction) run serially on the index functions the kernels use, against a float64 reference.
#include <algorithm>
#include <cstring>
#include <vector>

#include "check.h"
#include "w4a8/w4a8_math.h"

using namespace slab;
using namespace slab::w4a8;

namespace {

// ---- PTX ISA fragment tables --------------------------------------------------------------------
// groupID = lane / 4, threadID_in_group = lane % 4; element i of an 8-bit fragment is byte i % 4
// of register i / 4.

// wgmma .m64nNk32, A in registers (.e4m3): a0..a15 per thread; warp w of the warpgroup owns rows
// 16 w .. 16 w + 15. row: groupID for a0-a3 and a8-a11, groupID + 8 for a4-a7 and a12-a15;
// col: threadID_in_group * 4 + (i & 3), plus 16 for a8-a15.
TilePos isa_wgmma_a(int tid, int i) {
  const int w = tid / 32, gid = (tid % 32) / 4, tig = tid % 4;
  const bool upper = (i >= 4 && i < 8) || i >= 12;
  return {16 * w + gid + (upper ? 8 : 0), tig * 4 + (i & 3) + (i >= 8 ? 16 : 0)};
}
// wgmma .m64nNk32 accumulator D (f32): d0..d(N/2 - 1); row: groupID for i % 4 < 2, groupID + 8
// otherwise (plus 16 w); col: threadID_in_group * 2 + (i & 1) + 8 * (i / 4).
TilePos isa_wgmma_d(int tid, int i) {
  const int w = tid / 32, gid = (tid % 32) / 4, tig = tid % 4;
  return {16 * w + gid + (i % 4 < 2 ? 0 : 8), tig * 2 + (i & 1) + 8 * (i / 4)};
}
// mma.m16n8k32 (.e4m3): A a0..a15 as one warp of the wgmma table; B b0..b7: row (k)
// threadID_in_group * 4 + (i & 3), plus 16 for b4-b7, col (n) groupID; C c0..c3: row groupID
// (+ 8 for c2, c3), col threadID_in_group * 2 + (i & 1).
TilePos isa_mma_a(int lane, int i) { return isa_wgmma_a(lane, i); }
TilePos isa_mma_b(int lane, int i) { return {(lane % 4) * 4 + (i & 3) + (i >= 4 ? 16 : 0), lane / 4}; }
TilePos isa_mma_c(int lane, int i) { return {lane / 4 + (i >= 2 ? 8 : 0), (lane % 4) * 2 + (i & 1)}; }

uint8_t byte_of(uint32_t reg, int j) { return static_cast<uint8_t>(reg >> (8 * j)); }

void check_fragment_tables() {
  std::vector<int> seen(64 * 32, 0);
  for (int tid = 0; tid < 128; ++tid)
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < 4; ++j) {
        const TilePos a = wgmma_a_position(tid, r, j), want = isa_wgmma_a(tid, 4 * r + j);
        HOST_CHECK(a.row == want.row && a.col == want.col, "wgmma A tid %d reg %d byte %d", tid, r, j);
        ++seen[a.row * 32 + a.col];
      }
  for (int c : seen) HOST_CHECK(c == 1, "wgmma A fragment is not a bijection onto 64 x 32");
  for (int n = 8; n <= 256; n *= 2) {
    std::vector<int> hit(64 * n, 0);
    for (int tid = 0; tid < 128; ++tid)
      for (int i = 0; i < n / 2; ++i) {
        const TilePos d = wgmma_d_position(tid, i), want = isa_wgmma_d(tid, i);
        HOST_CHECK(d.row == want.row && d.col == want.col, "wgmma D n%d tid %d reg %d", n, tid, i);
        ++hit[d.row * n + d.col];
      }
    for (int c : hit) HOST_CHECK(c == 1, "wgmma D fragment is not a bijection onto 64 x %d", n);
  }
}

// The lane chunk of a 16 x 64 tile holds exactly its A fragments (mma.m16n8k32 and, per warp,
// wgmma m64nNk32) for two k32 steps, converted exactly to e4m3 by a_fragment_register.
void check_chunk_fragments() {
  std::mt19937 gen(7);
  for (int rep = 0; rep < 4; ++rep) {
    std::vector<uint8_t> src(64 * 64 / 2);  // 64 rows (a warpgroup's four tiles) x 64 columns
    for (auto& b : src) b = static_cast<uint8_t>(gen());
    for (int tid = 0; tid < 128; ++tid) {
      const int w = tid / 32, lane = tid % 32;
      uint32_t chunk[4] = {0, 0, 0, 0};
      for (int b = 0; b < 16; ++b)
        chunk[b / 4] |= static_cast<uint32_t>(tile_chunk_byte(src.data(), 64, 64, 16 * w, 0, lane, b)) << (8 * (b % 4));
      for (int s = 0; s < 2; ++s)
        for (int r = 0; r < 4; ++r) {
          const uint32_t reg = a_fragment_register(chunk, s, r);
          for (int j = 0; j < 4; ++j) {
            const TilePos pa = isa_wgmma_a(tid, 4 * r + j), pm = isa_mma_a(lane, 4 * r + j);
            HOST_CHECK(pm.row + 16 * w == pa.row && pm.col == pa.col, "mma A != wgmma A of warp %d", w);
            const int col = 32 * s + pa.col;
            const int code = int4_value(src[pa.row * 32 + col / 2], col & 1);
            HOST_CHECK(byte_of(reg, j) == float_to_e4m3(static_cast<float>(code)),
                       "tid %d step %d reg %d byte %d holds the wrong element", tid, s, r, j);
          }
        }
    }
  }
}

// ---- the kSm90 layout ---------------------------------------------------------------------------

std::vector<uint8_t> random_packed(int64_t n, int64_t k, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<uint8_t> v(static_cast<size_t>(n * k / 2));
  for (auto& b : v) b = static_cast<uint8_t>(gen());
  return v;
}

int code_at(const std::vector<uint8_t>& src, int64_t n, int64_t k, int64_t r, int64_t c) {
  if (r >= n || c >= k) return 0;
  return int4_value(src[r * (k / 2) + c / 2], c & 1);
}

std::vector<uint8_t> sm90_weights(const std::vector<uint8_t>& src, int64_t n, int64_t k) {
  std::vector<uint8_t> out(static_cast<size_t>(sm90_packed_rows(n) * sm90_packed_row_bytes(k)));
  for (size_t i = 0; i < out.size(); ++i) out[i] = sm90_byte(src.data(), n, k, static_cast<int64_t>(i));
  return out;
}

std::vector<uint8_t> tiled_weights(const std::vector<uint8_t>& src, int64_t n, int64_t k) {
  std::vector<uint8_t> out(static_cast<size_t>(round_up(n, kTileRows) * round_up(k, kTileCols) / 2));
  for (size_t i = 0; i < out.size(); ++i) out[i] = tiled_byte(src.data(), n, k, static_cast<int64_t>(i));
  return out;
}

void check_sm90_layout(int64_t n, int64_t k) {
  const auto src = random_packed(n, k, static_cast<uint32_t>(n * 1000 + k));
  const auto sm90 = sm90_weights(src, n, k);
  const auto tiled = tiled_weights(src, n, k);
  const int64_t rows = sm90_packed_rows(n), cols = 2 * sm90_packed_row_bytes(k);
  HOST_CHECK(rows % kSm90BlockRows == 0 && rows >= n && rows - n < kSm90BlockRows, "rows %lld", (long long)rows);
  HOST_CHECK(cols % kSm90BlockCols == 0 && cols >= k && cols - k < kSm90BlockCols, "cols %lld", (long long)cols);
  std::vector<int> slot(sm90.size() * 2, 0);
  for (int64_t nt = 0; nt < rows / kTileRows; ++nt)
    for (int64_t kt = 0; kt < cols / kTileCols; ++kt) {
      const int64_t base = sm90_tile_offset(nt, kt, k);
      const int64_t block = (nt / 8) * (cols / kSm90BlockCols) + kt / 2;
      HOST_CHECK(base / kSm90BlockBytes == block, "tile (%lld, %lld) outside its 8 KB block", (long long)nt,
                 (long long)kt);
      HOST_CHECK(layout_tile_offset(kSm90, nt, kt, k) == base, "layout_tile_offset(kSm90)");
      for (int lane = 0; lane < 32; ++lane)
        for (int q = 0; q < 32; ++q) {
          const TilePos pos = tile_position(lane, q);
          const int64_t byte = base + 16 * lane + q / 2;
          HOST_CHECK(byte >= 0 && byte < static_cast<int64_t>(sm90.size()), "byte %lld out of range", (long long)byte);
          ++slot[2 * byte + q % 2];
          const int nib = (sm90[byte] >> (4 * (q % 2))) & 15;
          const int want = code_at(src, n, k, nt * kTileRows + pos.row, kt * kTileCols + pos.col) & 15;
          HOST_CHECK(nib == want, "n %lld k %lld tile (%lld, %lld) lane %d nibble %d", (long long)n, (long long)k,
                     (long long)nt, (long long)kt, lane, q);
        }
      if (nt < ceil_div(n, kTileRows) && kt < ceil_div(k, kTileCols)) {
        const int64_t tb = tiled_tile_offset(nt, kt, k);
        HOST_CHECK(layout_tile_offset(kTiled, nt, kt, k) == tb, "layout_tile_offset(kTiled)");
        HOST_CHECK(std::memcmp(&sm90[base], &tiled[tb], kTileBytes) == 0, "tile (%lld, %lld) differs from kTiled",
                   (long long)nt, (long long)kt);
      }
    }
  for (int c : slot) HOST_CHECK(c == 1, "the kSm90 layout is not a bijection onto the padded codes");
}

// ---- shared-memory operand B: the hardware's view through the descriptor ---------------------------
// PTX ISA matrix descriptor: start address bits 0-13 (>> 4), leading byte offset 16-29, stride byte
// offset 32-45 (>> 4), base offset 49-51, swizzle mode 62-63 (1 = 128 B). A K-major operand with the
// 128-byte swizzle: element (row n, byte kk) of the N x 32 operand is at the pattern address
// start + (n / 8) * SBO + (n % 8) * 128 + kk, and the shared memory holds it at that address with
// bits [4, 7) XORed with bits [7, 10) (the 16-byte chunk index with the row in the 8-row atom).
uint32_t hw_b_address(uint64_t desc, int n, int kk) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const uint32_t a = start + static_cast<uint32_t>(n / 8) * sbo + static_cast<uint32_t>(n % 8) * 128 + kk;
  return a ^ (((a >> 7) & 7) << 4);
}

void check_b_operand() {
  for (int tokens = 8; tokens <= 256; tokens *= 2) {
    std::vector<int> hit(tokens * 128, 0);
    for (int r = 0; r < tokens; ++r)
      for (int c = 0; c < 8; ++c) {
        const int off = sm90_x_smem_offset(r, c);
        HOST_CHECK(off % 16 == 0 && off >= 0 && off + 16 <= tokens * 128, "x chunk (%d, %d) at %d", r, c, off);
        for (int b = 0; b < 16; ++b) ++hit[off + b];
      }
    for (int h : hit) HOST_CHECK(h == 1, "stage writes are not a bijection (%d tokens)", tokens);
  }
  for (uint32_t base : {0u, 1024u, 5u * 1024u, 48u * 1024u, 200u * 1024u}) {
    for (int s = 0; s < 4; ++s) {
      const uint64_t desc = sm90_b_descriptor(base, s);
      HOST_CHECK((desc >> 62) == 1, "swizzle mode must be 128 B");
      HOST_CHECK(((desc >> 49) & 7) == 0, "base offset must be 0 (1024-byte aligned atoms)");
      HOST_CHECK(((desc >> 32) & 0x3FFF) << 4 == 1024, "SBO must be one 8-row atom");
      for (int n = 0; n < 256; ++n)
        for (int kk = 0; kk < 32; ++kk) {
          const int col = 32 * s + kk;  // column of the 128-column stage
          const uint32_t want = base + static_cast<uint32_t>(sm90_x_smem_offset(n, col / 16) + col % 16);
          HOST_CHECK(hw_b_address(desc, n, kk) == want, "B (%d, %d) of step %d at base %u", n, kk, s, base);
        }
    }
  }
}

// ---- problems and the float64 reference -----------------------------------------------------------

struct Problem {
  int64_t m, n, k, group;  // group: the kernels' columns per scale (k for a whole row)
  int64_t x_stride;        // the binding pads x rows to a multiple of 64 columns with zeros
  std::vector<uint8_t> x;  // (m, x_stride) e4m3 codes
  std::vector<float> x_scale, w_scales, bias;
  std::vector<uint8_t> packed;  // (n, k / 2)
};

Problem make_problem(int64_t m, int64_t n, int64_t k, int64_t group_size, uint32_t seed) {
  Problem p{m, n, k, group_size < 0 ? k : group_size, round_up(k, kTileCols), {}, {}, {}, {}, {}};
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  p.x.assign(static_cast<size_t>(m * p.x_stride), 0);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < k; ++c) p.x[r * p.x_stride + c] = float_to_e4m3(dist(gen) * 100.0f);
  for (int64_t r = 0; r < m; ++r) p.x_scale.push_back(0.01f + std::abs(dist(gen)) * 0.1f);
  for (int64_t i = 0; i < n * (k / p.group); ++i) p.w_scales.push_back(0.02f + std::abs(dist(gen)) * 0.05f);
  for (int64_t i = 0; i < n; ++i) p.bias.push_back(dist(gen));
  p.packed = random_packed(n, k, seed + 1);
  return p;
}

double xval(const Problem& p, int64_t m, int64_t c) { return e4m3_to_float(p.x[m * p.x_stride + c]); }

// y and sum |terms| (the scale of the fp32 rounding error) in float64.
void reference(const Problem& p, std::vector<double>& y, std::vector<double>& mag) {
  y.assign(static_cast<size_t>(p.m * p.n), 0.0);
  mag.assign(y.size(), 0.0);
  const int64_t groups = p.k / p.group;
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t n = 0; n < p.n; ++n) {
      double total = 0.0, abs_total = 0.0;
      for (int64_t g = 0; g < groups; ++g) {
        double s = 0.0, a = 0.0;
        for (int64_t c = g * p.group; c < (g + 1) * p.group; ++c) {
          const double t = xval(p, m, c) * code_at(p.packed, p.n, p.k, n, c);
          s += t, a += std::abs(t);
        }
        total += p.w_scales[n * groups + g] * s, abs_total += p.w_scales[n * groups + g] * a;
      }
      y[m * p.n + n] = p.x_scale[m] * total + p.bias[m * 0 + n];
      mag[m * p.n + n] = p.x_scale[m] * abs_total + std::abs(p.bias[n]);
    }
}

// The ordered split reduction (reduce_kernel) or the direct epilogue's output.
std::vector<float> finish_output(const Problem& p, const std::vector<float>& parts, int64_t splits) {
  std::vector<float> y(static_cast<size_t>(p.m * p.n));
  for (int64_t i = 0; i < p.m * p.n; ++i) {
    float s = 0.0f;
    for (int64_t z = 0; z < splits; ++z) s += parts[z * p.m * p.n + i];
    y[i] = p.x_scale[i / p.n] * s + p.bias[i % p.n];
  }
  return y;
}

void compare(const Problem& p, const std::vector<float>& got, const char* what, int64_t splits) {
  std::vector<double> want, mag;
  reference(p, want, mag);
  for (int64_t i = 0; i < p.m * p.n; ++i)
    HOST_CHECK(host_test::close(got[i], want[i], 1e-30, 0.0) || std::abs(got[i] - want[i]) <= 4e-6 * mag[i] + 1e-6,
               "%s m %lld n %lld k %lld group %lld splits %lld: y[%lld, %lld] = %.9g, want %.9g", what, (long long)p.m,
               (long long)p.n, (long long)p.k, (long long)p.group, (long long)splits, (long long)(i / p.n),
               (long long)(i % p.n), got[i], want[i]);
}

// ---- the sm_90a kernel, serially ----------------------------------------------------------------

constexpr int kSm90Stages = 4;  // as w4a8_sm90_cuda.cu (the emulation does not depend on the depth)
constexpr int kSm90Warps = 8;

int sm90_tokens_per_block(int64_t m) { return m <= 32 ? 32 : (m <= 64 ? 64 : 128); }

// One CTA (bx, by, bz) of gemm_sm90_kernel<NT>: its partial sums (or, with one split, y itself via
// finish_output) written into parts.
void sm90_cta(const Problem& p, const std::vector<uint8_t>& w, int nt_tokens, int64_t tiles_per_split, int64_t bx,
              int64_t by, int64_t bz, std::vector<float>& parts) {
  const int64_t kb_count = ceil_div(p.k, kSm90BlockCols), kp = round_up(p.k, kTileCols);
  const int64_t groups = p.k / p.group, m0 = by * nt_tokens;
  const BlockRange blocks = sm90_split_blocks(bz, tiles_per_split, p.k);
  const int64_t kb0 = blocks.begin, kb1 = blocks.end;
  const int64_t st_end = std::min<int64_t>(kb1 * 4, ceil_div(p.k, 32));
  const int nd = nt_tokens / 2;
  std::vector<float> acc(256 * nd, 0.0f), gacc(256 * nd, 0.0f);
  bool group_start = true;
  int64_t unfolded = 0;  // k32 steps summed inside the tensor cores since the last fold
  std::vector<uint8_t> ws(kSm90BlockBytes), xs(nt_tokens * 128);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    // the stage's copies: weights by owner thread, activations zero-filled past m and kp
    std::fill(ws.begin(), ws.end(), 0xEE);  // poison: every byte must be copied
    for (int tid = 0; tid < 256; ++tid)
      for (int h = 0; h < 2; ++h) {
        const int off = (2 * (tid / 32) + h) * static_cast<int>(kTileBytes) + 16 * (tid % 32);
        std::memcpy(&ws[off], &w[(bx * kb_count + kb) * kSm90BlockBytes + off], 16);
      }
    std::fill(xs.begin(), xs.end(), 0x7F);  // NaN poison
    for (int c = 0; c < nt_tokens * 8; ++c) {
      const int r = c / 8, chunk = c % 8;
      const int64_t col = kb * kSm90BlockCols + 16 * chunk;
      const bool valid = m0 + r < p.m && col < kp;
      for (int b = 0; b < 16; ++b)
        xs[sm90_x_smem_offset(r, chunk) + b] = valid ? p.x[(m0 + r) * p.x_stride + col + b] : 0;
    }
    for (int s = 0; s < 4; ++s) {
      const int64_t st = kb * 4 + s;
      if (st >= st_end) break;
      const uint64_t desc = sm90_b_descriptor(0, s);  // the stage at shared address 0 of this model
      for (int wg = 0; wg < 2; ++wg) {
        // A (64 x 32) as the 128 threads' registers hold it; B (NT x 32) as the descriptor reads it.
        std::vector<uint8_t> a(64 * 32), b(nt_tokens * 32);
        for (int t = 0; t < 128; ++t) {
          const int tid = 128 * wg + t, warp = tid / 32, lane = tid % 32;
          uint32_t chunk[4];
          std::memcpy(chunk, &ws[(2 * warp + s / 2) * kTileBytes + 16 * lane], 16);
          for (int r = 0; r < 4; ++r) {
            const uint32_t reg = a_fragment_register(chunk, s % 2, r);
            for (int j = 0; j < 4; ++j) {
              const TilePos pos = wgmma_a_position(t, r, j);
              a[pos.row * 32 + pos.col] = byte_of(reg, j);
            }
          }
        }
        for (int n = 0; n < nt_tokens; ++n)
          for (int kk = 0; kk < 32; ++kk) b[n * 32 + kk] = xs[hw_b_address(desc, n, kk)];
        for (int t = 0; t < 128; ++t)
          for (int i = 0; i < nd; ++i) {
            const TilePos d = wgmma_d_position(t, i);
            double v = 0.0;
            for (int kk = 0; kk < 32; ++kk)
              v += static_cast<double>(e4m3_to_float(a[d.row * 32 + kk])) * e4m3_to_float(b[d.col * 32 + kk]);
            float& g = gacc[(128 * wg + t) * nd + i];
            g = group_start ? static_cast<float>(v) : static_cast<float>(g + v);
          }
      }
      const Fold f = fold_after_step(st, st_end, p.group, p.k);
      group_start = f.fold;
      ++unfolded;
      HOST_CHECK(unfolded <= kFoldSteps, "a group sum runs over more than 128 columns in the tensor cores");
      if (!f.fold) continue;
      unfolded = 0;
      HOST_CHECK(f.group_index >= 0 && f.group_index < groups, "fold with group %lld", (long long)f.group_index);
      for (int tid = 0; tid < 256; ++tid) {
        const int64_t n_lo = bx * kSm90BlockRows + 16 * (tid / 32) + (tid % 32) / 4, n_hi = n_lo + 8;
        const float s_lo = n_lo < p.n ? p.w_scales[n_lo * groups + f.group_index] : 0.0f;
        const float s_hi = n_hi < p.n ? p.w_scales[n_hi * groups + f.group_index] : 0.0f;
        for (int i = 0; i < nd; ++i)
          acc[tid * nd + i] = std::fma(gacc[tid * nd + i], (i & 2) ? s_hi : s_lo, acc[tid * nd + i]);
      }
    }
  }
  // The epilogue: D fragments staged in shared memory (each slot once, a warp's writes on 32
  // distinct banks), then read back row by row.
  std::vector<float> out(static_cast<size_t>(nt_tokens * kSm90OutRow), std::nanf(""));
  std::vector<int> written(out.size(), 0);
  for (int tid = 0; tid < 256; ++tid)
    for (int i = 0; i < nd; ++i) {
      const TilePos d = wgmma_d_position(tid % 128, i);
      HOST_CHECK(64 * (tid / 128) + d.row == 16 * (tid / 32) + (tid % 32) / 4 + 8 * ((i >> 1) & 1),
                 "D row of thread %d is not its scale row", tid);
      const int off = sm90_out_smem_offset(d.col, 64 * (tid / 128) + d.row);
      ++written[off];
      out[off] = acc[tid * nd + i];
    }
  for (int warp = 0; warp < 8; ++warp)
    for (int i = 0; i < nd; ++i) {
      std::vector<int> bank(32, 0);
      for (int lane = 0; lane < 32; ++lane) {
        const int tid = 32 * warp + lane;
        const TilePos d = wgmma_d_position(tid % 128, i);
        ++bank[sm90_out_smem_offset(d.col, 64 * (tid / 128) + d.row) % 32];
      }
      for (int c : bank) HOST_CHECK(c == 1, "bank conflict in the epilogue staging (register %d)", i);
    }
  for (int ml = 0; ml < nt_tokens; ++ml)
    for (int nl = 0; nl < kSm90BlockRows; ++nl) {
      HOST_CHECK(written[sm90_out_smem_offset(ml, nl)] == 1, "output slot (%d, %d) written %d times", ml, nl,
                 written[sm90_out_smem_offset(ml, nl)]);
      const int64_t m = m0 + ml, n = bx * kSm90BlockRows + nl;
      if (m < p.m && n < p.n) parts[bz * p.m * p.n + m * p.n + n] = out[sm90_out_smem_offset(ml, nl)];
    }
}

// `tiled_plan`: split as the kTiled kernel would (64-column tiles, possibly an odd count per split).
void check_sm90_gemm(int64_t m, int64_t n, int64_t k, int64_t group_size, int64_t wave, bool tiled_plan = false) {
  const Problem p = make_problem(m, n, k, group_size, static_cast<uint32_t>(m * 7 + n * 3 + k));
  const auto w = sm90_weights(p.packed, n, k);
  const int nt = sm90_tokens_per_block(m);
  const int64_t ctas = ceil_div(n, kSm90BlockRows) * ceil_div(m, nt);
  SplitPlan sp = split_to_fill(ctas, ceil_div(k, kSm90BlockCols), wave);
  int64_t tiles_per_split = 2 * sp.per;
  if (tiled_plan) {
    sp = split_to_fill(ctas, ceil_div(k, kTileCols), wave);
    tiles_per_split = sp.per;
  }
  std::vector<int> covered(static_cast<size_t>(ceil_div(k, kSm90BlockCols)), 0);
  for (int64_t z = 0; z < sp.splits; ++z) {
    const BlockRange b = sm90_split_blocks(z, tiles_per_split, k);
    for (int64_t kb = b.begin; kb < b.end; ++kb) ++covered[kb];
  }
  for (int c : covered) HOST_CHECK(c == 1, "a 128-column block is not in exactly one split");
  std::vector<float> parts(static_cast<size_t>(sp.splits * m * n), std::nanf(""));
  for (int64_t bz = 0; bz < sp.splits; ++bz)
    for (int64_t by = 0; by < ceil_div(m, nt); ++by)
      for (int64_t bx = 0; bx < ceil_div(n, kSm90BlockRows); ++bx)
        sm90_cta(p, w, nt, tiles_per_split, bx, by, bz, parts);
  compare(p, finish_output(p, parts, sp.splits), "sm90", sp.splits);
}

// ---- the decode kernel, serially ------------------------------------------------------------------

void decode_cta(const Problem& p, const std::vector<uint8_t>& w, int layout, int64_t tiles_per_split, int64_t bx,
                int64_t bz, std::vector<float>& parts) {
  const int mt = p.m <= 8 ? 1 : 2;
  const int64_t k_tiles = ceil_div(p.k, kTileCols), row_tiles = ceil_div(p.n, kTileRows), groups = p.k / p.group;
  const int64_t kt0 = bz * tiles_per_split, kt1 = std::min<int64_t>(k_tiles, kt0 + tiles_per_split);
  const int64_t st_end = std::min<int64_t>(2 * kt1, ceil_div(p.k, 32)), stages = ceil_div(kt1 - kt0, kDecodeTiles);
  std::vector<uint8_t> ws(kDecodeWarps * kDecodeTiles * kTileBytes), xs(8 * mt * kDecodeXRow);
  std::vector<float> acc(kDecodeWarps * 32 * mt * 4, 0.0f), gacc(acc.size(), 0.0f);
  for (int64_t j = 0; j < stages; ++j) {
    std::fill(ws.begin(), ws.end(), 0xEE);
    std::fill(xs.begin(), xs.end(), 0x7F);  // NaN poison: rows past m are never read
    for (int warp = 0; warp < kDecodeWarps; ++warp)
      for (int h = 0; h < kDecodeTiles; ++h) {
        const int64_t rt = bx * kDecodeWarps + warp, kt = kt0 + kDecodeTiles * j + h;
        if (rt >= row_tiles || kt >= kt1) continue;
        for (int lane = 0; lane < 32; ++lane)
          std::memcpy(&ws[decode_w_smem_offset(warp, h, lane)], &w[layout_tile_offset(layout, rt, kt, p.k) + 16 * lane],
                      16);
      }
    const int64_t col0 = (kt0 + kDecodeTiles * j) * kTileCols;
    for (int c = 0; c < 8 * mt * 8; ++c) {
      const int r = c / 8, chunk = c % 8;
      if (r < p.m && col0 + 16 * chunk < kt1 * kTileCols)
        std::memcpy(&xs[decode_x_smem_offset(r, 16 * chunk)], &p.x[r * p.x_stride + col0 + 16 * chunk], 16);
    }
    for (int warp = 0; warp < kDecodeWarps; ++warp) {
      const int64_t rt = bx * kDecodeWarps + warp;
      if (rt >= row_tiles) continue;
      for (int h = 0; h < kDecodeTiles; ++h) {
        const int64_t kt = kt0 + kDecodeTiles * j + h;
        if (kt >= kt1) break;
        for (int s = 0; s < 2; ++s) {
          const int64_t st = 2 * kt + s;
          if (st >= st_end) break;
          for (int jn = 0; jn < mt; ++jn) {
            // A (16 x 32) and B (32 x 8) as the lanes' registers hold them, then D += A B per lane.
            uint8_t a[16][32], b[32][8];
            for (int lane = 0; lane < 32; ++lane) {
              uint32_t chunk[4];
              std::memcpy(chunk, &ws[decode_w_smem_offset(warp, h, lane)], 16);
              const int row = 8 * jn + lane / 4;
              uint32_t breg[2] = {0, 0};
              for (int q = 0; q < 2; ++q)
                if (row < p.m)
                  std::memcpy(&breg[q],
                              &xs[decode_x_smem_offset(row, kTileCols * h + 32 * s + 4 * (lane % 4) + 16 * q)], 4);
              for (int r = 0; r < 4; ++r)
                for (int jj = 0; jj < 4; ++jj) {
                  const TilePos pa = isa_mma_a(lane, 4 * r + jj);
                  a[pa.row][pa.col] = byte_of(a_fragment_register(chunk, s, r), jj);
                }
              for (int i = 0; i < 8; ++i) {
                const TilePos pb = isa_mma_b(lane, i);
                b[pb.row][pb.col] = byte_of(breg[i / 4], i % 4);
              }
            }
            for (int lane = 0; lane < 32; ++lane)
              for (int i = 0; i < 4; ++i) {
                const TilePos pc = isa_mma_c(lane, i);
                double v = 0.0;
                for (int kk = 0; kk < 32; ++kk)
                  v += static_cast<double>(e4m3_to_float(a[pc.row][kk])) * e4m3_to_float(b[kk][pc.col]);
                float& g = gacc[((warp * 32 + lane) * mt + jn) * 4 + i];
                g = static_cast<float>(g + v);
              }
          }
          const Fold f = fold_after_step(st, st_end, p.group, p.k);
          if (!f.fold) continue;
          for (int lane = 0; lane < 32; ++lane) {
            const int64_t n_lo = rt * kTileRows + lane / 4, n_hi = n_lo + 8;
            for (int jn = 0; jn < mt; ++jn)
              for (int c = 0; c < 4; ++c) {
                float& g = gacc[((warp * 32 + lane) * mt + jn) * 4 + c];
                if (f.group_index >= 0) {
                  const int64_t nn = c < 2 ? n_lo : n_hi;
                  const float sc = nn < p.n ? p.w_scales[nn * groups + f.group_index] : 0.0f;
                  float& t = acc[((warp * 32 + lane) * mt + jn) * 4 + c];
                  t = std::fma(g, sc, t);
                }
                g = 0.0f;
              }
          }
        }
      }
    }
  }
  for (int warp = 0; warp < kDecodeWarps; ++warp) {
    const int64_t rt = bx * kDecodeWarps + warp;
    if (rt >= row_tiles) continue;
    for (int lane = 0; lane < 32; ++lane)
      for (int jn = 0; jn < mt; ++jn)
        for (int c = 0; c < 4; ++c) {
          const int64_t m = 8 * jn + 2 * (lane % 4) + (c & 1), n = rt * kTileRows + lane / 4 + (c < 2 ? 0 : 8);
          const TilePos pc = isa_mma_c(lane, c);
          HOST_CHECK(8 * jn + pc.col == m && rt * kTileRows + pc.row == n, "decode epilogue map");
          if (m >= p.m || n >= p.n) continue;
          parts[bz * p.m * p.n + m * p.n + n] = acc[((warp * 32 + lane) * mt + jn) * 4 + c];
        }
  }
}

void check_decode(int64_t m, int64_t n, int64_t k, int64_t group_size, int64_t wave) {
  const Problem p = make_problem(m, n, k, group_size, static_cast<uint32_t>(m * 11 + n * 5 + k));
  for (int layout : {static_cast<int>(kTiled), static_cast<int>(kSm90)}) {
    const auto w = layout == kSm90 ? sm90_weights(p.packed, n, k) : tiled_weights(p.packed, n, k);
    const int64_t ctas = ceil_div(ceil_div(n, kTileRows), kDecodeWarps);
    const SplitPlan sp = split_to_fill(ctas, ceil_div(k, kTileCols), wave);
    std::vector<float> parts(static_cast<size_t>(sp.splits * m * n), std::nanf(""));
    for (int64_t bz = 0; bz < sp.splits; ++bz)
      for (int64_t bx = 0; bx < ctas; ++bx) decode_cta(p, w, layout, sp.per, bx, bz, parts);
    compare(p, finish_output(p, parts, sp.splits), layout == kSm90 ? "decode/sm90" : "decode/tiled", sp.splits);
  }
}

// ---- the split rule ------------------------------------------------------------------------------

void check_split_rule() {
  for (int64_t ctas = 1; ctas <= 300; ctas += 7)
    for (int64_t units = 1; units <= 200; units += 3)
      for (int64_t wave : {1, 16, 132, 264, 1056}) {
        const SplitPlan sp = split_to_fill(ctas, units, wave);
        HOST_CHECK(sp.splits >= 1 && sp.per >= 1 && sp.splits <= units, "splits %lld", (long long)sp.splits);
        HOST_CHECK(sp.splits * sp.per >= units && (sp.splits - 1) * sp.per < units, "a split is empty or k uncovered");
        if (ctas >= wave) HOST_CHECK(sp.splits == 1, "a full grid needs no split");
        if (ctas < wave)
          HOST_CHECK(ctas * sp.splits <= wave, "more than one wave: %lld x %lld > %lld", (long long)ctas,
                     (long long)sp.splits, (long long)wave);
      }
  // The anchors (M = 1, H100/H200: 132 SMs; the decode CTA's 21 KB of static shared memory and
  // 128 threads allow about 8 CTAs per SM): one wave, every split non-empty.
  const int64_t wave = 132 * 8;
  for (auto [n, k] : {std::pair<int64_t, int64_t>{4096, 4096}, {28672, 8192}}) {
    const int64_t ctas = ceil_div(ceil_div(n, kTileRows), kDecodeWarps);
    const SplitPlan sp = split_to_fill(ctas, ceil_div(k, kTileCols), wave);
    std::printf("decode plan %lld x %lld: %lld CTAs x %lld splits of %lld tiles (wave %lld)\n", (long long)n,
                (long long)k, (long long)ctas, (long long)sp.splits, (long long)sp.per, (long long)wave);
    HOST_CHECK(ctas * sp.splits <= wave, "the anchor plan exceeds one wave");
  }
}

}  // namespace

int main() {
  check_fragment_tables();
  check_chunk_fragments();
  for (auto [n, k] : {std::pair<int64_t, int64_t>{1, 2},
                      {5, 38},
                      {16, 64},
                      {127, 130},
                      {128, 128},
                      {129, 256},
                      {200, 384},
                      {64, 96},
                      {300, 200}})
    check_sm90_layout(n, k);
  check_b_operand();
  check_split_rule();
  // sm90 (M > 16): tails in M (token blocks of 32 / 64 / 128), N (row blocks of 128), K (128-column
  // stages, partial k32 steps), every group size; wave 1: no split, wave 64: split-K.
  for (int64_t wave : {1, 64}) {
    check_sm90_gemm(17, 130, 256, 128, wave);
    check_sm90_gemm(33, 64, 384, 64, wave);
    check_sm90_gemm(70, 200, 96, 32, wave);
    check_sm90_gemm(130, 129, 200, -1, wave);
    check_sm90_gemm(40, 129, 512, 128, wave);
    check_sm90_gemm(65, 257, 130, -1, wave);
  }
  check_sm90_gemm(40, 129, 640, 128, 64, true);   // 10 tiles over 5 splits of 2
  check_sm90_gemm(20, 100, 448, 64, 1000, true);  // 7 splits of one tile: every other split empty
  // decode (M <= 16), both layouts.
  for (int64_t wave : {1, 40, 1000}) {
    check_decode(1, 64, 256, 128, wave);
    check_decode(3, 50, 130, -1, wave);
    check_decode(8, 130, 384, 64, wave);
    check_decode(9, 33, 96, 32, wave);
    check_decode(16, 200, 512, -1, wave);
    check_decode(16, 17, 200, -1, wave);
  }
  return host_test::finish();
}
