// W4A8 CUDA kernels (compiled for sm_80, sm_89, sm_90a).
//   quantize_fp8_kernel: one block per row; the row is held in registers (up to 2048 values, the
//     rest re-read) between the block absmax and the e4m3 encode (w4a8_math.h); 16-byte loads.
//   tile_kernel: row-major packed codes -> the kTiled layout (w4a8.h), one thread per byte.
//   gemm_kernel<MT>: weights are the mma A operand (16 weight rows per warp), activations the B
//     operand (8 tokens per mma, MT mma tiles = 8 MT tokens per block). Per 64-column k tile each
//     lane issues ONE 16-byte load of its weight tile chunk, which holds exactly its A-fragment
//     nibbles for two k32 steps; int4x4_to_e4m3x4 turns 4 nibbles into one fragment register
//     with three byte permutes. The block's activation tile (8 MT rows x 64 bytes) is staged in
//     shared memory with 16-byte loads and shared by its 4 warps.
//       sm_89 / sm_90a: mma.sync.m16n8k32 e4m3 x e4m3 -> f32.
//       sm_80 (no fp8 tensor cores): the same fragments converted exactly to f16 (int4 via the
//       1024 + n magic, e4m3 via cvt) and mma.sync.m16n8k16 f16 -> f32, the k pairs of each lane
//       taken from the columns it holds (a consistent reordering of k for A and B).
//     Group sums live in their own fp32 accumulators and are scaled into the total at each group
//     boundary (and at the end of a split), exactly the order of operations of the formula in docs/w4a8.md.
//   Paths: M <= 64 ("small M", memory bound): MT = 1, 2, 4 or 8 for M <= 8, 16, 32, 64, and the
//     k range is split over gridDim.z so that every SM holds as many blocks as its occupancy
//     allows (many weight loads in flight); partial sums go to a workspace that reduce_kernel sums
//     in split order (deterministic).
//     M > 64 ("large M"): MT = 8, 64-token tiles over gridDim.y, splits only while the grid does
//     not fill the GPU; without splits the kernel writes y (x_scale, bias, output cast) itself.
//     Same kernel; no wgmma / TMA path. NOTE: ptxas lowers the e4m3 mma.sync to f16 HMMA on
//     sm_90a (Hopper runs FP8 at full rate only through wgmma), so sm_90a gets f16 tensor-core
//     throughput; sm_89 gets the native QMMA.
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>

#include "core/cuda_types.cuh"
#include "core/vec_cuda.cuh"
#include "w4a8/w4a8.h"
#include "w4a8/w4a8_async.cuh"
#include "w4a8/w4a8_math.h"

