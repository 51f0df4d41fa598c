// C++ benchmark of the SLA kernels (simplified linear attention, SLAB: slab::sla_forward, sla_backward,
// sla_step) through the PyTorch dispatcher, against the eager ATen composites SLAB's modules
// compute and against softmax attention (at::scaled_dot_product_attention). Google Benchmark
// drives the timing; the shared machinery (flags, verification, timing, counters) is bench_common.h.
//
//   bench_sla [--shapes=4x16x1024x64,1x16x4096x64] [--dtype=float32,bfloat16,float16]
//             [--device=cpu,cuda] [--threads=N] [--no-verify] [Google Benchmark flags...]
//
// Every (shape, dtype, device) configuration is first verified against float64 ATen: the causal
// forward (o, den, final state, z) and backward (dq, dk, dv by autograd of the composite), the
// non-causal forward, and one decode step (o, updated state and z); a mismatch exits with status
// 1 before anything is timed.
//
// Benchmarks (arguments B/H/N/D/dtype/device; dtype 0 float32, 1 bfloat16, 2 float16; device 0
// cpu, 1 cuda; Dv = D):
//   slab_causal_fwd, slab_causal_fwd_bwd, slab_fwd (non-causal), slab_step (one decode token
//   after a prefix of N tokens; microseconds);
//   aten_causal_fwd, aten_causal_fwd_bwd: relu, tril(phi(q) phi(k)^T), (s @ v) / (s.sum(-1) + eps),
//     backward by torch::autograd::grad;
//   aten_fwd: the non-causal composite (phi(q) (phi(k)^T v)) / (phi(q) . sum_j phi(k_j) + eps);
//   aten_step: the same decode step in ATen ops (state += phi(k)^T v, z += phi(k), then o);
//   sdpa_causal_fwd, sdpa_causal_fwd_bwd: at::scaled_dot_product_attention(is_causal=true), the
//     softmax attention SLA replaces (a speed reference, not the same function).
//
// Counters (see bench_common.h): GBps, frac_bw, x_floor, and GFLOPs.
//   floor: read q, k, v (+ grad_o) once, write o (+ dq, dk, dv) once; decode: read q, k, v and the
//     float32 state and z, write o, state and z.
//   moved: slab -- every op's inputs and outputs (+ den, the final state and z of sla_forward, read
//     back by sla_backward); references -- the floor (their N x N intermediates are not counted).
//   GFLOPs: the useful FLOPs of slab's chunked algorithm (2 per multiply-add; the O(D) terms of z
//     and the denominators left out) over the time, for every provider -- for the references an
//     effective rate of the same job, not their own arithmetic. Per (batch, head), per token, with
//     chunks of C = min(64, N) tokens and t = (C + 1) / 2 keys seen per query inside its chunk:
//       causal fwd      2 D Dv (phi(q) S_prev, S += phi(k) v^T) + t (D + Dv) (masked chunk scores, scores @ v)
//       causal bwd      5 D Dv (dq, dk, dv from the states, S and dS running sums)
//                       + t (3 D + 2 Dv) (scores and grad_o v^T recomputed; dq, dk, dv inside the chunk)
//       non-causal fwd  min(N (D + Dv), 2 D Dv): the order the kernel picks (use_quadratic)
//       decode step     2 D Dv per head (state update, phi(q) S)
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "bench_common.h"

namespace {

using namespace slab_bench;

// Signatures of the schemas in csrc/sla/sla_ops.cpp.
using FwdFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                         double eps, const OptTensor& mask);
using BwdFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor& grad_o, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const Tensor& o, const Tensor& den, bool causal,
                                                 const OptTensor& mask);
using StepFn = Tensor(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& state, Tensor& z, double eps);

constexpr double kEps = 1e-6;   // SLAB's
constexpr int64_t kChunk = 64;  // the causal chunk of the CPU kernels (kChunkCpu), for the FLOP count

// ---- options -----------------------------------------------------------------------------------
struct Options {
  CommonFlags common;
  std::vector<std::vector<int64_t>> shapes;  // (B, H, N, D)
};
Options g_opt;

