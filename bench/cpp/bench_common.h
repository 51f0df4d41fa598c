// What the C++ benchmarks in bench/cpp share: command-line helpers (own flags stripped before
// Google Benchmark sees argv), the dtype/device tables, float64 verification, timing (CPU wall
// clock; CUDA events with the L2 cache flushed), the measured copy bandwidth, the timed loop that
// fills the bandwidth counters, and main()'s Google Benchmark setup. Header-only.
//
// Counters set by timed_loop (plain per-repetition values, so the repetition aggregates are taken
// over them like over the times):
//   GBps     bytes the provider's algorithm moves / time
//   frac_bw  that rate / the MEASURED copy bandwidth of the device (bytes read + written per second)
//   x_floor  time / (floor bytes / copy bandwidth); the floor reads every input once and writes
//            every output once, so 1.0 is the speed of light of a memory-bound op.
#pragma once

#include <benchmark/benchmark.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace slab_bench {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Benchmark argument values: dtype 0 float32, 1 bfloat16, 2 float16; device 0 cpu, 1 cuda.
inline const at::ScalarType kDtypes[] = {at::kFloat, at::kBFloat16, at::kHalf};
inline const char* const kDtypeNames[] = {"float32", "bfloat16", "float16"};
inline const char* const kDeviceNames[] = {"cpu", "cuda"};

inline at::Device device_of(int64_t dev) { return dev == 1 ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU); }

// ---- command line ------------------------------------------------------------------------------
// The name error messages start with; set by parse_flags.
inline std::string& program_name() {
  static std::string name = "bench";
  return name;
}

inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  return out;
}

[[noreturn]] inline void usage_error(const std::string& msg) {
  std::fprintf(stderr, "%s: %s\n", program_name().c_str(), msg.c_str());
  std::exit(2);
}

// A positive integer; -1 too when allow_minus_one (e.g. "one group per row").
inline int64_t to_int(const std::string& s, const char* flag, bool allow_minus_one = false) {
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  const bool ok = end != s.c_str() && *end == '\0' && (v > 0 || (allow_minus_one && v == -1));
  if (!ok) usage_error(std::string(flag) + ": bad positive integer '" + s + "'");
  return v;
}

inline int64_t dtype_index(const std::string& s) {
  if (s == "float32" || s == "fp32" || s == "float") return 0;
  if (s == "bfloat16" || s == "bf16") return 1;
  if (s == "float16" || s == "fp16" || s == "half") return 2;
  usage_error("--dtype: unknown dtype '" + s + "' (float32, bfloat16, float16)");
}

// "AxBxC,DxExF" -> {{A, B, C}, {D, E, F}}, each with exactly `dims` positive sizes.
inline std::vector<std::vector<int64_t>> parse_shapes(const std::string& list, size_t dims, const char* flag,
                                                      const char* form) {
  std::vector<std::vector<int64_t>> out;
  for (const auto& s : split(list, ',')) {
    const auto parts = split(s, 'x');
    if (parts.size() != dims) usage_error(std::string(flag) + ": expected " + form + ", got '" + s + "'");
    std::vector<int64_t> shape;
    for (const auto& p : parts) shape.push_back(to_int(p, flag));
    out.push_back(shape);
  }
  if (out.empty()) usage_error(std::string(flag) + ": no shape given");
  return out;
}

// "--name=value" -> value; anything else -> nullopt.
inline std::optional<std::string> flag_value(const std::string& arg, const char* name) {
  const std::string prefix = std::string(name) + "=";
  if (arg.rfind(prefix, 0) == 0) return arg.substr(prefix.size());
  return std::nullopt;
}

// True when slab's CUDA kernels (libslab_cuda.so) are registered and a GPU is present.
inline bool cuda_usable() {
  static const bool ok = [] {
    if (!at::hasCUDA()) return false;
    return c10::Dispatcher::singleton().findSchemaOrThrow("slab::cats", "").hasKernelForDispatchKey(
        c10::DispatchKey::CUDA);
  }();
  return ok;
}

// The flags every benchmark takes.
struct CommonFlags {
  std::vector<int64_t> dtypes{0, 1};  // float32, bfloat16
  std::vector<int64_t> devices;       // default: cpu, plus cuda when usable
  bool verify = true;
};

// Removes our flags from argv (Google Benchmark rejects unknown ones): --dtype, --device,
// --threads, --no-verify here, the benchmark's own through `own` (true = consumed). --help prints
// `help` and is passed on so that Google Benchmark lists its flags too.
inline void parse_flags(const char* name, int* argc, char** argv, CommonFlags& flags,
                        const std::function<bool(const std::string&)>& own, const char* help) {
  program_name() = name;
  int out = 1;
  bool devices_given = false;
  for (int i = 1; i < *argc; ++i) {
    const std::string a = argv[i];
    if (auto v = flag_value(a, "--dtype")) {
      flags.dtypes.clear();
      for (auto& s : split(*v, ',')) flags.dtypes.push_back(dtype_index(s));
    } else if (auto v = flag_value(a, "--device")) {
      devices_given = true;
      for (auto& s : split(*v, ',')) {
        if (s == "cpu") flags.devices.push_back(0);
        else if (s == "cuda") flags.devices.push_back(1);
        else usage_error("--device: unknown device '" + s + "' (cpu, cuda)");
      }
    } else if (auto v = flag_value(a, "--threads")) {
      at::set_num_threads(static_cast<int>(to_int(*v, "--threads")));
    } else if (a == "--no-verify") {
      flags.verify = false;
    } else if (a == "--help" || a == "-h") {
      std::fputs(help, stdout);
      argv[out++] = argv[i];
    } else if (!own(a)) {
      argv[out++] = argv[i];
    }
  }
  *argc = out;
  if (!devices_given) {
    flags.devices.push_back(0);
    if (cuda_usable()) flags.devices.push_back(1);
  }
  for (auto d : flags.devices)
    if (d == 1 && !cuda_usable()) usage_error("--device=cuda: no CUDA device, or this slab build has no CUDA kernels");
}