namespace slab::w4a8 {
namespace {

constexpr int kQuantThreads = 256;
constexpr int kQuantPerThread = 8;
constexpr int kWarps = 4;  // weight row tiles (16 rows each) per block
constexpr int kThreads = 32 * kWarps;
constexpr int kXRowBytes = kTileCols + 16;  // staged activation row: 64 bytes + 16 of padding
                                            // (conflict-free fragment reads, 16-byte aligned)

// ---- quantize_fp8 --------------------------------------------------------------------------------

__device__ __forceinline__ float block_absmax(float m, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = absmax_update(m, __shfl_xor_sync(0xffffffffu, m, off));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read for the previous row
  if (lane == 0) scratch[warp] = m;
  __syncthreads();
  float r = 0.0f;
  for (int w = 0; w < kQuantThreads / 32; ++w) r = absmax_update(r, scratch[w]);
  return r;
}

// W elements per access: 16-byte packs of x and W-byte stores of the codes when the rows allow
// (quant_packed), else single elements. The first kQuantPerThread elements per thread stay in
// registers between the absmax and the encode; longer rows re-read the rest.
template <typename T, int W>
__global__ void __launch_bounds__(kQuantThreads) quantize_fp8_kernel(QuantFp8Params p) {
  constexpr int kPacks = kQuantPerThread / W > 0 ? kQuantPerThread / W : 1;
  __shared__ float scratch[kQuantThreads / 32];
  const T* x = static_cast<const T*>(p.x);
  const auto index = [](int j) { return (threadIdx.x + static_cast<int64_t>(j) * kQuantThreads) * W; };
  const auto encode = [](uint8_t* dst, const float (&v)[W], float scale) {
    Pack<uint8_t, W> codes;
#pragma unroll
    for (int i = 0; i < W; ++i) codes.v[i] = float_to_e4m3(v[i] / scale);
    write_pack<W>(dst, codes);
  };
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xr = x + row * p.cols;
    uint8_t* qr = p.q + row * p.q_stride;
    float v[kPacks][W];
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
#pragma unroll
      for (int i = 0; i < W; ++i) v[j][i] = 0.0f;
      if (index(j) < p.cols) load_acc<W, Cache::kStream>(xr + index(j), v[j]);
#pragma unroll
      for (int i = 0; i < W; ++i) m = absmax_update(m, v[j][i]);
    }
    for (int64_t i0 = index(kPacks); i0 < p.cols; i0 += kQuantThreads * W) {
      float t[W];
      load_acc<W>(xr + i0, t);
#pragma unroll
      for (int i = 0; i < W; ++i) m = absmax_update(m, t[i]);
    }
    const float scale = fp8_row_scale(block_absmax(m, scratch));
#pragma unroll
    for (int j = 0; j < kPacks; ++j)
      if (index(j) < p.cols) encode(qr + index(j), v[j], scale);
    for (int64_t i0 = index(kPacks); i0 < p.cols; i0 += kQuantThreads * W) {
      float t[W];
      load_acc<W>(xr + i0, t);
      encode(qr + i0, t, scale);
    }
    if (threadIdx.x == 0) p.scale[row] = scale;
  }
}

// ---- int4 -> e4m3 (test hook) ----------------------------------------------------------------------

__global__ void int4_to_e4m3_kernel(const uint16_t* in, int64_t words, uint32_t* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = int4x4_to_e4m3x4(in[i]);
}

// ---- weight tiles --------------------------------------------------------------------------------

__global__ void tile_kernel(const uint8_t* src, int64_t n, int64_t k, uint8_t* dst, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = tiled_byte(src, n, k, i);
}

// ---- mma ----------------------------------------------------------------------------------------

// One k32 step of one 16 x 8 output tile: d += A (4 e4m3x4 registers) * B (2 e4m3x4 registers).
[[maybe_unused]] __device__ __forceinline__ void mma_k32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  (void)d, (void)a, (void)b0, (void)b1;
#endif
}

[[maybe_unused]] __device__ __forceinline__ void mma_f16_k16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                             uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  (void)d, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
#endif
}

// Two int4 nibbles (bits 0-3 and 4-7 of `pair`) -> f16x2, exactly: 0x6400 | (n ^ 8) is the f16
// 1024 + (v + 8), minus 1032 leaves v.
[[maybe_unused]] __device__ __forceinline__ uint32_t int4x2_to_f16x2(uint32_t pair) {
  const uint32_t u = (pair & 0x0Fu) | ((pair & 0xF0u) << 12);
  const uint32_t h = (u ^ 0x00080008u) | 0x64006400u;
  const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&h), __float2half2_rn(1032.0f));
  return *reinterpret_cast<const uint32_t*>(&r);
}

[[maybe_unused]] __device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t two) {
  const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two & 0xFFFFu), __NV_E4M3);
  return static_cast<uint32_t>(r.x) | (static_cast<uint32_t>(r.y) << 16);
}

