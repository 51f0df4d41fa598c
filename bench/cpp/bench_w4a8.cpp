// C++ benchmark of the W4A8 GEMM (int4 group-quantized weights x per-token float8_e4m3fn
// activations, fp32 accumulation: slab::w4a8_linear, slab::w4a8_gemm) through the PyTorch
// dispatcher, against dense at::matmul and dequantize-then-matmul. Google Benchmark drives the
// timing; the shared machinery (flags, verification, timing, counters) is bench_common.h.
//
//   bench_w4a8 [--shapes=MxNxK,...] [--group=128] [--dtype=float32,bfloat16,float16]
//              [--device=cpu,cuda] [--threads=N] [--no-verify] [Google Benchmark flags...]
//
// y (M, N) = x (M, K) @ W^T with W (N, K). Default shapes: M = 1 and 16 (decode) with the
// Llama-7B projections 4096 x 4096 (q/k/v/o) and 11008 x 4096 (gate/up). The weights are random,
// quantized here with SPEC section 4's formula written in ATen ops (scale = absmax / 7 per (row,
// group), round half to even, clamp to [-8, 7], two's-complement nibbles, low nibble = even
// column); the CPU kernels read that row-major layout ("rowmajor"), the CUDA kernels the tiles that
// slab::w4a8_tile_weights makes of it ("tiled").
//
// Every (shape, dtype, device) configuration is first verified: slab::quantize_fp8 against the
// SPEC formula in ATen (codes and scales exactly), then w4a8_gemm and w4a8_linear against the
// float64 product of the dequantized operands, (x_scale * x_fp8) @ (int4 * w_scale)^T; a mismatch
// exits with status 1 before anything is timed.
//
// Benchmarks (arguments M/N/K/dtype/device; dtype 0 float32, 1 bfloat16, 2 float16 -- of x and
// y; device 0 cpu, 1 cuda):
//   slab_linear     w4a8_linear(x, ...): per-token fp8 quantization of x + the GEMM
//   slab_gemm       w4a8_gemm on pre-quantized x (fp8 codes + per-row scales), y in x's dtype
//   aten_matmul     at::matmul(x, W^T) with dense weights in x's dtype (bf16 weights for
//                   --dtype=bfloat16, fp32 weights for float32)
//   dequant_matmul  the int4 weights dequantized to x's dtype with ATen ops on every call, then
//                   at::matmul
//
// Counters (see bench_common.h): GBps, frac_bw, x_floor, and TFLOPs = 2 M N K / time.
//   floor: the int4 job -- packed weights (N K / 2 bytes) + float32 scales + x + y, each once
//     (slab_gemm: x as fp8 codes + float32 row scales), for every provider: aten_matmul's
//     x_floor says how far dense weights are from the int4 job's limit.
//   moved: slab -- the floor; aten_matmul -- dense weights + x + y; dequant_matmul -- packed
//     weights + scales + the dense weights written and read back + x + y (the unpacking
//     temporaries not counted).
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bench_common.h"

