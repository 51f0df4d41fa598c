// C++ benchmark of the PRepBN kernels (slab::prep_bn_fwd / slab::prep_bn_bwd) through the
// PyTorch dispatcher, against the ATen composite SLAB's modules compute (layer_norm + batch_norm)
// and plain at::layer_norm. Google Benchmark drives the timing.
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
#include <benchmark/benchmark.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Signatures of the schemas in csrc/prepbn/prepbn_ops.cpp.
using FwdFn = Tensors6(const Tensor& x, const OptTensor& norm_weight, const OptTensor& norm_bias,
                       const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& alpha,
                       const Tensor& running_mean, const Tensor& running_var, double lam, bool training,
                       double eps, double norm_eps, c10::string_view norm, const OptTensor& mask);
using BwdFn = Tensors6(const Tensor& dy, const Tensor& x, const OptTensor& norm_weight, const Tensor& bn_weight,
                       const Tensor& alpha, const Tensor& row_mean, const Tensor& row_rstd, const Tensor& bn_mean,
                       const Tensor& bn_rstd, double lam, bool training, c10::string_view norm,
                       const OptTensor& mask);
using UpdateFn = void(Tensor& running_mean, Tensor& running_var, const Tensor& mean, const Tensor& var,
                      double momentum);

constexpr double kEps = 1e-5, kNormEps = 1e-6, kMomentum = 0.1;

// ---- options ---------------------------------------------------------------------------------
struct Options {
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (rows, channels), used when no --rows/--channels
  std::vector<int64_t> rows, channels;
  std::vector<int64_t> dtypes{0, 1};
  std::vector<int64_t> devices;
  std::string norm = "layer";
  double lam = 0.5;
  bool verify = true;
};
Options g_opt;

const at::ScalarType kDtypes[] = {at::kFloat, at::kBFloat16, at::kHalf};
const char* const kDtypeNames[] = {"float32", "bfloat16", "float16"};
const char* const kDeviceNames[] = {"cpu", "cuda"};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "bench_prepbn: %s\n", msg.c_str());
  std::exit(2);
}

int64_t to_int(const std::string& s, const char* flag) {
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (end == s.c_str() || *end != '\0' || v <= 0) usage_error(std::string(flag) + ": bad positive integer '" + s + "'");
  return v;
}

int64_t dtype_index(const std::string& s) {
  if (s == "float32" || s == "fp32" || s == "float") return 0;
  if (s == "bfloat16" || s == "bf16") return 1;
  if (s == "float16" || s == "fp16" || s == "half") return 2;
  usage_error("--dtype: unknown dtype '" + s + "' (float32, bfloat16, float16)");
}

bool cuda_usable() {
  static const bool ok = [] {
    if (!at::hasCUDA()) return false;
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow("slab::_compiled_with_cuda", "").typed<bool()>();
    return op.call();
  }();
  return ok;
}