// One k32 step on sm_80: the fp8 fragments of mma_k32, as two f16 m16n8k16 mmas. Register
// pairs: (cols 4t, 4t+1) and (cols 4t+2, 4t+3) of the lane's A rows g / g + 8 and of its B column,
// for the first (words w_lo = rows g / g+8 at cols 4t..) and second half (cols + 16).
[[maybe_unused]] __device__ __forceinline__ void mma_k32_f16(float (&d)[4], uint32_t w_lo, uint32_t w_hi, uint32_t b0,
                                                             uint32_t b1) {
  // w_lo: nibbles 0-3 = row g, cols 4t..4t+3; nibbles 4-7 = row g + 8. w_hi: the same at cols + 16.
  mma_f16_k16(d, int4x2_to_f16x2(w_lo), int4x2_to_f16x2(w_lo >> 16), int4x2_to_f16x2(w_lo >> 8),
              int4x2_to_f16x2(w_lo >> 24), e4m3x2_to_f16x2(b0), e4m3x2_to_f16x2(b0 >> 16));
  mma_f16_k16(d, int4x2_to_f16x2(w_hi), int4x2_to_f16x2(w_hi >> 16), int4x2_to_f16x2(w_hi >> 8),
              int4x2_to_f16x2(w_hi >> 24), e4m3x2_to_f16x2(b1), e4m3x2_to_f16x2(b1 >> 16));
}

// ---- GEMM ----------------------------------------------------------------------------------------

int sm_count() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return std::max(sms, 1);
}

// mma.sync kernel (M > kDecodeMaxRows): 32 or 64 tokens per block.
int tokens_per_block(int64_t m) { return m <= 32 ? 32 : 64; }

template <int MT, typename O>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmParams p);

// Splits of the k range: enough blocks to fill every SM to its occupancy limit (a memory-bound
// decode GEMM needs many loads in flight), each split at least one 64-column tile, none empty.
template <int MT>
GemmPlan plan_for(int64_t m, int64_t n, int64_t k) {
  const int64_t k_tiles = ceil_div(k, kTileCols);
  const int64_t blocks = ceil_div(round_up(n, kTileRows), kTileRows * kWarps) * ceil_div(m, 8 * MT);
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemm_kernel<MT, float>, kThreads, 0);
  if (err != cudaSuccess) return {0, 0, static_cast<int>(err)};
  const int64_t target = static_cast<int64_t>(std::max(per_sm, 1)) * sm_count();
  int64_t splits = blocks >= target ? 1 : std::min<int64_t>(k_tiles, ceil_div(target, blocks));
  const int64_t per = ceil_div(k_tiles, splits);
  splits = ceil_div(k_tiles, per);
  return {static_cast<int>(splits), static_cast<int>(per), 0};
}

template <int MT, typename O>
__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmParams p) {
  constexpr int kTokens = 8 * MT;
  __shared__ __align__(16) uint8_t xs[kTokens * kXRowBytes];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t k_tiles = ceil_div(p.k, kTileCols);
  const int64_t row_tiles = ceil_div(p.n, kTileRows);
  const int64_t groups = p.k / p.group;                                 // scales per weight row
  const int64_t rt = static_cast<int64_t>(blockIdx.x) * kWarps + warp;  // this warp's row tile
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int64_t kt0 = static_cast<int64_t>(blockIdx.z) * p.tiles_per_split;
  const int64_t kt1 = std::min<int64_t>(k_tiles, kt0 + p.tiles_per_split);
  const bool active = rt < row_tiles;
  const int64_t n_lo = rt * kTileRows + g, n_hi = n_lo + 8;

  float acc[MT][4], gacc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = gacc[j][c] = 0.0f;

  // Each lane's 16-byte chunk of its warp's tile kt; the next tile's chunk is loaded before the
  // current one is used, so two loads per lane are in flight.
  const uint4* wtiles = reinterpret_cast<const uint4*>(p.w) + (rt * k_tiles) * (kTileBytes / 16) + lane;
  const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
  uint4 wnext = active && kt0 < kt1 ? wtiles[kt0 * (kTileBytes / 16)] : zero4;
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    const uint4 wv = wnext;
    wnext = active && kt + 1 < kt1 ? wtiles[(kt + 1) * (kTileBytes / 16)] : zero4;
    // Stage the activation tile: kTokens rows x 64 bytes, 16 bytes per thread and step.
    __syncthreads();  // the previous tile has been read
    for (int c = threadIdx.x; c < kTokens * 4; c += kThreads) {
      const int r = c / 4, part = c % 4;
      uint4 v = zero4;
      if (m0 + r < p.m)
        v = *reinterpret_cast<const uint4*>(p.x_fp8 + (m0 + r) * p.x_stride + kt * kTileCols + 16 * part);
      *reinterpret_cast<uint4*>(xs + r * kXRowBytes + 16 * part) = v;
    }
    __syncthreads();
    if (!active) continue;
    const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int s = 0; s < 2; ++s) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
      const uint32_t a[4] = {int4x4_to_e4m3x4(words[2 * s] & 0xFFFFu), int4x4_to_e4m3x4(words[2 * s] >> 16),
                             int4x4_to_e4m3x4(words[2 * s + 1] & 0xFFFFu), int4x4_to_e4m3x4(words[2 * s + 1] >> 16)};