const char kHelp[] =
    "bench_sla: SLA kernels (slab) vs the ATen composites vs at::scaled_dot_product_attention\n"
    "  --shapes=BxHxNxD,... batch x heads x tokens x head dim (default 4x16x1024x64,1x16x4096x64;\n"
    "                       vision, DeiT-S 224px: 64x6x196x64)\n"
    "  --dtype=float32,bfloat16,float16 (default float32,bfloat16)\n"
    "  --device=cpu,cuda    (default cpu, plus cuda when slab has CUDA kernels and a GPU is present)\n"
    "  --threads=N --no-verify\n"
    "  plus Google Benchmark flags, e.g. --benchmark_filter=causal --benchmark_format=json\n"
    "  --benchmark_repetitions=N --benchmark_min_time=T (see --help below)\n\n";

void parse_own_flags(int* argc, char** argv) {
  std::string shapes = "4x16x1024x64,1x16x4096x64";  // LM batch, long context
  auto own = [&](const std::string& a) {
    auto v = flag_value(a, "--shapes");
    if (v) shapes = *v;
    return v.has_value();
  };
  parse_flags("bench_sla", argc, argv, g_opt.common, own, kHelp);
  g_opt.shapes = parse_shapes(shapes, 4, "--shapes", "BxHxNxD");
}

// ---- the ops -----------------------------------------------------------------------------------
// Typed handles of the benchmarked ops, looked up once.
struct Ops {
  c10::TypedOperatorHandle<FwdFn> fwd = find_op<FwdFn>("slab::sla_forward");
  c10::TypedOperatorHandle<BwdFn> bwd = find_op<BwdFn>("slab::sla_backward");
  c10::TypedOperatorHandle<StepFn> step = find_op<StepFn>("slab::sla_step");
};
const Ops& ops() {
  static const Ops handles;
  return handles;
}

// Causal composite: masked scores normalised by their row sums (the eager form of SLAB's causal
// SLA; N x N scores).
Tensor causal_composite(const Tensor& q, const Tensor& k, const Tensor& v) {
  const Tensor s = at::matmul(at::relu(q), at::relu(k).transpose(-2, -1)).tril();
  return at::matmul(s, v) / (s.sum(-1, /*keepdim=*/true) + kEps);
}

// Non-causal composite in SLAB's order: phi(q) (phi(k)^T v) / (phi(q) . sum_j phi(k_j) + eps).
Tensor linear_composite(const Tensor& q, const Tensor& k, const Tensor& v) {
  const Tensor pq = at::relu(q), pk = at::relu(k);
  const Tensor den = at::matmul(pq, pk.sum(-2).unsqueeze(-1)) + kEps;  // (B, H, N, 1)
  return at::matmul(pq, at::matmul(pk.transpose(-2, -1), v)) / den;
}

// One decode token in ATen ops, updating state (B, H, D, Dv) and z (B, H, D) in place; q, k, v
// are (B, H, 1, X). Computed in the state's dtype, o returned in q's.
Tensor composite_step(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& state, Tensor& z) {
  const Tensor pk = at::relu(k).to(state.scalar_type()), pq = at::relu(q).to(state.scalar_type());
  state.add_(at::matmul(pk.transpose(-2, -1), v.to(state.scalar_type())));
  z.add_(pk.squeeze(-2));
  const Tensor den = at::matmul(pq, z.unsqueeze(-1)) + kEps;  // (B, H, 1, 1)
  return (at::matmul(pq, state) / den).to(q.scalar_type());
}

Tensor sdpa_causal(const Tensor& q, const Tensor& k, const Tensor& v) {
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0, /*is_causal=*/true);
}

// Inputs of one configuration: q, k, v and the output gradient in the benchmarked dtype; one
// decode token and the float32 decode state (S, z) after the N-token prefix.
struct Inputs {
  Tensor q, k, v, dout;
  Tensor q1, k1, v1, state, z;
};