// Removes our flags from argv (Google Benchmark rejects unknown ones) and fills g_opt.
void parse_own_flags(int* argc, char** argv) {
  int out = 1;
  bool devices_given = false;
  std::string shapes = "12544x384,4096x1024";  // DeiT-S (64 x 196 tokens, C 384), LM (8 x 512, C 1024)
  for (int i = 1; i < *argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> std::optional<std::string> {
      const std::string prefix = std::string(name) + "=";
      if (a.rfind(prefix, 0) == 0) return a.substr(prefix.size());
      return std::nullopt;
    };
    if (auto v = value("--shapes")) {
      shapes = *v;
    } else if (auto v = value("--rows")) {
      for (auto& s : split(*v, ',')) g_opt.rows.push_back(to_int(s, "--rows"));
    } else if (auto v = value("--channels")) {
      for (auto& s : split(*v, ',')) g_opt.channels.push_back(to_int(s, "--channels"));
    } else if (auto v = value("--dtype")) {
      g_opt.dtypes.clear();
      for (auto& s : split(*v, ',')) g_opt.dtypes.push_back(dtype_index(s));
    } else if (auto v = value("--device")) {
      devices_given = true;
      for (auto& s : split(*v, ',')) {
        if (s == "cpu") g_opt.devices.push_back(0);
        else if (s == "cuda") g_opt.devices.push_back(1);
        else usage_error("--device: unknown device '" + s + "' (cpu, cuda)");
      }
    } else if (auto v = value("--norm")) {
      if (*v != "layer" && *v != "rms") usage_error("--norm must be layer or rms");
      g_opt.norm = *v;
    } else if (auto v = value("--lam")) {
      g_opt.lam = std::atof(v->c_str());
      if (!(g_opt.lam >= 0 && g_opt.lam <= 1)) usage_error("--lam must be in [0, 1]");
    } else if (auto v = value("--threads")) {
      at::set_num_threads(static_cast<int>(to_int(*v, "--threads")));
    } else if (a == "--no-verify") {
      g_opt.verify = false;
    } else if (a == "--help" || a == "-h") {
      std::printf(
          "bench_prepbn: PRepBN kernels (slab) vs the ATen composite vs at::layer_norm\n"
          "  --shapes=RxC,...     rows x channels (default 12544x384,4096x1024 = DeiT-S, LM 8x512x1024)\n"
          "  --rows=R,... --channels=C,...   every combination (ArgsProduct) instead of --shapes\n"
          "  --dtype=float32,bfloat16,float16 (default float32,bfloat16)\n"
          "  --device=cpu,cuda    (default cpu, plus cuda when slab has CUDA kernels and a GPU is present)\n"
          "  --norm=layer|rms --lam=0.5 --threads=N --no-verify\n"
          "  plus Google Benchmark flags, e.g. --benchmark_filter=slab --benchmark_format=json\n"
          "  --benchmark_repetitions=N --benchmark_min_time=T (see --help below)\n\n");
      argv[out++] = argv[i];  // let Google Benchmark print its flags too
    } else {
      argv[out++] = argv[i];
    }
  }
  *argc = out;
  if (g_opt.rows.empty() != g_opt.channels.empty()) usage_error("give both --rows and --channels, or --shapes");
  if (g_opt.rows.empty()) {
    for (auto& s : split(shapes, ',')) {
      const auto rc = split(s, 'x');
      if (rc.size() != 2) usage_error("--shapes: expected ROWSxCHANNELS, got '" + s + "'");
      g_opt.shapes.emplace_back(to_int(rc[0], "--shapes"), to_int(rc[1], "--shapes"));
    }
  }
  if (!devices_given) {
    g_opt.devices.push_back(0);
    if (cuda_usable()) g_opt.devices.push_back(1);
  }
  for (auto d : g_opt.devices)
    if (d == 1 && !cuda_usable())
      usage_error("--device=cuda: no CUDA device, or this slab build has no CUDA kernels");
}

// ---- the ops -----------------------------------------------------------------------------------
const c10::TypedOperatorHandle<FwdFn>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("slab::prep_bn_fwd", "").typed<FwdFn>();
  return op;
}
const c10::TypedOperatorHandle<BwdFn>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("slab::prep_bn_bwd", "").typed<BwdFn>();
  return op;
}
const c10::TypedOperatorHandle<UpdateFn>& update_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("slab::bn_update_running_stats", "").typed<UpdateFn>();
  return op;
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

// slab: training forward (statistics + output, then the running-stat update).
Tensors6 slab_forward(Inputs& in) {
  auto out = fwd_op().call(in.x, in.norm_weight, in.nb(), in.bn_weight, in.bn_bias, in.alpha, in.running_mean,
                           in.running_var, g_opt.lam, true, kEps, kNormEps, g_opt.norm, std::nullopt);
  update_op().call(in.running_mean, in.running_var, std::get<3>(out), std::get<5>(out), kMomentum);
  return out;
}