#endif
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const uint8_t* xrow = xs + (8 * j + g) * kXRowBytes + 32 * s + 4 * t;
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(xrow);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(xrow + 16);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
        mma_k32(gacc[j], a, b0, b1);
#else
        mma_k32_f16(gacc[j], words[2 * s], words[2 * s + 1], b0, b1);
#endif
      }
      // Group boundary (or the end of this split): scale the group sums into the total. Columns
      // past k (the zero padding of the last tile) hold zeros; a step wholly past k adds nothing.
      // Steps never straddle groups (groups are multiples of 32 columns, or the whole row).
      const int64_t k_end = kt * kTileCols + 32 * (s + 1);
      if (k_end % p.group == 0 || (kt + 1 == kt1 && s == 1)) {
        if (k_end - 32 < p.k) {
          const int64_t gi = (std::min<int64_t>(k_end, p.k) - 1) / p.group;
          const float s_lo = n_lo < p.n ? p.w_scales[n_lo * groups + gi] : 0.0f;
          const float s_hi = n_hi < p.n ? p.w_scales[n_hi * groups + gi] : 0.0f;
#pragma unroll
          for (int j = 0; j < MT; ++j) {
            acc[j][0] = fmaf(gacc[j][0], s_lo, acc[j][0]);
            acc[j][1] = fmaf(gacc[j][1], s_lo, acc[j][1]);
            acc[j][2] = fmaf(gacc[j][2], s_hi, acc[j][2]);
            acc[j][3] = fmaf(gacc[j][3], s_hi, acc[j][3]);
          }
        }
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) gacc[j][c] = 0.0f;
      }
    }
  }
  if (!active) return;
  // acc[j][c]: weight row n_lo (c < 2) or n_hi, token m0 + 8 j + 2 t + (c & 1). One split: the
  // output directly; several: fp32 partial sums for reduce_kernel.
  const bool direct = gridDim.z == 1;
  float* part = p.workspace + static_cast<int64_t>(blockIdx.z) * p.m * p.n;
#pragma unroll
  for (int j = 0; j < MT; ++j) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t m = m0 + 8 * j + 2 * t + (c & 1), n = c < 2 ? n_lo : n_hi;
      if (m >= p.m || n >= p.n) continue;
      if (direct) {
        float v = p.x_scale[m] * acc[j][c];
        if (p.bias != nullptr) v += p.bias[n];
        static_cast<O*>(p.y)[m * p.n + n] = from_acc<O>(v);
      } else {
        part[m * p.n + n] = acc[j][c];
      }
    }
  }
}

// y[m, n] = x_scale[m] * sum over splits (in order) + bias[n].
template <typename O>
__global__ void reduce_kernel(GemmParams p) {
  const int64_t total = p.m * p.n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < p.splits; ++z) s += p.workspace[z * total + i];
    const int64_t m = i / p.n, n = i % p.n;
    float v = p.x_scale[m] * s;
    if (p.bias != nullptr) v += p.bias[n];
    static_cast<O*>(p.y)[i] = from_acc<O>(static_cast<acc_t<O>>(v));
  }
}

// ---- decode (M <= kDecodeMaxRows) ---------------------------------------------------------------

