// W4A8 GEMM for Hopper (sm_90a): warpgroup MMA with the int4 weights as the register operand.
//   D^T = W X^T: the weights (rows n) are wgmma's M side, the tokens its N side, so the int4 codes
//   are operand A, read from registers after an exact int4 -> e4m3 conversion (three byte
//   permutes per four codes, int4x4_to_e4m3x4), and the e4m3 activations are operand B, read
//   by the tensor cores from shared memory through a matrix descriptor (the "RS" mixed-input
//   design of CUTLASS / Machete).
//   CTA: 2 warpgroups (256 threads) x 128 weight rows (one wgmma m64 each) x NT tokens (32, 64 or
//     128 by M: wgmma m64nNTk32), a grid of (row blocks, token blocks, k splits).
//   Pipeline: kStages = 4 stages of 128 columns in shared memory, filled with cp.async by all
//     threads (the weights' 8 KB block of the kSm90 layout, two 16-byte copies per thread landing on
//     exactly that thread's fragment chunks, evict-first; the NT x 128 activation bytes in
//     128-byte-swizzled K-major rows, zero-filled past M and K), kStages - 1 stages ahead of the
//     MMAs. Per stage each warp reads its two 16-byte chunks (4 k32 steps of A), converts them to
//     16 e4m3 registers and issues the 4 wgmmas (wgmma.fence before, one commit group each).
//   Groups: each group's products accumulate in their own fp32 wgmma accumulator (scale-d = 0 on
//     the group's first step), and at the group's end (wgmma.wait_group 0) are scaled by w_scale[n, g]
//     into the running total: the formula's order of operations, as the mma.sync kernel. Group 128
//     and whole-row groups wait once per stage; groups of 32 / 64 wait after every 1 / 2 steps.
//   Epilogue: the fp32 tile staged through shared memory, then x_scale[m] * total + bias[n] cast
//     to the output type (32 consecutive outputs per warp store), or with k splits the fp32
//     partial sums for gemm_cuda's reduce kernel.
//   Device code only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); the other targets compile empty
//   stubs and layout_supported_cuda() keeps the binding from sending kSm90 weights there.
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>

#include "core/cuda_types.cuh"
#include "w4a8/w4a8.h"
#include "w4a8/w4a8_async.cuh"
#include "w4a8/w4a8_math.h"