Inputs make_inputs(const std::vector<int64_t>& shape, at::ScalarType dtype, at::Device device) {
  at::manual_seed(0);
  const int64_t B = shape[0], H = shape[1], N = shape[2], D = shape[3];
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  Inputs in;
  in.q = at::randn({B, H, N, D}, f32).to(dtype);
  in.k = at::randn({B, H, N, D}, f32).to(dtype);
  in.v = at::randn({B, H, N, D}, f32).to(dtype);
  in.dout = at::randn({B, H, N, D}, f32).to(dtype);
  in.q1 = at::randn({B, H, 1, D}, f32).to(dtype);
  in.k1 = at::randn({B, H, 1, D}, f32).to(dtype);
  in.v1 = at::randn({B, H, 1, D}, f32).to(dtype);
  const Tensor pk = at::relu(in.k).to(at::kFloat);
  in.state = at::matmul(pk.transpose(-2, -1), in.v.to(at::kFloat)).contiguous();
  in.z = pk.sum(-2).contiguous();
  return in;
}

// ---- verification ------------------------------------------------------------------------------
// The float64 reference of the causal forward and its gradients. The composite needs N x N
// scores, so it runs on slices of (batch x head) rows of at most ~256 MB of scores each.
struct CausalRef {
  Tensor o, dq, dk, dv;
};

CausalRef causal_reference(const Inputs& in) {
  const auto sizes = in.q.sizes();
  const int64_t rows = sizes[0] * sizes[1], N = sizes[2];
  auto flat = [&](const Tensor& t) { return t.detach().to(at::kCPU, at::kDouble).reshape({rows, N, t.size(-1)}); };
  const Tensor q = flat(in.q), k = flat(in.k), v = flat(in.v), dout = flat(in.dout);
  const int64_t step = std::max<int64_t>(1, (int64_t{32} << 20) / (N * N));
  std::vector<Tensor> o, dq, dk, dv;
  for (int64_t r = 0; r < rows; r += step) {
    const int64_t n = std::min(step, rows - r);
    auto leaf = [&](const Tensor& t) { return t.narrow(0, r, n).clone().requires_grad_(true); };
    const Tensor qs = leaf(q), ks = leaf(k), vs = leaf(v);
    const Tensor os = causal_composite(qs, ks, vs);
    const auto g = torch::autograd::grad({os}, {qs, ks, vs}, {dout.narrow(0, r, n)});
    o.push_back(os.detach()), dq.push_back(g[0]), dk.push_back(g[1]), dv.push_back(g[2]);
  }
  return {at::cat(o).view(sizes), at::cat(dq).view(sizes), at::cat(dk).view(sizes), at::cat(dv).view(sizes)};
}

// Checks slab's causal forward + backward, non-causal forward and decode step of one
// configuration against float64 ATen on the same (rounded) inputs.
bool verify(const std::vector<int64_t>& shape, int64_t dt, int64_t dev) {
  const auto dtype = kDtypes[dt];
  Inputs in = make_inputs(shape, dtype, device_of(dev));
  c10::InferenceMode guard;  // slab's ops only; the autograd reference is built below without it
  const auto [o, den, state, z] = ops().fwd.call(in.q, in.k, in.v, true, kEps, std::nullopt);
  const auto [dq, dk, dv] = ops().bwd.call(in.dout, in.q, in.k, in.v, o, den, true, std::nullopt);
  const Tensor o_nc = std::get<0>(ops().fwd.call(in.q, in.k, in.v, false, kEps, std::nullopt));
  Tensor state1 = in.state.clone(), z1 = in.z.clone();
  const Tensor o_step = ops().step.call(in.q1, in.k1, in.v1, state1, z1, kEps);

  auto d64 = [](const Tensor& t) { return t.detach().to(at::kCPU, at::kDouble); };
  CausalRef ref;
  {
    c10::InferenceMode off(false);
    ref = causal_reference(in);
  }
  const Tensor pq = at::relu(d64(in.q)), pk = at::relu(d64(in.k));
  const Tensor ref_den = (pq * pk.cumsum(-2)).sum(-1) + kEps;
  const Tensor ref_state = at::matmul(pk.transpose(-2, -1), d64(in.v)), ref_z = pk.sum(-2);
  Tensor s64 = d64(in.state), z64 = d64(in.z);
  const Tensor ref_step = composite_step(d64(in.q1), d64(in.k1), d64(in.v1), s64, z64);

  const Tol tol = tolerance(dtype);
  const Tol f32{1e-4, 1e-4};  // float32 denominators and states
  std::string report;
  bool ok = close("causal o", o, ref.o, tol, report);
  ok &= close("den", den, ref_den, f32, report);
  ok &= close("state", state, ref_state, f32, report);
  ok &= close("z", z, ref_z, f32, report);
  ok &= close("dq", dq, ref.dq, tol, report);
  ok &= close("dk", dk, ref.dk, tol, report);
  ok &= close("dv", dv, ref.dv, tol, report);
  ok &= close("non-causal o", o_nc, linear_composite(d64(in.q), d64(in.k), d64(in.v)), tol, report);
  ok &= close("step o", o_step, ref_step, tol, report);
  ok &= close("step state", state1, s64, f32, report);
  ok &= close("step z", z1, z64, f32, report);
  std::fprintf(stderr, "verify %lldx%lldx%lldx%lld %s %s: %s (max abs err:%s)\n", (long long)shape[0],
               (long long)shape[1], (long long)shape[2], (long long)shape[3], kDtypeNames[dt], kDeviceNames[dev],
               ok ? "OK" : "FAILED", report.c_str());
  return ok;
}