constexpr int kDecodeThreads = 32 * kDecodeWarps;  // the kDecode* shape: w4a8_math.h

template <int MT>
struct DecodeShape {
  static constexpr int kWBytes = kDecodeWarps * kDecodeTiles * static_cast<int>(kTileBytes);  // per stage
  static constexpr int kXBytes = 8 * MT * kDecodeXRow;
};

// Weights are mma operand A (one 16-row tile per warp), the M <= 8 MT tokens operand B (MT mma
// tiles of 8). Each warp streams its row tile's chunks for the split's k range through a
// kDecodeStages-deep cp.async ring (evict-first: read once), 2 tiles = 1 KB per warp and stage,
// each lane copying and later reading back only its own 16-byte fragment chunks; the stage's
// activation columns (M rows x 128 bytes) are copied once per CTA next to them and shared by its
// 4 warps (one barrier per stage). Tokens past M are zero operands, not loaded.
template <int MT, int L, typename O>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(GemmParams p) {
  using Shape = DecodeShape<MT>;
  __shared__ __align__(16) uint8_t ws[kDecodeStages][Shape::kWBytes];
  __shared__ __align__(16) uint8_t xs[kDecodeStages][Shape::kXBytes];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t k_tiles = ceil_div(p.k, kTileCols), row_tiles = ceil_div(p.n, kTileRows);
  const int64_t groups = p.k / p.group;
  const int64_t rt = static_cast<int64_t>(blockIdx.x) * kDecodeWarps + warp;
  const int64_t kt0 = static_cast<int64_t>(blockIdx.z) * p.tiles_per_split;
  const int64_t kt1 = std::min<int64_t>(k_tiles, kt0 + p.tiles_per_split);
  const int64_t st_end = std::min<int64_t>(2 * kt1, ceil_div(p.k, 32));
  const int64_t stages = ceil_div(kt1 - kt0, kDecodeTiles);
  const bool active = rt < row_tiles;
  const uint64_t policy = evict_first_policy();

  const auto load_stage = [&](int64_t j) {
    if (j < stages) {
      const int buf = static_cast<int>(j % kDecodeStages);
      for (int h = 0; h < kDecodeTiles; ++h) {
        const int64_t kt = kt0 + kDecodeTiles * j + h;
        if (active && kt < kt1)
          cp_async16_stream(ws[buf] + decode_w_smem_offset(warp, h, lane),
                            p.w + layout_tile_offset(L, rt, kt, p.k) + 16 * lane, policy);
      }
      const int64_t col0 = (kt0 + kDecodeTiles * j) * kTileCols;
      for (int c = threadIdx.x; c < 8 * MT * 8; c += kDecodeThreads) {
        const int r = c / 8, chunk = c % 8;
        if (r < p.m && col0 + 16 * chunk < kt1 * kTileCols)
          cp_async16_zfill(xs[buf] + decode_x_smem_offset(r, 16 * chunk), p.x_fp8 + r * p.x_stride + col0 + 16 * chunk,
                           true);
      }
    }
    cp_async_commit();  // empty groups past the split keep the wait count uniform
  };

  float acc[MT][4], gacc[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = gacc[j][c] = 0.0f;
  const int64_t n_lo = rt * kTileRows + g, n_hi = n_lo + 8;

  for (int j = 0; j < kDecodeStages - 1; ++j) load_stage(j);
  for (int64_t j = 0; j < stages; ++j) {
    cp_async_wait<kDecodeStages - 2>();
    __syncthreads();  // stage j visible to every warp; stage j - 1 read by all of them
    load_stage(j + kDecodeStages - 1);
    if (!active) continue;
    const int buf = static_cast<int>(j % kDecodeStages);
#pragma unroll
    for (int h = 0; h < kDecodeTiles; ++h) {
      const int64_t kt = kt0 + kDecodeTiles * j + h;
      if (kt >= kt1) break;
      const uint4 wv = *reinterpret_cast<const uint4*>(ws[buf] + decode_w_smem_offset(warp, h, lane));
      const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int64_t st = 2 * kt + s;
        if (st >= st_end) break;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
        const uint32_t a[4] = {a_fragment_register(words, s, 0), a_fragment_register(words, s, 1),
                               a_fragment_register(words, s, 2), a_fragment_register(words, s, 3)};
#endif
#pragma unroll
        for (int jn = 0; jn < MT; ++jn) {
          const int row = 8 * jn + g;
          const uint8_t* xrow = xs[buf] + decode_x_smem_offset(row, kTileCols * h + 32 * s + 4 * t);
          const uint32_t b0 = row < p.m ? *reinterpret_cast<const uint32_t*>(xrow) : 0u;
          const uint32_t b1 = row < p.m ? *reinterpret_cast<const uint32_t*>(xrow + 16) : 0u;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
          mma_k32(gacc[jn], a, b0, b1);
#else
          mma_k32_f16(gacc[jn], words[2 * s], words[2 * s + 1], b0, b1);
#endif
        }
        const Fold f = fold_after_step(st, st_end, p.group, p.k);
        if (!f.fold) continue;
        if (f.group_index >= 0) {
          const float s_lo = n_lo < p.n ? p.w_scales[n_lo * groups + f.group_index] : 0.0f;
          const float s_hi = n_hi < p.n ? p.w_scales[n_hi * groups + f.group_index] : 0.0f;
#pragma unroll
          for (int jn = 0; jn < MT; ++jn) {
            acc[jn][0] = fmaf(gacc[jn][0], s_lo, acc[jn][0]);
            acc[jn][1] = fmaf(gacc[jn][1], s_lo, acc[jn][1]);
            acc[jn][2] = fmaf(gacc[jn][2], s_hi, acc[jn][2]);
            acc[jn][3] = fmaf(gacc[jn][3], s_hi, acc[jn][3]);
          }
        }
#pragma unroll
        for (int jn = 0; jn < MT; ++jn)
#pragma unroll
          for (int c = 0; c < 4; ++c) gacc[jn][c] = 0.0f;
      }
    }
  }
  cp_async_wait<0>();
  if (!active) return;
  const bool direct = gridDim.z == 1;
  float* part = p.workspace + static_cast<int64_t>(blockIdx.z) * p.m * p.n;
#pragma unroll
  for (int jn = 0; jn < MT; ++jn) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t m = 8 * jn + 2 * t + (c & 1), n = c < 2 ? n_lo : n_hi;
      if (m >= p.m || n >= p.n) continue;
      if (direct) {
        float v = p.x_scale[m] * acc[jn][c];
        if (p.bias != nullptr) v += p.bias[n];
        static_cast<O*>(p.y)[m * p.n + n] = from_acc<O>(v);
      } else {
        part[m * p.n + n] = acc[jn][c];
      }
    }
  }
}