namespace {

using namespace slab_bench;

// Signatures of the schemas in csrc/w4a8/w4a8_ops.cpp.
using QuantFn = std::tuple<Tensor, Tensor>(const Tensor& x);
using TileFn = Tensor(const Tensor& packed, c10::string_view layout);
using GemmFn = Tensor(const Tensor& x_fp8, const Tensor& x_scale, const Tensor& w_packed, const Tensor& w_scales,
                      int64_t group_size, c10::string_view layout, at::ScalarType out_dtype);
using LinearFn = Tensor(const Tensor& x, const Tensor& w_packed, const Tensor& w_scales, int64_t group_size,
                        c10::string_view layout, const OptTensor& bias);

// ---- options -----------------------------------------------------------------------------------
struct Options {
  CommonFlags common;
  std::vector<std::vector<int64_t>> shapes;  // (M, N, K)
  int64_t group = 128;                       // -1: one scale per row
};
Options g_opt;

const char kHelp[] =
    "bench_w4a8: W4A8 GEMM (slab, int4 weights x fp8 activations) vs at::matmul vs dequantize + matmul\n"
    "  --shapes=MxNxK,...   y (M, N) = x (M, K) @ W^T (default 1x4096x4096,16x4096x4096,\n"
    "                       1x11008x4096,16x11008x4096: decode with Llama-7B projections)\n"
    "  --group=128          weight group size: 32, 64, 128, or -1 (one scale per row)\n"
    "  --dtype=float32,bfloat16,float16 (default float32,bfloat16; of x and y)\n"
    "  --device=cpu,cuda    (default cpu, plus cuda when slab has CUDA kernels and a GPU is present)\n"
    "  --threads=N --no-verify\n"
    "  plus Google Benchmark flags, e.g. --benchmark_filter=slab --benchmark_format=json\n"
    "  --benchmark_repetitions=N --benchmark_min_time=T (see --help below)\n\n";

void parse_own_flags(int* argc, char** argv) {
  std::string shapes = "1x4096x4096,16x4096x4096,1x11008x4096,16x11008x4096";
  auto own = [&](const std::string& a) {
    if (auto v = flag_value(a, "--shapes")) {
      shapes = *v;
    } else if (auto v = flag_value(a, "--group")) {
      g_opt.group = to_int(*v, "--group", /*allow_minus_one=*/true);
      if (g_opt.group != 32 && g_opt.group != 64 && g_opt.group != 128 && g_opt.group != -1)
        usage_error("--group must be 32, 64, 128 or -1");
    } else {
      return false;
    }
    return true;
  };
  parse_flags("bench_w4a8", argc, argv, g_opt.common, own, kHelp);
  g_opt.shapes = parse_shapes(shapes, 3, "--shapes", "MxNxK");
  for (const auto& s : g_opt.shapes) {
    const int64_t k = s[2], g = g_opt.group == -1 ? k : g_opt.group;
    if (k % 2 != 0 || k % g != 0)
      usage_error("--shapes: K = " + std::to_string(k) + " must be even and a multiple of --group");
  }
}

// Columns per weight scale.
int64_t group_columns(int64_t k) { return g_opt.group == -1 ? k : g_opt.group; }

// ---- the ops -----------------------------------------------------------------------------------
// Typed handles of the benchmarked ops, looked up once.
struct Ops {
  c10::TypedOperatorHandle<QuantFn> quant = find_op<QuantFn>("slab::quantize_fp8");
  c10::TypedOperatorHandle<TileFn> tile = find_op<TileFn>("slab::w4a8_tile_weights");
  c10::TypedOperatorHandle<GemmFn> gemm = find_op<GemmFn>("slab::w4a8_gemm");
  c10::TypedOperatorHandle<LinearFn> linear = find_op<LinearFn>("slab::w4a8_linear");
};
const Ops& ops() {
  static const Ops handles;
  return handles;
}

// ---- SPEC section 4 in ATen ops ----------------------------------------------------------------
// quantize_w4: (packed (N, K/2) uint8, scales (N, K/g) float32); scale = absmax / 7 (1 for an
// all-zero group), q = clamp(round(w / scale), -8, 7); byte j of a row = q[2j] & 15 | (q[2j+1] & 15) << 4.
std::pair<Tensor, Tensor> quantize_w4(const Tensor& w, int64_t group) {
  const int64_t n = w.size(0), k = w.size(1);
  const Tensor wf = w.to(at::kFloat).reshape({n, k / group, group});
  const Tensor absmax = wf.abs().amax(-1);
  const Tensor scales = at::where(absmax == 0, at::ones_like(absmax), absmax / 7);
  const Tensor q = at::clamp(at::round(wf / scales.unsqueeze(-1)), -8, 7).to(at::kInt).reshape({n, k});
  const Tensor lo = q.slice(1, 0, k, 2).bitwise_and(15), hi = q.slice(1, 1, k, 2).bitwise_and(15);
  return {(lo + hi * 16).to(at::kByte), scales.contiguous()};
}

// The int4 values (N, K) of row-major packed codes, as int16 (bit 3 of a nibble is its sign).
Tensor unpack_int4(const Tensor& packed) {
  const Tensor p = packed.to(at::kShort);
  const Tensor nib = at::stack({p.bitwise_and(15), at::bitwise_right_shift(p, 4)}, -1).reshape({packed.size(0), -1});
  return nib - nib.bitwise_and(8) * 2;
}

// int4 * scale as an (N, K) tensor of `dtype`.
Tensor dequantize_w4(const Tensor& packed, const Tensor& scales, int64_t group, at::ScalarType dtype) {
  const Tensor q = unpack_int4(packed).to(dtype);
  const int64_t n = q.size(0), k = q.size(1);
  return (q.reshape({n, k / group, group}) * scales.to(dtype).unsqueeze(-1)).reshape({n, k});
}

// quantize_fp8: per-row scale = absmax / 448 (1 for a zero row); codes = x / scale rounded to the
// nearest even e4m3 value (the conversion .to(float8_e4m3fn) does).
std::pair<Tensor, Tensor> quantize_fp8(const Tensor& x) {
  const Tensor xf = x.to(at::kFloat);
  const Tensor absmax = xf.abs().amax(-1, /*keepdim=*/true);
  const Tensor scale = at::where(absmax == 0, at::ones_like(absmax), absmax / 448);
  return {(xf / scale).to(at::kFloat8_e4m3fn), scale.squeeze(-1)};
}

// ---- inputs ------------------------------------------------------------------------------------
// Weights of one (N, K, dtype, device): made once and kept, since quantizing 45M weights costs
// more than many timed calls; every benchmark of that configuration reads the same bytes.
struct Weights {
  Tensor packed, scales;  // row-major codes (N, K/2) and float32 scales (N, K/g)
  Tensor kernel;          // the codes in the layout of the device's kernels
  const char* layout;     // "rowmajor" (CPU) or "tiled" (CUDA)
  Tensor dense;           // the unquantized weights in the benchmarked dtype (at::matmul)
};

const Weights& weights(int64_t n, int64_t k, int64_t dt, int64_t dev) {
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, Weights> cache;
  const auto key = std::make_tuple(n, k, dt, dev);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  at::manual_seed(1);
  const auto device = device_of(dev);
  // nn.Linear-like scale; one outlier column per 256 gives groups of different absmax.
  Tensor w = at::randn({n, k}, at::TensorOptions().dtype(at::kFloat).device(device)) * 0.02;
  w.slice(1, 0, k, 256).mul_(8);
  Weights out;
  std::tie(out.packed, out.scales) = quantize_w4(w, group_columns(k));
  out.layout = device.is_cuda() ? "tiled" : "rowmajor";
  out.kernel = device.is_cuda() ? ops().tile.call(out.packed, "tiled") : out.packed;
  out.dense = w.to(kDtypes[dt]);
  return cache.emplace(key, std::move(out)).first->second;
}

// Activations (M, K) in the benchmarked dtype, plus their SPEC fp8 quantization.
struct Activations {
  Tensor x, x_fp8, x_scale;
};

Activations make_activations(int64_t m, int64_t k, int64_t dt, int64_t dev) {
  at::manual_seed(0);
  Activations a;
  a.x = at::randn({m, k}, at::TensorOptions().dtype(at::kFloat).device(device_of(dev))).to(kDtypes[dt]);
  std::tie(a.x_fp8, a.x_scale) = quantize_fp8(a.x);
  return a;
}

// ---- verification ------------------------------------------------------------------------------
bool verify(const std::vector<int64_t>& shape, int64_t dt, int64_t dev) {
  const int64_t m = shape[0], n = shape[1], k = shape[2], group = group_columns(k);
  const auto dtype = kDtypes[dt];
  const Weights& w = weights(n, k, dt, dev);
  const Activations a = make_activations(m, k, dt, dev);
  c10::InferenceMode guard;
  const auto [q, qs] = ops().quant.call(a.x);
  const Tensor y_gemm = ops().gemm.call(a.x_fp8, a.x_scale, w.kernel, w.scales, g_opt.group, w.layout, dtype);
  const Tensor y_lin = ops().linear.call(a.x, w.kernel, w.scales, g_opt.group, w.layout, std::nullopt);

  // float64 product of the dequantized operands, on the CPU.
  auto cpu64 = [](const Tensor& t) { return t.to(at::kCPU).to(at::kDouble); };
  const Tensor x64 = cpu64(a.x_fp8) * cpu64(a.x_scale).unsqueeze(-1);
  const Tensor w64 = dequantize_w4(w.packed.cpu(), w.scales.cpu(), group, at::kDouble);
  const Tensor ref = at::matmul(x64, w64.t());

  const Tol exact{0, 0};
  std::string report;
  bool ok = close("quantize_fp8 codes", q, a.x_fp8, exact, report);
  ok &= close("scales", qs, a.x_scale, exact, report);
  ok &= close("w4a8_gemm", y_gemm, ref, tolerance(dtype), report);
  ok &= close("w4a8_linear", y_lin, ref, tolerance(dtype), report);
  std::fprintf(stderr, "verify %lldx%lldx%lld group=%lld %s %s: %s (max abs err:%s)\n", (long long)m, (long long)n,
               (long long)k, (long long)g_opt.group, kDtypeNames[dt], kDeviceNames[dev], ok ? "OK" : "FAILED",
               report.c_str());
  return ok;
}

// ---- timing ------------------------------------------------------------------------------------
enum class Provider { kSlabLinear, kSlabGemm, kAtenMatmul, kDequantMatmul };

// Bytes moved by `provider` and the floor of its job (see the top of the file).
Traffic traffic(Provider p, double m, double n, double k, double e) {
  const double w4 = n * k / 2 + n * (k / static_cast<double>(group_columns(static_cast<int64_t>(k)))) * 4;
  const double xy = m * k * e + m * n * e;
  if (p == Provider::kSlabGemm) {
    const double b = w4 + m * k + m * 4 + m * n * e;  // fp8 codes + row scales in, y out
    return {b, b};
  }
  const double floor = w4 + xy;
  if (p == Provider::kAtenMatmul) return {n * k * e + xy, floor};
  if (p == Provider::kDequantMatmul) return {w4 + 2 * n * k * e + xy, floor};
  return {floor, floor};
}

void run_benchmark(benchmark::State& state, Provider provider) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2), dt = state.range(3), dev = state.range(4);
  const auto dtype = kDtypes[dt];
  state.SetLabel(std::string(kDtypeNames[dt]) + " " + kDeviceNames[dev] + " group=" + std::to_string(g_opt.group));
  const Weights& w = weights(n, k, dt, dev);
  const Activations a = make_activations(m, k, dt, dev);
  const int64_t g = g_opt.group, group = group_columns(k);

  std::function<Tensor()> call;
  switch (provider) {
    case Provider::kSlabLinear:
      call = [&] { return ops().linear.call(a.x, w.kernel, w.scales, g, w.layout, std::nullopt); };
      break;
    case Provider::kSlabGemm:
      call = [&] { return ops().gemm.call(a.x_fp8, a.x_scale, w.kernel, w.scales, g, w.layout, dtype); };
      break;
    case Provider::kAtenMatmul:
      call = [&] { return at::matmul(a.x, w.dense.t()); };
      break;
    case Provider::kDequantMatmul:
      call = [&] { return at::matmul(a.x, dequantize_w4(w.packed, w.scales, group, dtype).t()); };
      break;
  }
  auto step = [&] {
    c10::InferenceMode guard;  // inference ops: no autograd bookkeeping in the timed calls
    benchmark::DoNotOptimize(call().data_ptr());
  };
  const double seconds = timed_loop(state, device_of(dev), step,
                                    traffic(provider, double(m), double(n), double(k), double(a.x.element_size())));
  state.counters["TFLOPs"] = 2.0 * double(m) * double(n) * double(k) / seconds / 1e12;
}