Tensors6 slab_backward(const Inputs& in, const Tensors6& f) {
  return bwd_op().call(in.dy, in.x, in.norm_weight, in.bn_weight, in.alpha, std::get<1>(f), std::get<2>(f),
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
struct Tol {
  double atol, rtol;
};
Tol tolerance(at::ScalarType t) {
  if (t == at::kBFloat16) return {4e-3, 1.6e-2};
  if (t == at::kHalf) return {5e-4, 2e-3};
  return {1e-4, 1e-4};
}

// |got - ref| <= atol * max(1, max|ref|) + rtol * |ref|, in float64 on the CPU.
bool close(const char* what, const Tensor& got_in, const Tensor& ref_in, Tol tol, std::string& report) {
  const Tensor got = got_in.detach().to(at::kCPU, at::kDouble).reshape(-1);
  const Tensor ref = ref_in.detach().to(at::kCPU, at::kDouble).reshape(-1);
  char buf[256];
  if (got.numel() != ref.numel()) {
    std::snprintf(buf, sizeof buf, " %s: %lld elements, expected %lld;", what, (long long)got.numel(),
                  (long long)ref.numel());
    report += buf;
    return false;
  }
  const double scale = std::max(1.0, ref.abs().max().item<double>());
  const Tensor err = (got - ref).abs();
  const Tensor bound = tol.atol * scale + tol.rtol * ref.abs();
  const bool finite = at::isfinite(got).all().item<bool>();
  const int64_t bad = (err > bound).sum().item<int64_t>();
  const int64_t worst = (err - bound).argmax().item<int64_t>();
  std::snprintf(buf, sizeof buf, " %s %.1e", what, err.max().item<double>());
  report += buf;
  if (!finite || bad > 0) {
    std::snprintf(buf, sizeof buf, " [%s%lld beyond tol, worst at %lld: got %.6g expected %.6g]",
                  finite ? "" : "non-finite values, ", (long long)bad, (long long)worst,
                  got[worst].item<double>(), ref[worst].item<double>());
    report += buf;
    return false;
  }
  return true;
}

bool verify(int64_t rows, int64_t channels, int64_t dt, int64_t dev) {
  const auto device = dev == 1 ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
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
  Tensor x = leaf(in.x), nw = leaf(in.norm_weight), bw = leaf(in.bn_weight), bb = leaf(in.bn_bias),
         al = leaf(in.alpha);
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
  std::fprintf(stderr, "verify %lldx%lld %s %s norm=%s: %s (max abs err:%s)\n", (long long)rows,
               (long long)channels, kDtypeNames[dt], kDeviceNames[dev], g_opt.norm.c_str(), ok ? "OK" : "FAILED",
               report.c_str());
  return ok;
}

// ---- timing ------------------------------------------------------------------------------------
// Times fn() on `device`: CPU wall clock, CUDA events. Seconds.
template <class Fn>
double time_once(at::Device device, Fn&& fn) {
  if (device.is_cuda()) {
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    const c10::Stream stream = impl->getStream(device);
    c10::Event start(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    c10::Event end(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    start.record(stream);
    fn();
    end.record(stream);
    end.synchronize();
    return start.elapsedTime(end) * 1e-3;
  }
  const auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Measured copy bandwidth (bytes read + written per second) of a large tensor copy on `device`.
double copy_bandwidth(at::Device device) {
  static std::map<std::string, double> cache;
  const std::string key = device.str();
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  const int64_t bytes = device.is_cuda() ? (int64_t{1} << 30) : (int64_t{256} << 20);
  const Tensor src = at::ones({bytes / 4}, at::TensorOptions().dtype(at::kFloat).device(device));
  Tensor dst = at::empty_like(src);
  std::vector<double> t;
  for (int i = 0; i < 13; ++i) {
    const double s = time_once(device, [&] { dst.copy_(src); });
    if (i >= 3) t.push_back(s);
  }
  // The limit is the best run (a median drops with every other process on a shared machine).
  const double bw = 2.0 * static_cast<double>(bytes) / *std::min_element(t.begin(), t.end());
  cache[key] = bw;
  return bw;
}

Tensor& l2_flush_buffer(at::Device device) {
  static Tensor buf;
  if (!buf.defined()) buf = at::empty({256 << 20}, at::TensorOptions().dtype(at::kByte).device(device));
  return buf;
}

enum class Provider { kSlab, kAten, kLayerNorm };

// Bytes the algorithm moves and its absolute floor (one read of each input, one write of each
// output), in tensor passes of rows x channels elements.
std::pair<double, double> passes(Provider p, bool backward) {
  const double floor = backward ? 5 : 2;  // fwd: x, y; + bwd: x, dy, dx
  if (p == Provider::kLayerNorm) return {floor, floor};  // per-row: one pass each way
  return {backward ? 8.0 : 3.0, floor};  // fwd: stats pass + output pass; bwd: reduce pass + dx pass
}

void run_benchmark(benchmark::State& state, Provider provider, bool backward) {
  const int64_t rows = state.range(0), channels = state.range(1), dt = state.range(2), dev = state.range(3);
  const auto device = dev == 1 ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
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
          benchmark::DoNotOptimize(aten_forward(in.x, in.norm_weight, in.norm_bias, in.bn_weight, in.bn_bias,
                                                in.alpha, in.running_mean, in.running_var)
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

  const double bw = copy_bandwidth(device);
  for (int i = 0; i < 2; ++i) step();  // warm-up: allocator, thread pool
  double seconds = 0;  // the timed total, for counters that need the time per iteration
  if (device.is_cuda()) {
    Tensor& flush = l2_flush_buffer(device);
    for (auto _ : state) {
      flush.zero_();  // outside the timed events: inputs come from DRAM, not L2
      const double s = time_once(device, step);
      state.SetIterationTime(s);
      seconds += s;
    }
  } else {
    const auto t0 = std::chrono::steady_clock::now();
    for (auto _ : state) step();
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  // Plain per-repetition values (not Google Benchmark rates, which print a "/s" suffix); the
  // repetition aggregates (median, ...) are taken over them like over the times.
  const auto [moved, floor] = passes(provider, backward);
  const double tensor_bytes = static_cast<double>(rows * channels * in.x.element_size());
  const double per_iter = seconds / static_cast<double>(std::max<int64_t>(1, state.iterations()));
  state.SetBytesProcessed(static_cast<int64_t>(static_cast<double>(state.iterations()) * moved * tensor_bytes));
  state.counters["GBps"] = moved * tensor_bytes / per_iter / 1e9;
  state.counters["frac_bw"] = moved * tensor_bytes / per_iter / bw;
  state.counters["x_floor"] = per_iter / (floor * tensor_bytes / bw);
}

void register_all() {
  struct Spec {
    const char* name;
    Provider provider;
    bool backward;
  };
  const Spec specs[] = {
      {"slab_fwd", Provider::kSlab, false},         {"slab_fwd_bwd", Provider::kSlab, true},
      {"aten_fwd", Provider::kAten, false},         {"aten_fwd_bwd", Provider::kAten, true},
      {"layer_norm_fwd", Provider::kLayerNorm, false}, {"layer_norm_fwd_bwd", Provider::kLayerNorm, true},
  };
  for (const auto& s : specs) {
    for (int64_t dev : g_opt.devices) {
      const std::string name = std::string(s.name) + (dev == 1 ? "/cuda" : "/cpu");
      auto* b = benchmark::RegisterBenchmark(name.c_str(), [s](benchmark::State& st) {
        run_benchmark(st, s.provider, s.backward);
      });
      b->ArgNames({"rows", "channels", "dtype", "device"});
      if (g_opt.rows.empty()) {
        for (const auto& [r, c] : g_opt.shapes) b->ArgsProduct({{r}, {c}, g_opt.dtypes, {dev}});
      } else {
        b->ArgsProduct({g_opt.rows, g_opt.channels, g_opt.dtypes, {dev}});
      }
      if (dev == 1) {
        b->UseManualTime()->Unit(benchmark::kMicrosecond);
      } else {
        b->UseRealTime()->Unit(benchmark::kMillisecond);
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

  // Defaults in front of the user's flags (a later flag wins).
  std::vector<char*> args{argv[0]};
  static char reps[] = "--benchmark_repetitions=5";
  static char aggr[] = "--benchmark_display_aggregates_only=true";
  // Repetitions of all benchmarks in random order: a busy moment of a shared machine then lands on
  // random repetitions of every benchmark instead of all repetitions of one.
  static char interleave[] = "--benchmark_enable_random_interleaving=true";
  args.push_back(reps);
  args.push_back(aggr);
  args.push_back(interleave);
  for (int i = 1; i < argc; ++i) args.push_back(argv[i]);
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 2;

  if (g_opt.verify) {
    bool ok = true;
    for (int64_t dev : g_opt.devices)
      for (const auto& [r, c] : all_shapes())
        for (int64_t dt : g_opt.dtypes) ok &= verify(r, c, dt, dev);
    if (!ok) {
      std::fprintf(stderr, "bench_prepbn: verification FAILED; not timing\n");
      return 1;
    }
  }

  benchmark::AddCustomContext("torch", TORCH_VERSION);
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("slab_cuda_kernels", cuda_usable() ? "yes" : "no");
  benchmark::AddCustomContext("norm", g_opt.norm);
  benchmark::AddCustomContext("lam", std::to_string(g_opt.lam));
  for (int64_t dev : g_opt.devices) {
    const auto device = dev == 1 ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.1f", copy_bandwidth(device) / 1e9);
    benchmark::AddCustomContext(std::string("copy_GBps_") + kDeviceNames[dev], buf);
  }
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
