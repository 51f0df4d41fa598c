// C++ benchmark of the PRepBN kernels (slab::prep_bn_forward / slab::prep_bn_backward) through the
// PyTorch dispatcher, against the ATen composite SLAB's modules compute (layer_norm + batch_norm)
// and plain at::layer_norm. Google Benchmark drives the timing; the shared machinery (flags,
// verification, timing, counters, main's defaults) is bench_common.h.
//
//   bench_prepbn [--shapes=12544x384,4096x1024 | --rows=R1,R2 --channels=C1,C2]
//                [--dtype=float32,bfloat16,float16] [--device=cpu,cuda] [--norm=layer|rms]
//                [--lam=0.5] [--threads=N] [--no-verify] [Google Benchmark flags...]
//
// Every (rows, channels, dtype, device) configuration is first verified: slab's forward output,
// batch statistics, dx and all weight gradients against the ATen composite computed in float64
// (autograd for the gradients); a mismatch exits with status 1 before anything is timed.
//
// Benchmarks (select with --benchmark_filter=REGEX): slab_fwd, slab_fwd_bwd, aten_fwd,
// aten_fwd_bwd, layer_norm_fwd, layer_norm_fwd_bwd; arguments rows/channels/dtype/device
// (dtype 0 float32, 1 bfloat16, 2 float16; device 0 cpu, 1 cuda). Defaults added in front of the
// user's flags: --benchmark_repetitions=5 --benchmark_display_aggregates_only=true
// --benchmark_enable_random_interleaving=true (repetitions of all benchmarks in random order; the
// console shows mean/median/stddev/cv; JSON via --benchmark_format=json or --benchmark_out=FILE
// keeps every repetition). Counters: GBps (bytes the algorithm moves / time), frac_bw (that rate over the
// MEASURED copy bandwidth of the device), x_floor (time / time of one read of every input and one
// write of every output at copy bandwidth). CPU timing is wall-clock (UseRealTime); CUDA timing is
// per-iteration CUDA events (UseManualTime) with the L2 cache flushed before each iteration.
#include <torch/csrc/autograd/autograd.h>

#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "bench_common.h"