namespace slab::w4a8 {
namespace {

constexpr int kSm90Threads = 256;  // 2 warpgroups
constexpr int kStages = 5;         // 3 stages of copies in flight while one is multiplied and one converted

template <int NT>
struct Sm90Shape {
  static constexpr int kXBytes = NT * kSm90SwizzleRow;  // one stage of B: NT tokens x 128 bytes
  static constexpr int kSmem = kStages * (kXBytes + static_cast<int>(kSm90BlockBytes)) + kSm90SwizzleAtom;
  static_assert(kXBytes % kSm90SwizzleAtom == 0, "stages of B stay 1024-byte aligned");
  static_assert(NT * kSm90OutRow * 4 <= kStages * (kXBytes + kSm90BlockBytes), "the output tile fits the stages");
};

// ---- wgmma (sm_90a only: the other targets compile the kernel as an empty stub) ---------------

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kStepsPerStage = kSm90BlockCols / 32;

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// a <- a_next after the wait_group, as instructions the compiler cannot move or merge: a plain
// copy lets it compute the next stage's registers straight into a's, which the wgmmas still in
// flight read (the PTX ISA forbids touching their A registers before the wait).
__device__ __forceinline__ void take_registers(uint32_t (&a)[kStepsPerStage][4],
                                               const uint32_t (&a_next)[kStepsPerStage][4]) {
#pragma unroll
  for (int s = 0; s < kStepsPerStage; ++s)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("mov.b32 %0, %1;\n" : "=r"(a[s][r]) : "r"(a_next[s][r]));
}

// Pins the accumulators after a wait: the compiler sees them redefined here, so no read of a
// wgmma result moves above the wait_group.
template <int R>
__device__ __forceinline__ void fence_accumulators(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (+)= A (4 e4m3x4 registers, 64 x 32) * B (descriptor, N x 32 K-major); `accumulate` 0 overwrites d.
template <int N>
__device__ __forceinline__ void wgmma_e4m3(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc, int accumulate);

template <>
__device__ __forceinline__ void wgmma_e4m3<32>(float (&d)[16], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

template <>
__device__ __forceinline__ void wgmma_e4m3<64>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, "
      "%35}, %36, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

template <>
__device__ __forceinline__ void wgmma_e4m3<128>(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, "
      "%35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, "
      "%57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// ---- GEMM ----------------------------------------------------------------------------------------

template <int NT, typename O>
__global__ void __launch_bounds__(kSm90Threads, 1) gemm_sm90_kernel(GemmParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = Sm90Shape<NT>;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  // Swizzle atoms must start on 1024-byte addresses (descriptor base offset 0).
  uint8_t* smem = smem_raw + ((kSm90SwizzleAtom - smem_addr(smem_raw) % kSm90SwizzleAtom) % kSm90SwizzleAtom);
  uint8_t* xs = smem;                             // kStages x kXBytes
  uint8_t* ws = smem + kStages * Shape::kXBytes;  // kStages x kSm90BlockBytes
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = tid / 128;
  const int64_t kb_count = ceil_div(p.k, kSm90BlockCols), kp = round_up(p.k, kTileCols);  // blocks per row
  const int64_t groups = p.k / p.group;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * NT;
  const BlockRange blocks = sm90_split_blocks(blockIdx.z, p.tiles_per_split, p.k);
  const int64_t kb0 = blocks.begin, kb1 = blocks.end;
  const int64_t st_end = std::min<int64_t>(kb1 * kStepsPerStage, ceil_div(p.k, 32));
  const uint8_t* wblock = p.w + static_cast<int64_t>(blockIdx.x) * kb_count * kSm90BlockBytes;
  const uint64_t policy = evict_first_policy();

  const auto load_stage = [&](int64_t kb) {
    const int buf = static_cast<int>(kb % kStages);
    if (kb < kb1) {
      const uint8_t* wsrc = wblock + kb * kSm90BlockBytes;
      for (int h = 0; h < 2; ++h) {  // tile (row tile `warp`, column tile h): this thread's chunk
        const int off = (2 * warp + h) * static_cast<int>(kTileBytes) + 16 * lane;
        cp_async16_stream(ws + buf * kSm90BlockBytes + off, wsrc + off, policy);
      }
      for (int c = tid; c < NT * 8; c += kSm90Threads) {
        const int r = c / 8, chunk = c % 8;
        const int64_t col = kb * kSm90BlockCols + 16 * chunk;
        const bool valid = m0 + r < p.m && col < kp;
        const uint8_t* src = valid ? p.x_fp8 + (m0 + r) * p.x_stride + col : p.x_fp8;
        cp_async16_zfill(xs + buf * Shape::kXBytes + sm90_x_smem_offset(r, chunk), src, valid);
      }
    }
    cp_async_commit();  // empty groups past the split keep the wait count uniform
  };

  // The stage's A registers (4 k32 steps) from this thread's two 16-byte chunks.
  const auto load_a = [&](int64_t kb, uint32_t (&a)[kStepsPerStage][4]) {
    const uint8_t* wstage = ws + (kb % kStages) * kSm90BlockBytes;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 v = *reinterpret_cast<const uint4*>(wstage + (2 * warp + h) * kTileBytes + 16 * lane);
      const uint32_t chunk[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int r = 0; r < 4; ++r) a[2 * h + s][r] = a_fragment_register(chunk, s, r);
    }
  };

  // This thread's two weight rows (D rows g and g + 8 of its warp).
  const int64_t n_lo = static_cast<int64_t>(blockIdx.x) * kSm90BlockRows + 16 * warp + lane / 4, n_hi = n_lo + 8;
  float acc[NT / 2], gacc[NT / 2];
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) acc[i] = gacc[i] = 0.0f;
  // Scales the finished group sums into the total, once the wgmmas writing them are complete.
  const auto fold = [&](int64_t group_index) {
    const float s_lo = n_lo < p.n ? p.w_scales[n_lo * groups + group_index] : 0.0f;
    const float s_hi = n_hi < p.n ? p.w_scales[n_hi * groups + group_index] : 0.0f;
    wgmma_wait_all();
    fence_accumulators(gacc);
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) acc[i] = fmaf(gacc[i], (i & 2) ? s_hi : s_lo, acc[i]);
  };
  bool group_start = true;

  // Stage kb + 1's copies are awaited and its A registers converted while stage kb's wgmmas run.
  for (int s = 0; s < kStages - 1; ++s) load_stage(kb0 + s);
  cp_async_wait<kStages - 2>();
  fence_proxy_async_shared();  // the copies (generic proxy) before the wgmmas' reads (async proxy)
  __syncthreads();
  uint32_t a[kStepsPerStage][4];
  load_a(kb0, a);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const uint32_t xs_stage = smem_addr(xs + (kb % kStages) * Shape::kXBytes);
    int64_t stage_fold = -1;  // the group of the stage's last fold (always one: kFoldSteps = 4)
#pragma unroll
    for (int s = 0; s < kStepsPerStage; ++s) {
      const int64_t st = kb * kStepsPerStage + s;
      if (st >= st_end) break;  // wholly past k: uniform over the CTA
      wgmma_fence();
      wgmma_e4m3<NT>(gacc, a[s], sm90_b_descriptor(xs_stage, s), group_start ? 0 : 1);
      wgmma_commit();
      // Steps never lie wholly past k here, so a fold always has a group (index >= 0).
      const Fold f = fold_after_step(st, st_end, p.group, p.k);
      group_start = f.fold;
      if (!f.fold) continue;
      if (s == kStepsPerStage - 1 || st + 1 == st_end)
        stage_fold = f.group_index;  // after the next stage's conversion
      else
        fold(f.group_index);  // groups of 32 / 64 columns: inside the stage
    }
    cp_async_wait<kStages - 3>();
    fence_proxy_async_shared();
    __syncthreads();               // stage kb + 1 visible to all; every wgmma of stage kb - 1 complete
    load_stage(kb + kStages - 1);  // into the buffer of stage kb - 1
    uint32_t a_next[kStepsPerStage][4];
    if (kb + 1 < kb1) load_a(kb + 1, a_next);
    if (stage_fold >= 0) fold(stage_fold);
    wgmma_wait_all();  // this stage's buffer is refilled after the next barrier
    take_registers(a, a_next);
  }
  cp_async_wait<0>();

