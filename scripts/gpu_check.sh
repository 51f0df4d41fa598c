#!/usr/bin/env bash
# One command for a lent GPU machine (H100/H200, torch preinstalled, nothing downloadable):
#
#   bash scripts/gpu_check.sh            # from the repository root, fits in a 10-minute call
#
#   1. machine facts (nvidia-smi, torch, nvcc) and copy bandwidth (device-to-device, host<->device)
#   2. installs the prebuilt wheel $SLAB_WHEEL, else dist/slab_kernels-*.whl (built on the CPU
#      machine by `bash scripts/test.sh` with the CUDA kernels in; carry dist/ to the GPU machine):
#      no GPU time spent compiling. Without a wheel it builds slab with the machine's own torch:
#      SLAB_CUDA=1 SLAB_CUDA_ARCHS=90a pip install -v --no-build-isolation --no-deps .
#      (a fresh build directory, build/gpu-check, so the ptxas report is complete; checked with
#      scripts/check_ptxas.py)
#   3. every test (`python -m pytest tests`, CUDA tests included)
#   4. every Python benchmark bench/bench_*.py (with --device cuda / --quick when it takes them)
#      and the main job, slab-bench
#   5. C++ benchmarks (bench/cpp) only when Google Benchmark is installed on the machine
# Writes gpu_report.md and the logs (at most 8 files) to $OUT when set, else to build/gpu-check-out.
# Knobs: SLAB_CUDA_ARCHS (90a), SLAB_WERROR (OFF here: another torch/gcc may warn differently),
# SLAB_GPU_BUDGET (seconds for the whole script, default 570), PYTHON (default python3).
# Exits nonzero when the build, the tests, a benchmark or slab-bench failed.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1

out=${OUT:-$root/build/gpu-check-out}
mkdir -p "$out"
report=$out/gpu_report.md
py=${PYTHON:-python3}
budget=${SLAB_GPU_BUDGET:-570}
t_start=$(date +%s)
deadline=$(( t_start + budget ))

export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_BREAK_SYSTEM_PACKAGES=1
export SLAB_CUDA=1 SLAB_CUDA_ARCHS=${SLAB_CUDA_ARCHS:-90a} SLAB_WERROR=${SLAB_WERROR:-OFF}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
unset SLAB_LIBRARY

# ---- bookkeeping --------------------------------------------------------------------------------
declare -a rows=()   # "| step | status | seconds | log |"
declare -a notes=()  # markdown sections appended to the report
failed=0
left() { echo $(( deadline - $(date +%s) )); }
say() { printf '\n==== [gpu_check] %s (%ss left)\n' "$*" "$(left)"; }

# step NAME LOGFILE CAP_SECONDS CMD...: run CMD with a timeout of min(CAP, time left), log appended
step() {
  local name=$1 logf=$2 cap=$3; shift 3
  local t0 rc lim
  lim=$(left); (( lim > cap )) && lim=$cap
  if (( lim < 15 )); then
    rows+=("| $name | skipped (out of time) | 0 | |"); return 99
  fi
  say "$name (limit ${lim}s)"
  t0=$(date +%s)
  { echo "==== $name: $*"; } >>"$out/$logf"
  timeout -k 10 "$lim" "$@" >>"$out/$logf" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 )) status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT after ${lim}s"
  elif (( rc != 0 )); then status="FAILED (exit $rc)"
  fi
  echo "==== $name: $status in ${dt}s" >>"$out/$logf"
  tail -n 25 "$out/$logf"
  rows+=("| $name | $status | $dt | $logf |")
  write_report
  return $rc
}

fence() {  # fence FILE [LINES]: the last lines of FILE in a code block
  echo '```'
  tail -n "${2:-40}" "$1" 2>/dev/null | cut -c1-220
  echo '```'
}

write_report() {
  {
    echo "# slab GPU check — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Commit: \`$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)\`$(git -C "$root" status --porcelain 2>/dev/null | grep -q . && echo ' (with local changes)')." \
         "Built with SLAB_CUDA_ARCHS=$SLAB_CUDA_ARCHS, SLAB_WERROR=$SLAB_WERROR."
    echo
    [[ -s "$out/machine.txt" ]] && { echo "## Machine"; fence "$out/machine.txt" 60; echo; }
    echo "## Steps"
    echo "| step | status | seconds | log |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
    echo
    printf '%s\n' "${notes[@]}"
  } >"$report"
}