namespace {

using namespace slab_bench;
using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Signatures of the schemas in csrc/prepbn/prepbn_ops.cpp.
using FwdFn = Tensors6(const Tensor& x, const OptTensor& norm_weight, const OptTensor& norm_bias,
                       const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& alpha, const Tensor& running_mean,
                       const Tensor& running_var, double lam, bool training, double eps, double norm_eps,
                       c10::string_view norm, const OptTensor& mask);
using BwdFn = Tensors6(const Tensor& dy, const Tensor& x, const OptTensor& norm_weight, const Tensor& bn_weight,
                       const Tensor& alpha, const Tensor& row_mean, const Tensor& row_rstd, const Tensor& bn_mean,
                       const Tensor& bn_rstd, double lam, bool training, c10::string_view norm, const OptTensor& mask);

constexpr double kEps = 1e-5, kNormEps = 1e-6, kMomentum = 0.1;

// ---- options ---------------------------------------------------------------------------------
struct Options {
  CommonFlags common;
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (rows, channels), used when no --rows/--channels
  std::vector<int64_t> rows, channels;
  std::string norm = "layer";
  double lam = 0.5;
};
Options g_opt;

const char kHelp[] =
    "bench_prepbn: PRepBN kernels (slab) vs the ATen composite vs at::layer_norm\n"
    "  --shapes=RxC,...     rows x channels (default 12544x384,4096x1024 = DeiT-S, LM 8x512x1024)\n"
    "  --rows=R,... --channels=C,...   every combination (ArgsProduct) instead of --shapes\n"
    "  --dtype=float32,bfloat16,float16 (default float32,bfloat16)\n"
    "  --device=cpu,cuda    (default cpu, plus cuda when slab has CUDA kernels and a GPU is present)\n"
    "  --norm=layer|rms --lam=0.5 --threads=N --no-verify\n"
    "  plus Google Benchmark flags, e.g. --benchmark_filter=slab --benchmark_format=json\n"
    "  --benchmark_repetitions=N --benchmark_min_time=T (see --help below)\n\n";

// The PRepBN flags (the common ones are parse_flags'); true when `a` was one of them.
bool own_flag(const std::string& a, std::string& shapes) {
  if (auto v = flag_value(a, "--shapes")) {
    shapes = *v;
  } else if (auto v = flag_value(a, "--rows")) {
    for (auto& s : split(*v, ',')) g_opt.rows.push_back(to_int(s, "--rows"));
  } else if (auto v = flag_value(a, "--channels")) {
    for (auto& s : split(*v, ',')) g_opt.channels.push_back(to_int(s, "--channels"));
  } else if (auto v = flag_value(a, "--norm")) {
    if (*v != "layer" && *v != "rms") usage_error("--norm must be layer or rms");
    g_opt.norm = *v;
  } else if (auto v = flag_value(a, "--lam")) {
    g_opt.lam = std::atof(v->c_str());
    if (!(g_opt.lam >= 0 && g_opt.lam <= 1)) usage_error("--lam must be in [0, 1]");
  } else {
    return false;
  }
  return true;
}

// Removes our flags from argv (Google Benchmark rejects unknown ones) and fills g_opt.
void parse_own_flags(int* argc, char** argv) {
  std::string shapes = "12544x384,4096x1024";  // DeiT-S (64 x 196 tokens, C 384), LM (8 x 512, C 1024)
  parse_flags(
      "bench_prepbn", argc, argv, g_opt.common, [&](const std::string& a) { return own_flag(a, shapes); }, kHelp);
  if (g_opt.rows.empty() != g_opt.channels.empty()) usage_error("give both --rows and --channels, or --shapes");
  if (g_opt.rows.empty())
    for (const auto& rc : parse_shapes(shapes, 2, "--shapes", "ROWSxCHANNELS")) g_opt.shapes.emplace_back(rc[0], rc[1]);
}

// ---- the ops -----------------------------------------------------------------------------------
// Typed handles of the benchmarked ops, looked up once.
struct Ops {
  c10::TypedOperatorHandle<FwdFn> fwd = find_op<FwdFn>("slab::prep_bn_forward");
  c10::TypedOperatorHandle<BwdFn> bwd = find_op<BwdFn>("slab::prep_bn_backward");
};
const Ops& ops() {
  static const Ops handles;
  return handles;
}

// Inputs of one configuration. Parameters and running stats are float32 (as the modules keep
// them); x and dy have the benchmarked dtype.
struct Inputs {
  Tensor x, dy, norm_weight, norm_bias, bn_weight, bn_bias, alpha, running_mean, running_var;
  OptTensor nb() const { return norm_bias.defined() ? OptTensor(norm_bias) : std::nullopt; }
};

Inputs make_inputs(int64_t rows, int64_t channels, at::ScalarType dtype, at::Device device) {
  at::manual_seed(0);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  Inputs in;
  in.x = (at::randn({rows, channels}, f32) * 2 + 0.5).to(dtype);
  in.dy = at::randn({rows, channels}, f32).to(dtype);
  in.norm_weight = 1 + 0.1 * at::randn({channels}, f32);
  if (g_opt.norm == "layer") in.norm_bias = 0.1 * at::randn({channels}, f32);
  in.bn_weight = 1 + 0.1 * at::randn({channels}, f32);
  in.bn_bias = 0.1 * at::randn({channels}, f32);
  in.alpha = at::full({1}, 0.8, f32);
  in.running_mean = at::zeros({channels}, f32);
  in.running_var = at::ones({channels}, f32);
  return in;
}

// slab: training forward (statistics + output, then the running-stat update that
// slab::bn_update_running_stats does in Python: two lerps).
Tensors6 slab_forward(Inputs& in) {
  auto out = ops().fwd.call(in.x, in.norm_weight, in.nb(), in.bn_weight, in.bn_bias, in.alpha, in.running_mean,
                            in.running_var, g_opt.lam, true, kEps, kNormEps, g_opt.norm, std::nullopt);
  in.running_mean.lerp_(std::get<3>(out), kMomentum);
  in.running_var.lerp_(std::get<5>(out), kMomentum);
  return out;
}

Tensors6 slab_backward(const Inputs& in, const Tensors6& f) {
  return ops().bwd.call(in.dy, in.x, in.norm_weight, in.bn_weight, in.alpha, std::get<1>(f), std::get<2>(f),
                        std::get<3>(f), std::get<4>(f), g_opt.lam, true, g_opt.norm, std::nullopt);
}

Tensor norm1(const Tensor& x, const Tensor& w, const Tensor& b) {
  if (g_opt.norm == "layer") return at::layer_norm(x, {x.size(-1)}, w, b, kNormEps);
  return at::rms_norm(x, {x.size(-1)}, w, kNormEps);
}

// The eager composite SLAB's LinearNorm computes: lam * Norm1(x) + (1 - lam) * (BN(x) + alpha * x).
Tensor aten_forward(const Tensor& x, const Tensor& nw, const Tensor& nb, const Tensor& bw, const Tensor& bb,
                    const Tensor& alpha, Tensor& rm, Tensor& rv) {
  const Tensor bn = at::batch_norm(x, bw, bb, rm, rv, /*training=*/true, kMomentum, kEps, /*cudnn_enabled=*/true);
  return g_opt.lam * norm1(x, nw, nb) + (1.0 - g_opt.lam) * (bn + alpha * x);
}

// ---- verification ------------------------------------------------------------------------------
bool verify(int64_t rows, int64_t channels, int64_t dt, int64_t dev) {
  const auto device = device_of(dev);
  const auto dtype = kDtypes[dt];
  Inputs in = make_inputs(rows, channels, dtype, device);
  const Tensor rm0 = in.running_mean.clone(), rv0 = in.running_var.clone();
  Tensors6 f, g;
  {
    c10::InferenceMode guard;
    f = slab_forward(in);
    g = slab_backward(in, f);
  }
  // Reference: the composite in float64 on the same (rounded) inputs, gradients by autograd.
  auto leaf = [](const Tensor& t) { return t.detach().to(at::kDouble).requires_grad_(true); };
  Tensor x = leaf(in.x), nw = leaf(in.norm_weight), bw = leaf(in.bn_weight), bb = leaf(in.bn_bias), al = leaf(in.alpha);
  Tensor nb = in.norm_bias.defined() ? leaf(in.norm_bias) : Tensor();
  Tensor rm = rm0.to(at::kDouble), rv = rv0.to(at::kDouble);
  const Tensor y = aten_forward(x, nw, nb, bw, bb, al, rm, rv);
  std::vector<Tensor> wrt{x, nw, bw, bb, al};
  if (nb.defined()) wrt.push_back(nb);
  const auto grads = torch::autograd::grad({y}, wrt, {in.dy.to(at::kDouble)});

  const Tol tol = tolerance(dtype);
  const Tol f32{1e-4, 1e-4};  // float32 statistics and weight gradients
  std::string report;
  bool ok = close("y", std::get<0>(f), y, tol, report);
  ok &= close("bn_mean", std::get<3>(f), x.detach().mean(0), f32, report);
  ok &= close("running_var", in.running_var, rv, f32, report);
  ok &= close("dx", std::get<0>(g), grads[0], tol, report);
  ok &= close("d_norm_weight", std::get<1>(g), grads[1], tol, report);
  ok &= close("d_bn_weight", std::get<3>(g), grads[2], tol, report);
  ok &= close("d_bn_bias", std::get<4>(g), grads[3], tol, report);
  ok &= close("d_alpha", std::get<5>(g), grads[4], tol, report);
  if (nb.defined()) ok &= close("d_norm_bias", std::get<2>(g), grads[5], tol, report);
  std::fprintf(stderr, "verify %lldx%lld %s %s norm=%s: %s (max abs err:%s)\n", (long long)rows, (long long)channels,
               kDtypeNames[dt], kDeviceNames[dev], g_opt.norm.c_str(), ok ? "OK" : "FAILED", report.c_str());
  return ok;
}

// ---- timing ------------------------------------------------------------------------------------
enum class Provider { kSlab, kAten, kLayerNorm };

// Bytes the algorithm moves and its absolute floor (one read of each input, one write of each
// output), in tensor passes of rows x channels elements.
std::pair<double, double> passes(Provider p, bool backward) {
  const double floor = backward ? 5 : 2;                 // fwd: x, y; + bwd: x, dy, dx
  if (p == Provider::kLayerNorm) return {floor, floor};  // per-row: one pass each way
  return {backward ? 8.0 : 3.0, floor};                  // fwd: stats pass + output pass; bwd: reduce pass + dx pass
}

void run_benchmark(benchmark::State& state, Provider provider, bool backward) {
  const int64_t rows = state.range(0), channels = state.range(1), dt = state.range(2), dev = state.range(3);
  const auto device = device_of(dev);
  const auto dtype = kDtypes[dt];
  state.SetLabel(std::string(kDtypeNames[dt]) + " " + kDeviceNames[dev]);
  Inputs in = make_inputs(rows, channels, dtype, device);

  std::function<void()> step;
  Tensor xg, nwg, nbg, bwg, bbg, alg;
  if (backward && provider != Provider::kSlab) {  // autograd leaves for the ATen providers
    xg = in.x.detach().requires_grad_(true);
    nwg = in.norm_weight.detach().requires_grad_(true);
    nbg = in.norm_bias.defined() ? in.norm_bias.detach().requires_grad_(true) : Tensor();
    bwg = in.bn_weight.detach().requires_grad_(true);
    bbg = in.bn_bias.detach().requires_grad_(true);
    alg = in.alpha.detach().requires_grad_(true);
  }
  switch (provider) {
    case Provider::kSlab:
      step = [&, backward] {
        c10::InferenceMode guard;  // the slab ops carry their autograd in Python; none needed here
        auto f = slab_forward(in);
        if (backward) benchmark::DoNotOptimize(std::get<0>(slab_backward(in, f)).data_ptr());
        benchmark::DoNotOptimize(std::get<0>(f).data_ptr());
      };
      break;
    case Provider::kAten:
      step = [&, backward] {
        if (!backward) {
          c10::InferenceMode guard;
          benchmark::DoNotOptimize(aten_forward(in.x, in.norm_weight, in.norm_bias, in.bn_weight, in.bn_bias, in.alpha,
                                                in.running_mean, in.running_var)
                                       .data_ptr());
          return;
        }
        const Tensor y = aten_forward(xg, nwg, nbg, bwg, bbg, alg, in.running_mean, in.running_var);
        std::vector<Tensor> wrt{xg, nwg, bwg, bbg, alg};
        if (nbg.defined()) wrt.push_back(nbg);
        benchmark::DoNotOptimize(torch::autograd::grad({y}, wrt, {in.dy})[0].data_ptr());
      };
      break;
    case Provider::kLayerNorm:
      step = [&, backward] {
        if (!backward) {
          c10::InferenceMode guard;
          benchmark::DoNotOptimize(norm1(in.x, in.norm_weight, in.norm_bias).data_ptr());
          return;
        }
        const Tensor y = norm1(xg, nwg, nbg);
        std::vector<Tensor> wrt{xg, nwg};
        if (nbg.defined()) wrt.push_back(nbg);
        benchmark::DoNotOptimize(torch::autograd::grad({y}, wrt, {in.dy})[0].data_ptr());
      };
      break;
  }

  // Bytes in tensor passes of rows x channels elements.
  const auto [moved, floor] = passes(provider, backward);
  const double tensor_bytes = static_cast<double>(rows * channels * in.x.element_size());
  timed_loop(state, device, step, {moved * tensor_bytes, floor * tensor_bytes});
}

void register_all() {
  struct Spec {
    const char* name;
    Provider provider;
    bool backward;
  };
  const Spec specs[] = {
      {"slab_fwd", Provider::kSlab, false},
      {"slab_fwd_bwd", Provider::kSlab, true},
      {"aten_fwd", Provider::kAten, false},
      {"aten_fwd_bwd", Provider::kAten, true},
      {"layer_norm_fwd", Provider::kLayerNorm, false},
      {"layer_norm_fwd_bwd", Provider::kLayerNorm, true},
  };
  for (const auto& s : specs) {
    for (int64_t dev : g_opt.common.devices) {
      auto* b = register_on(s.name, dev, [s](benchmark::State& st) { run_benchmark(st, s.provider, s.backward); });
      b->ArgNames({"rows", "channels", "dtype", "device"});
      if (g_opt.rows.empty()) {
        for (const auto& [r, c] : g_opt.shapes) b->ArgsProduct({{r}, {c}, g_opt.common.dtypes, {dev}});
      } else {
        b->ArgsProduct({g_opt.rows, g_opt.channels, g_opt.common.dtypes, {dev}});
      }
    }
  }
}

std::vector<std::pair<int64_t, int64_t>> all_shapes() {
  if (!g_opt.rows.empty()) {
    std::vector<std::pair<int64_t, int64_t>> out;
    for (auto r : g_opt.rows)
      for (auto c : g_opt.channels) out.emplace_back(r, c);
    return out;
  }
  return g_opt.shapes;
}

}  // namespace

int main(int argc, char** argv) {
  parse_own_flags(&argc, argv);
  auto verify_all = [] {
    bool ok = true;
    for (int64_t dev : g_opt.common.devices)
      for (const auto& [r, c] : all_shapes())
        for (int64_t dt : g_opt.common.dtypes) ok &= verify(r, c, dt, dev);
    return ok;
  };
  return run_main(argc, argv, g_opt.common, verify_all, register_all,
                  {{"norm", g_opt.norm}, {"lam", std::to_string(g_opt.lam)}});
}