  // acc[i] is D[row][col] of wgmma_d_position: weight row 64 wg + row, token m0 + col. Staged
  // through shared memory (the pipeline buffers, idle now) so that each warp store covers 32
  // consecutive outputs of one token row.
  fence_proxy_async_shared();
  __syncthreads();  // every warp is done reading the stages
  float* out = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) {
    const TilePos d = wgmma_d_position(tid % 128, i);
    out[sm90_out_smem_offset(d.col, 64 * wg + d.row)] = acc[i];
  }
  __syncthreads();
  const bool direct = gridDim.z == 1;
  float* part = p.workspace + static_cast<int64_t>(blockIdx.z) * p.m * p.n;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kSm90BlockRows;
  for (int e = tid; e < NT * static_cast<int>(kSm90BlockRows); e += kSm90Threads) {
    const int ml = e / static_cast<int>(kSm90BlockRows), nl = e % static_cast<int>(kSm90BlockRows);
    const int64_t m = m0 + ml, n = n0 + nl;
    if (m >= p.m || n >= p.n) continue;
    const float v = out[sm90_out_smem_offset(ml, nl)];
    if (direct)
      static_cast<O*>(p.y)[m * p.n + n] = from_acc<O>(p.x_scale[m] * v + (p.bias != nullptr ? p.bias[n] : 0.0f));
    else
      part[m * p.n + n] = v;
  }
#else
  (void)p;
#endif
}

// Whether this build's code for the current device is the sm_90a kernel.
__global__ void sm90_probe_kernel(int* flag) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *flag = 1;
#else
  *flag = 0;
#endif
}