# ---- 1. machine ---------------------------------------------------------------------------------
say "machine"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || echo "nvidia-smi failed"
  echo "python: $(command -v "$py") $("$py" -c 'import sys; print(sys.version.split()[0])' 2>&1)"
  "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')" 2>&1
  echo "nvcc: $( (command -v nvcc && nvcc --version | tail -n 1) 2>&1 | tr '\n' ' ')"
  echo "cmake: $(cmake --version 2>&1 | head -n 1); ninja: $(ninja --version 2>&1); cores: $(nproc)"
  echo
  nvidia-smi 2>&1
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

bw_py=$(mktemp /tmp/slab_bandwidth.XXXXXX.py)
cat >"$bw_py" <<'EOF'
import statistics, torch
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible to torch")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.multi_processor_count} SMs, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")

def med_ms(fn, reps=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)

n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
ms = med_ms(lambda: b.copy_(a))
print(f"device-to-device copy, 1 GiB: {2 * n / ms / 1e6:.0f} GB/s counting read + write (median of 20, {ms:.3f} ms)")
m = 256 << 20
h = torch.empty(m, dtype=torch.uint8, pin_memory=True); d = torch.empty(m, dtype=torch.uint8, device="cuda")
ms = med_ms(lambda: d.copy_(h, non_blocking=True))
print(f"host-to-device copy, 256 MiB pinned: {m / ms / 1e6:.1f} GB/s")
ms = med_ms(lambda: h.copy_(d, non_blocking=True))
print(f"device-to-host copy, 256 MiB pinned: {m / ms / 1e6:.1f} GB/s")
EOF
step "copy bandwidth" machine.txt 60 "$py" "$bw_py"
rm -f "$bw_py"

# ---- 2. build (or install the prebuilt wheel) ---------------------------------------------------
rm -rf build/gpu-check
build_ok=0
wheel=${SLAB_WHEEL:-$(ls dist/slab_kernels-*.whl 2>/dev/null | head -n 1)}
if [[ -n "$wheel" ]]; then
  # A wheel built on the CPU machine (CUDA kernels in, torch's stable ABI): no GPU time compiling.
  if step "install prebuilt wheel $(basename "$wheel")" build.log 120 \
      "$py" -m pip install --no-deps --force-reinstall --no-index "$wheel"; then
    build_ok=1
  fi
elif step "build (sm_$SLAB_CUDA_ARCHS)" build.log 300 \
    "$py" -m pip install -v --no-build-isolation --no-deps --config-settings=build-dir=build/gpu-check . ; then
  build_ok=1
fi
if (( build_ok )); then
  if (cd / && "$py" -c "import slab; print('slab', slab.__version__, 'from', slab.__file__, '| cuda_available:', slab.cuda_available())") >>"$out/build.log" 2>&1; then
    tail -n 1 "$out/build.log"
  else
    build_ok=0; rows+=("| import slab | FAILED | 0 | build.log |"); tail -n 20 "$out/build.log"
  fi
fi
if [[ -z "$wheel" ]]; then  # a prebuilt wheel's ptxas report is in the CPU machine's CI log
  "$py" scripts/check_ptxas.py --archs "$SLAB_CUDA_ARCHS" --width 90 "$out/build.log" >"$out/ptxas.txt" 2>&1
  ptxas_rc=$?
  notes+=("## ptxas (sm_$SLAB_CUDA_ARCHS) — $([[ $ptxas_rc -eq 0 ]] && echo clean || echo PROBLEMS)" "$(fence "$out/ptxas.txt" 40)" "")
fi
write_report
(( build_ok )) || { failed=1; notes+=("## Build failed" "$(fence "$out/build.log" 60)" ""); write_report; }

# ---- 3. tests -----------------------------------------------------------------------------------
if (( build_ok )); then
  pytest_args=(-ra --durations=15)
  "$py" -c "import pytest_timeout" >/dev/null 2>&1 && pytest_args+=(--timeout=300)
  step "tests (all, CUDA included)" tests.log 330 "$py" -m pytest tests "${pytest_args[@]}" || failed=1
  summary=$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$out/tests.log" | tail -n 1)
  notes+=("## Tests" "Summary: \`${summary:-no summary line}\`" "" "$(fence <(sed -n '/short test summary info/,$p' "$out/tests.log") 40)" "")
  write_report