void register_all() {
  const std::pair<const char*, Provider> specs[] = {
      {"slab_linear", Provider::kSlabLinear},
      {"slab_gemm", Provider::kSlabGemm},
      {"aten_matmul", Provider::kAtenMatmul},
      {"dequant_matmul", Provider::kDequantMatmul},
  };
  for (const auto& [name, provider] : specs) {
    for (int64_t dev : g_opt.common.devices) {
      const Provider p = provider;
      // Decode GEMMs take microseconds to a few milliseconds.
      auto* b = register_on(name, dev, [p](benchmark::State& st) { run_benchmark(st, p); }, benchmark::kMicrosecond);
      b->ArgNames({"M", "N", "K", "dtype", "device"});
      for (const auto& s : g_opt.shapes) b->ArgsProduct({{s[0]}, {s[1]}, {s[2]}, g_opt.common.dtypes, {dev}});
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  parse_own_flags(&argc, argv);
  auto verify_all = [] {
    bool ok = true;
    for (int64_t dev : g_opt.common.devices)
      for (const auto& shape : g_opt.shapes)
        for (int64_t dt : g_opt.common.dtypes) ok &= verify(shape, dt, dev);
    return ok;
  };
  return run_main(argc, argv, g_opt.common, verify_all, register_all, {{"group", std::to_string(g_opt.group)}});
}