// One wave: the row CTAs times as many k splits as the occupancy lets sit next to each other.
template <int MT>
GemmPlan plan_decode(int64_t n, int64_t k) {
  int per_sm = 0;
  const cudaError_t err =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_kernel<MT, kTiled, float>, kDecodeThreads, 0);
  if (err != cudaSuccess) return {0, 0, static_cast<int>(err)};
  const int64_t ctas = ceil_div(ceil_div(n, kTileRows), kDecodeWarps);
  const SplitPlan sp = split_to_fill(ctas, ceil_div(k, kTileCols), int64_t{std::max(per_sm, 1)} * sm_count());
  return {static_cast<int>(sp.splits), static_cast<int>(sp.per), 0};
}

template <int MT, int L>
void launch_decode(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid(ceil_div(ceil_div(p.n, kTileRows), kDecodeWarps), 1, p.splits);
  switch (p.out_dtype) {  // float32 / bfloat16 / float16 (the binding allows no other)
    case DType::kBFloat16:
      decode_kernel<MT, L, __nv_bfloat16><<<grid, kDecodeThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      decode_kernel<MT, L, __half><<<grid, kDecodeThreads, 0, stream>>>(p);
      break;
    default:
      decode_kernel<MT, L, float><<<grid, kDecodeThreads, 0, stream>>>(p);
      break;
  }
}

