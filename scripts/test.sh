#!/usr/bin/env bash
# Install slab with its build tools into the current Python environment, then run the test suite.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k rep_bn -x    # extra arguments go to pytest
#
# - Installs the build tools (cmake, ninja, scikit-build-core), pytest and numpy; installs torch only
#   when none is importable ($SLAB_TORCH, default "torch").
# - Builds the wheel with `pip wheel -v --no-build-isolation --no-deps -w dist .` (so the torch that is
#   already installed is the one compiled against) and installs it. The build log goes to
#   build/pip-build.log ($SLAB_BUILD_LOG); its ptxas report is what scripts/check_ptxas.py reads.
# - Build options come from the environment: SLAB_CUDA (AUTO/ON/OFF, or 1/0), SLAB_CUDA_ARCHS
#   (default "80;89;90a"), SLAB_WERROR, SLAB_BUILD_BENCH. Extra pip arguments: $SLAB_PIP_ARGS.
# - Runs `python -m pytest tests` against the INSTALLED package (the sources live in python/slab,
#   so the repository root does not shadow it; SLAB_LIBRARY is unset). Fails when a test fails and
#   when no test ran (pytest exit 5).
# Python: $PYTHON, else `python`, else `python3`.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if [[ -n "${PYTHON:-}" ]]; then py=$PYTHON
elif command -v python >/dev/null 2>&1; then py=python
else py=python3
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1
unset SLAB_LIBRARY  # test the library that was just installed, not a developer's build
log=${SLAB_BUILD_LOG:-build/pip-build.log}
mkdir -p "$(dirname "$log")"

say() { printf '[test.sh] %s\n' "$*"; }
now() { date +%s; }
declare -a timings=()
t_start=$(now)

# ---- 1. build tools and test deps ---------------------------------------------------------------
t0=$(now)
say "python: $(command -v "$py") ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
pkgs=("cmake>=3.26" "ninja>=1.11" "scikit-build-core>=0.10" "pytest>=7" "transformers" "timm" "ultralytics" "scikit-learn" "tqdm" "matplotlib")
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  pkgs+=("${SLAB_TORCH:-torch}")
  say "no torch importable: installing ${SLAB_TORCH:-torch} as well"
fi
set +e
"$py" -m pip install --progress-bar off "${pkgs[@]}" 2>&1 | grep -vE '^Requirement already satisfied'
deps_rc=${PIPESTATUS[0]}
set -e
[[ $deps_rc -eq 0 ]] || { say "FAILED to install the build dependencies (pip exit $deps_rc)"; exit 1; }
"$py" -c "import torch; print('[test.sh] torch', torch.__version__, '(CUDA', (torch.version.cuda or 'none') + ')')"
timings+=("deps $(( $(now) - t0 ))s")

# ---- 2. build and install -----------------------------------------------------------------------
t0=$(now)
say "building: SLAB_CUDA=${SLAB_CUDA:-AUTO} SLAB_CUDA_ARCHS=${SLAB_CUDA_ARCHS:-<default>}" \
    "SLAB_WERROR=${SLAB_WERROR:-OFF} SLAB_BUILD_BENCH=${SLAB_BUILD_BENCH:-OFF}"
say "build log: $root/$log"
# Full output to the log; progress lines (ninja steps, slab's CMake messages, diagnostics) to the console.
set +e
# The one wheel (dist/), built with `pip wheel` and then installed: what users install and what
# .ci/run carries to other torch releases.
rm -rf dist
# shellcheck disable=SC2086  # SLAB_PIP_ARGS is a list of words
"$py" -m pip wheel -v --no-build-isolation --no-deps --progress-bar off -w dist ${SLAB_PIP_ARGS:-} . 2>&1 \
  | tee "$log" \
  | grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\] |slab: |[Ee]rror[: ]|FAILED|[Ww]arning[: ]|Successfully built|Saved '
build_rc=${PIPESTATUS[0]}
if [[ $build_rc -eq 0 ]]; then
  wheel=$(ls dist/slab_kernels-*.whl)
  "$py" -m pip install --no-deps --force-reinstall --progress-bar off "$wheel" 2>&1 | tail -n 1
  build_rc=${PIPESTATUS[0]}
fi
set -e
timings+=("build $(( $(now) - t0 ))s")
if [[ $build_rc -ne 0 ]]; then
  say "BUILD FAILED (pip exit $build_rc); last lines of $log:"
  tail -n 60 "$log" | sed 's/^/    /'
  say "full log: $root/$log"
  exit "$build_rc"
fi

# The package must be imported from site-packages, not from the source tree.
where=$(cd / && "$py" -c "import slab; print(slab.__file__)")
case "$where" in
  "$root"/python/*) say "slab is imported from the source tree ($where): unset PYTHONPATH"; exit 1 ;;
esac
(cd / && "$py" -c "import slab; print('[test.sh] slab', slab.__version__, 'from', slab.__file__, '| cuda_available:', slab.cuda_available())")

# ---- 3. tests ------------------------------------------------------------------------------------
t0=$(now)
say "running: $py -m pytest tests -ra $*"
rc=0
"$py" -m pytest tests -ra "$@" || rc=$?
timings+=("tests $(( $(now) - t0 ))s")
say "timings: ${timings[*]} (total $(( $(now) - t_start ))s); build log: $root/$log"
if [[ $rc -eq 5 ]]; then
  say "FAILED: pytest collected no tests (exit 5)"
elif [[ $rc -ne 0 ]]; then
  say "FAILED: pytest exit $rc"
fi
exit "$rc"