// ---- timing ------------------------------------------------------------------------------------
enum class Provider { kSlab, kAten, kSdpa };
enum class Kind { kCausalFwd, kCausalFwdBwd, kFwd, kStep };

struct Dims {
  double B, H, N, D, Dv;
};

// Useful FLOPs of slab's algorithm for `kind` (see the top of the file).
double flops(Kind kind, const Dims& d) {
  const double t = (std::min<double>(kChunk, d.N) + 1) / 2;
  const double fwd = 2 * d.D * d.Dv + t * (d.D + d.Dv);
  double macs_per_token = 0;
  switch (kind) {
    case Kind::kCausalFwd:
      macs_per_token = fwd;
      break;
    case Kind::kCausalFwdBwd:
      macs_per_token = fwd + 5 * d.D * d.Dv + t * (3 * d.D + 2 * d.Dv);
      break;
    case Kind::kFwd:
      macs_per_token = std::min(d.N * (d.D + d.Dv), 2 * d.D * d.Dv);
      break;
    case Kind::kStep:
      return 2 * d.B * d.H * 2 * d.D * d.Dv;  // one token
  }
  return 2 * d.B * d.H * d.N * macs_per_token;
}

// Bytes moved by `provider` and the floor of the job (see the top of the file); e = element size.
Traffic traffic(Provider provider, Kind kind, const Dims& d, double e) {
  const double rows = d.B * d.H * d.N, heads = d.B * d.H;
  const double state = heads * (d.D * d.Dv + d.D) * 4;  // float32 S and z
  if (kind == Kind::kStep) {
    const double b = heads * (2 * d.D + 2 * d.Dv) * e + 2 * state;
    return {b, b};
  }
  const double fwd = rows * (2 * d.D + 2 * d.Dv) * e;  // q, k, v, o
  const double floor = kind == Kind::kCausalFwdBwd ? rows * (4 * d.D + 4 * d.Dv) * e : fwd;
  if (provider != Provider::kSlab) return {floor, floor};
  const double slab_fwd = fwd + rows * 4 + state;  // + den, final state and z
  if (kind != Kind::kCausalFwdBwd) return {slab_fwd, floor};
  // sla_backward reads grad_o, q, k, v, o, den and writes dq, dk, dv.
  return {slab_fwd + rows * ((2 * d.D + 3 * d.Dv) * e + 4) + rows * (2 * d.D + d.Dv) * e, floor};
}

// The timed call of slab's ops for `kind`.
std::function<void()> slab_call(Kind kind, Inputs& in) {
  return [&in, kind] {
    c10::InferenceMode guard;  // the ops' autograd lives in Python; the raw ops are timed here
    if (kind == Kind::kStep) {
      benchmark::DoNotOptimize(ops().step.call(in.q1, in.k1, in.v1, in.state, in.z, kEps).data_ptr());
      return;
    }
    const bool causal = kind != Kind::kFwd;
    const auto f = ops().fwd.call(in.q, in.k, in.v, causal, kEps, std::nullopt);
    if (kind == Kind::kCausalFwdBwd)
      benchmark::DoNotOptimize(
          std::get<0>(ops().bwd.call(in.dout, in.q, in.k, in.v, std::get<0>(f), std::get<1>(f), causal, std::nullopt))
              .data_ptr());
    benchmark::DoNotOptimize(std::get<0>(f).data_ptr());
  };
}