bool probe_sm90() {
  int* flag = nullptr;
  if (cudaMalloc(&flag, sizeof(int)) != cudaSuccess) return false;
  int host = 0;
  sm90_probe_kernel<<<1, 1>>>(flag);
  const bool ok = cudaMemcpy(&host, flag, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
  cudaFree(flag);
  return ok && host == 1;
}

__global__ void tile_sm90_kernel(const uint8_t* src, int64_t n, int64_t k, uint8_t* dst, int64_t total) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = sm90_byte(src, n, k, i);
}

template <int NT, typename O>
void launch_sm90_typed(const GemmParams& p, cudaStream_t stream) {
  constexpr int smem = Sm90Shape<NT>::kSmem;
  cudaFuncSetAttribute(gemm_sm90_kernel<NT, O>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const dim3 grid(ceil_div(p.n, kSm90BlockRows), ceil_div(p.m, NT), p.splits);
  gemm_sm90_kernel<NT, O><<<grid, kSm90Threads, smem, stream>>>(p);
}

template <int NT>
void launch_sm90(const GemmParams& p, cudaStream_t stream) {
  switch (p.out_dtype) {  // float32 / bfloat16 / float16 (the binding allows no other)
    case DType::kBFloat16:
      return launch_sm90_typed<NT, __nv_bfloat16>(p, stream);
    case DType::kFloat16:
      return launch_sm90_typed<NT, __half>(p, stream);
    default:
      return launch_sm90_typed<NT, float>(p, stream);
  }
}

int tokens_per_block(int64_t m) { return m <= 32 ? 32 : (m <= 64 ? 64 : 128); }

// CTAs of gemm_sm90_kernel<NT> resident per SM, or the CUDA error of the query.
template <int NT>
cudaError_t blocks_per_sm(int* per_sm) {
  const auto kernel = gemm_sm90_kernel<NT, float>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Sm90Shape<NT>::kSmem);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, kSm90Threads, Sm90Shape<NT>::kSmem);
  return err;
}

}  // namespace

// k splits (whole 128-column blocks) while the (row block, token block) grid leaves part of one
// wave empty: a small-N GEMM then still streams its weights from every SM.
GemmPlan plan_sm90_cuda(int64_t m, int64_t n, int64_t k) {
  int per_sm = 0;
  const int nt = tokens_per_block(m);
  const cudaError_t err =
      nt == 32 ? blocks_per_sm<32>(&per_sm) : (nt == 64 ? blocks_per_sm<64>(&per_sm) : blocks_per_sm<128>(&per_sm));
  if (err != cudaSuccess) return {0, 0, static_cast<int>(err)};
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const int64_t ctas = ceil_div(n, kSm90BlockRows) * ceil_div(m, nt);
  const SplitPlan sp =
      split_to_fill(ctas, ceil_div(k, kSm90BlockCols), int64_t{std::max(per_sm, 1)} * std::max(sms, 1));
  return {static_cast<int>(sp.splits), static_cast<int>(2 * sp.per), 0};
}

void gemm_sm90_cuda(const GemmParams& p, CUstream_st* stream) {
  switch (tokens_per_block(p.m)) {
    case 32:
      return launch_sm90<32>(p, stream);
    case 64:
      return launch_sm90<64>(p, stream);
    default:
      return launch_sm90<128>(p, stream);
  }
}

bool layout_supported_cuda(int layout) {
  if (layout == kTiled) return true;
  if (layout != kSm90) return false;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (major != 9 || minor != 0) return false;
  static int cached[64] = {};  // per device: 0 unknown, 1 yes, 2 no
  if (dev >= 64) return probe_sm90();
  if (cached[dev] == 0) cached[dev] = probe_sm90() ? 1 : 2;
  return cached[dev] == 1;
}

void tile_weights_sm90_cuda(const uint8_t* src, int64_t n, int64_t k, uint8_t* dst, CUstream_st* stream) {
  const int64_t total = sm90_packed_rows(n) * sm90_packed_row_bytes(k);
  const int blocks = grid_stride_blocks(total, 256);
  tile_sm90_kernel<<<blocks, 256, 0, stream>>>(src, n, k, dst, total);
}

}  // namespace slab::w4a8