template <int MT>
void launch_decode(const GemmParams& p, cudaStream_t stream) {
  if (p.layout == kSm90)
    launch_decode<MT, kSm90>(p, stream);
  else
    launch_decode<MT, kTiled>(p, stream);
}

template <int MT>
void launch_gemm(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid(ceil_div(round_up(p.n, kTileRows), kTileRows * kWarps), ceil_div(p.m, 8 * MT), p.splits);
  switch (p.out_dtype) {  // float32 / bfloat16 / float16 (the binding allows no other)
    case DType::kBFloat16:
      gemm_kernel<MT, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      gemm_kernel<MT, __half><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      gemm_kernel<MT, float><<<grid, kThreads, 0, stream>>>(p);
      break;
  }
}

}  // namespace

GemmPlan plan_gemm_cuda(int64_t m, int64_t n, int64_t k, int layout, bool oracle) {
  if (m <= kDecodeMaxRows && !oracle) return m <= 8 ? plan_decode<1>(n, k) : plan_decode<2>(n, k);
  if (layout == kSm90) return plan_sm90_cuda(m, n, k);
  return tokens_per_block(m) == 32 ? plan_for<4>(m, n, k) : plan_for<8>(m, n, k);
}

GemmPlan plan_gemm_cuda(int64_t m, int64_t n, int64_t k) { return plan_gemm_cuda(m, n, k, kTiled); }

void quantize_fp8_cuda(const QuantFp8Params& p, CUstream_st* stream) {
  const int blocks = static_cast<int>(std::min<int64_t>(p.rows, 65535));
  SLAB_DTYPE_SWITCH(p.dtype, CudaScalar, T, [&] {
    constexpr int kW = kPackWidth<T>;
    // 16-byte loads of every x row and kW-byte stores of every code row must start aligned.
    const bool packed = all_vec_aligned(static_cast<const T*>(p.x)) && p.cols % kW == 0 &&
                        reinterpret_cast<uintptr_t>(p.q) % kW == 0 && p.q_stride % kW == 0;
    SLAB_BOOL_SWITCH(packed, kPacked,
                     [&] { quantize_fp8_kernel<T, kPacked ? kW : 1><<<blocks, kQuantThreads, 0, stream>>>(p); });
  });
}

void int4_to_e4m3_cuda(const uint16_t* in, int64_t words, uint32_t* out, CUstream_st* stream) {
  const int blocks = grid_stride_blocks(words, 256);
  int4_to_e4m3_kernel<<<blocks, 256, 0, stream>>>(in, words, out);
}

void tile_weights_cuda(const uint8_t* src, int64_t n, int64_t k, uint8_t* dst, CUstream_st* stream) {
  const int64_t total = round_up(n, kTileRows) * round_up(k, kTileCols) / 2;
  const int blocks = grid_stride_blocks(total, 256);
  tile_kernel<<<blocks, 256, 0, stream>>>(src, n, k, dst, total);
}

void gemm_cuda(const GemmParams& p, CUstream_st* stream) {
  // the same paths and buckets as plan_gemm_cuda
  if (p.m <= kDecodeMaxRows && !p.oracle) {
    if (p.m <= 8)
      launch_decode<1>(p, stream);
    else
      launch_decode<2>(p, stream);
  } else if (p.layout == kSm90) {
    gemm_sm90_cuda(p, stream);
  } else if (tokens_per_block(p.m) == 32) {
    launch_gemm<4>(p, stream);
  } else {
    launch_gemm<8>(p, stream);
  }
  if (p.splits == 1) return;  // the GEMM wrote y itself
  const int blocks = grid_stride_blocks(p.m * p.n, 256);
  SLAB_DTYPE_SWITCH(p.out_dtype, CudaScalar, O, [&] { reduce_kernel<O><<<blocks, 256, 0, stream>>>(p); });
}

}  // namespace slab::w4a8