// The timed call of an ATen reference: `fn` (q, k, v) -> o; forward in inference mode, or
// forward + torch::autograd::grad for (dq, dk, dv).
std::function<void()> aten_call(Kind kind, Inputs& in, Tensor (*fn)(const Tensor&, const Tensor&, const Tensor&)) {
  if (kind == Kind::kStep)
    return [&in] {
      c10::InferenceMode guard;
      benchmark::DoNotOptimize(composite_step(in.q1, in.k1, in.v1, in.state, in.z).data_ptr());
    };
  if (kind != Kind::kCausalFwdBwd)
    return [&in, fn] {
      c10::InferenceMode guard;
      benchmark::DoNotOptimize(fn(in.q, in.k, in.v).data_ptr());
    };
  // Autograd leaves sharing the inputs' storage, made once (outside the timed calls).
  auto leaves = std::make_shared<std::vector<Tensor>>(std::vector<Tensor>{
      in.q.detach().requires_grad_(true), in.k.detach().requires_grad_(true), in.v.detach().requires_grad_(true)});
  return [&in, fn, leaves] {
    const auto& l = *leaves;
    const Tensor o = fn(l[0], l[1], l[2]);
    benchmark::DoNotOptimize(torch::autograd::grad({o}, l, {in.dout})[0].data_ptr());
  };
}

void run_benchmark(benchmark::State& state, Provider provider, Kind kind) {
  const std::vector<int64_t> shape{state.range(0), state.range(1), state.range(2), state.range(3)};
  const int64_t dt = state.range(4), dev = state.range(5);
  const auto device = device_of(dev);
  state.SetLabel(std::string(kDtypeNames[dt]) + " " + kDeviceNames[dev]);
  Inputs in = make_inputs(shape, kDtypes[dt], device);

  std::function<void()> step;
  if (provider == Provider::kSlab)
    step = slab_call(kind, in);
  else if (provider == Provider::kSdpa)
    step = aten_call(kind, in, sdpa_causal);
  else
    step = aten_call(kind, in, kind == Kind::kFwd ? linear_composite : causal_composite);

  const Dims d{double(shape[0]), double(shape[1]), double(shape[2]), double(shape[3]), double(shape[3])};
  const double seconds = timed_loop(state, device, step, traffic(provider, kind, d, double(in.q.element_size())));
  state.counters["GFLOPs"] = flops(kind, d) / seconds / 1e9;
}

void register_all() {
  struct Spec {
    const char* name;
    Provider provider;
    Kind kind;
  };
  const Spec specs[] = {
      {"slab_causal_fwd", Provider::kSlab, Kind::kCausalFwd},
      {"slab_causal_fwd_bwd", Provider::kSlab, Kind::kCausalFwdBwd},
      {"slab_fwd", Provider::kSlab, Kind::kFwd},
      {"slab_step", Provider::kSlab, Kind::kStep},
      {"aten_causal_fwd", Provider::kAten, Kind::kCausalFwd},
      {"aten_causal_fwd_bwd", Provider::kAten, Kind::kCausalFwdBwd},
      {"aten_fwd", Provider::kAten, Kind::kFwd},
      {"aten_step", Provider::kAten, Kind::kStep},
      {"sdpa_causal_fwd", Provider::kSdpa, Kind::kCausalFwd},
      {"sdpa_causal_fwd_bwd", Provider::kSdpa, Kind::kCausalFwdBwd},
  };
  for (const auto& s : specs) {
    for (int64_t dev : g_opt.common.devices) {
      // A decode step takes microseconds; the sequence benchmarks milliseconds.
      const auto unit = s.kind == Kind::kStep ? benchmark::kMicrosecond : benchmark::kMillisecond;
      auto* b = register_on(s.name, dev, [s](benchmark::State& st) { run_benchmark(st, s.provider, s.kind); }, unit);
      b->ArgNames({"B", "H", "N", "D", "dtype", "device"});
      for (const auto& sh : g_opt.shapes)
        b->ArgsProduct({{sh[0]}, {sh[1]}, {sh[2]}, {sh[3]}, g_opt.common.dtypes, {dev}});
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
  return run_main(argc, argv, g_opt.common, verify_all, register_all, {{"eps", "1e-6"}});
}