fi

# ---- 4. benchmarks ------------------------------------------------------------------------------
if (( build_ok )); then
  shopt -s nullglob
  benches=(bench/bench_*.py)
  shopt -u nullglob
  (( ${#benches[@]} )) || notes+=("## Benchmarks" "No bench/bench_*.py found." "")
  n_left=${#benches[@]}
  for b in "${benches[@]}"; do
    # a fair share of the time left, keeping ~150 s for slab-bench (the main job)
    cap=$(( ($(left) - 150) / n_left )); n_left=$(( n_left - 1 ))
    (( cap > 240 )) && cap=240
    (( cap < 45 )) && cap=45
    help=$(timeout 60 "$py" "$b" --help 2>&1 || true)
    args=()
    grep -q -- '--device' <<<"$help" && args+=(--device cuda)
    grep -q -- '--quick' <<<"$help" && args+=(--quick)
    step "$b ${args[*]}" bench.log "$cap" "$py" "$b" "${args[@]}" || failed=1
  done
  (( ${#benches[@]} )) && { notes+=("## Python benchmarks (tail of bench.log)" "$(fence "$out/bench.log" 80)" ""); write_report; }

  # the main job
  sb=$(command -v slab-bench || true)
  [[ -n "$sb" ]] || { [[ -x "$(dirname "$(command -v "$py")")/slab-bench" ]] && sb="$(dirname "$(command -v "$py")")/slab-bench"; }
  if [[ -n "$sb" ]]; then sbcmd=("$sb"); else sbcmd=("$py" -c "import sys; from slab.bench import main; sys.exit(main())"); fi
  sbhelp=$(timeout 60 "${sbcmd[@]}" --help 2>&1 || true)
  sbargs=()
  grep -q -- '--device' <<<"$sbhelp" && sbargs+=(--device cuda)
  step "slab-bench ${sbargs[*]}" slab-bench.log 180 "${sbcmd[@]}" "${sbargs[@]}" || failed=1
  notes+=("## slab-bench" "$(fence "$out/slab-bench.log" 60)" "")
  write_report
fi

# ---- 5. C++ benchmarks, when Google Benchmark is there ------------------------------------------
if (( build_ok )) && [[ -d bench/cpp ]]; then
  if [[ -f /usr/include/benchmark/benchmark.h || -n "$(find /usr /opt -name 'benchmarkConfig.cmake' -print -quit 2>/dev/null)" ]]; then
    torch_prefix=$("$py" -c "import torch, os; print(os.path.dirname(torch.__file__))")
    if step "C++ benchmarks: build" cpp-bench.log 200 cmake -S . -B build/gpu-check-cpp -G Ninja \
         -DCMAKE_BUILD_TYPE=Release -DSLAB_BUILD_BENCH=ON -DSLAB_CUDA=ON "-DSLAB_CUDA_ARCHS=$SLAB_CUDA_ARCHS" \
         "-DPython_EXECUTABLE=$(command -v "$py")" "-DCMAKE_PREFIX_PATH=$torch_prefix" \
       && step "C++ benchmarks: compile" cpp-bench.log 200 cmake --build build/gpu-check-cpp; then
      while IFS= read -r exe; do
        cargs=()
        timeout 30 "$exe" --help 2>&1 | grep -q -- '--device' && cargs+=(--device=cuda)
        step "C++ $(basename "$exe") ${cargs[*]}" cpp-bench.log 90 "$exe" "${cargs[@]}" || failed=1
      done < <(find build/gpu-check-cpp/bench -maxdepth 3 -type f -executable -name '*bench*' 2>/dev/null | sort)
    else
      failed=1
    fi
    notes+=("## C++ benchmarks (tail of cpp-bench.log)" "$(fence "$out/cpp-bench.log" 60)" "")
  else
    notes+=("## C++ benchmarks" "Skipped: Google Benchmark is not installed on this machine (bench/cpp needs it)." "")
  fi
fi

rows+=("| total | $([[ $failed -eq 0 ]] && echo ok || echo FAILED) | $(( $(date +%s) - t_start )) | |")
write_report
say "report: $report"
cat "$report"
exit "$failed"