// The typed handle of a slab op; each benchmark looks its ops up once (a static Ops struct).
template <class Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// ---- verification ------------------------------------------------------------------------------
struct Tol {
  double atol, rtol;
};

// About one rounding of the output dtype (the ops accumulate in float32 and round once).
inline Tol tolerance(at::ScalarType t) {
  if (t == at::kBFloat16) return {4e-3, 1.6e-2};
  if (t == at::kHalf) return {5e-4, 2e-3};
  return {1e-4, 1e-4};
}

// |got - ref| <= atol * max(1, max|ref|) + rtol * |ref|, in float64 on the CPU. Appends
// " what <max abs err>" (and the worst element on failure) to `report`.
inline bool close(const char* what, const Tensor& got_in, const Tensor& ref_in, Tol tol, std::string& report) {
  const Tensor got = got_in.detach().to(at::kCPU, at::kDouble).reshape(-1);
  const Tensor ref = ref_in.detach().to(at::kCPU, at::kDouble).reshape(-1);
  char buf[256];
  if (got.numel() != ref.numel()) {
    std::snprintf(buf, sizeof buf, " %s: %lld elements, expected %lld;", what, (long long)got.numel(),
                  (long long)ref.numel());
    report += buf;
    return false;
  }
  if (got.numel() == 0) return true;
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
inline double copy_bandwidth(at::Device device) {
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

// 256 MiB, larger than any L2: zeroing it evicts the inputs of the previous iteration.
inline Tensor& l2_flush_buffer(at::Device device) {
  static Tensor buf;
  if (!buf.defined()) buf = at::empty({256 << 20}, at::TensorOptions().dtype(at::kByte).device(device));
  return buf;
}

// Bytes of one call: what the provider's algorithm moves, and the floor of the job.
struct Traffic {
  double moved, floor;
};

// Warms up, runs the timed loop (CPU wall clock over all iterations; CUDA events per iteration
// after an L2 flush, for UseManualTime) and sets GBps / frac_bw / x_floor. Returns the seconds
// per iteration, for counters of the caller's own (FLOP rates).
inline double timed_loop(benchmark::State& state, at::Device device, const std::function<void()>& step,
                         Traffic bytes) {
  const double bw = copy_bandwidth(device);
  for (int i = 0; i < 2; ++i) step();  // warm-up: allocator, thread pool
  double seconds = 0;
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
  const double per_iter = seconds / static_cast<double>(std::max<int64_t>(1, state.iterations()));
  state.SetBytesProcessed(static_cast<int64_t>(static_cast<double>(state.iterations()) * bytes.moved));
  state.counters["GBps"] = bytes.moved / per_iter / 1e9;
  state.counters["frac_bw"] = bytes.moved / per_iter / bw;
  state.counters["x_floor"] = per_iter / (bytes.floor / bw);
  return per_iter;
}

// Registers `fn` as "<name>/cpu" or "<name>/cuda" with the timing that device needs: CUDA events
// (manual time) on a GPU, wall clock on the CPU (UseRealTime: the ops run on torch's thread pool,
// so the main thread's CPU time would undercount).
inline benchmark::internal::Benchmark* register_on(const std::string& name, int64_t dev,
                                                   std::function<void(benchmark::State&)> fn,
                                                   benchmark::TimeUnit cpu_unit = benchmark::kMillisecond) {
  const std::string full = name + (dev == 1 ? "/cuda" : "/cpu");
  auto* b = benchmark::RegisterBenchmark(full.c_str(), std::move(fn));
  if (dev == 1) return b->UseManualTime()->Unit(benchmark::kMicrosecond);
  return b->UseRealTime()->Unit(cpu_unit);
}

// ---- main --------------------------------------------------------------------------------------
// After parse_flags: hands argv to Google Benchmark with our defaults in front (a later flag
// wins), verifies (exit 1 before timing on a mismatch), records the context (torch, threads,
// `context`, the copy bandwidth of each device), registers and runs the benchmarks.
inline int run_main(int argc, char** argv, const CommonFlags& flags, const std::function<bool()>& verify_all,
                    const std::function<void()>& register_all,
                    const std::vector<std::pair<std::string, std::string>>& context = {}) {
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

  if (flags.verify && !verify_all()) {
    std::fprintf(stderr, "%s: verification FAILED; not timing\n", program_name().c_str());
    return 1;
  }

  benchmark::AddCustomContext("torch", TORCH_VERSION);
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("slab_cuda_kernels", cuda_usable() ? "yes" : "no");
  for (const auto& [key, value] : context) benchmark::AddCustomContext(key, value);
  for (int64_t dev : flags.devices) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.1f", copy_bandwidth(device_of(dev)) / 1e9);
    benchmark::AddCustomContext(std::string("copy_GBps_") + kDeviceNames[dev], buf);
  }
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace slab_bench
