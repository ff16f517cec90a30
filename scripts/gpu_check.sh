#!/usr/bin/env bash
# One command for a GPU machine: build lora_fused for the GPU at hand only, run the whole test
# suite (GPU tests included), run the benchmarks, and write logs and JSON to $OUT (or ./gpu-out).
#
#   scripts/gpu_check.sh            build + tests + quick benchmarks
#   scripts/gpu_check.sh --full     build + tests (1000 randomized cases per op) + full benchmark grid
#   scripts/gpu_check.sh --no-bench build + tests only
#   scripts/gpu_check.sh --no-bench --cuda-cases   build + tests without the cases parametrized
#                                   with device "cpu" (CI runs those): about half the tests
#   scripts/gpu_check.sh --full --no-tests   build + full benchmark grid only
#   LORA_FUSED_TESTS="tests/test_distributed.py" scripts/gpu_check.sh --no-bench   a subset of the tests
#                                   (the whole --cuda-cases suite, LORA_FUSED_XDIST=15 on an H100:
#                                   test_lora_ops.py, test_cuda_graphs.py and test_determinism.py took
#                                   54-76 s; the other 16 files 302 s in session 34 and more than 420 s
#                                   in session 35, of which test_nf4_linear.py's decode tests alone
#                                   198 s in session 36: give test_nf4_linear.py a call of its own;
#                                   session 39: test_nf4_linear.py 298 s, the other 18 files 172 s)
#   LORA_FUSED_TEST_TIMEOUT=400 scripts/gpu_check.sh ...   stop the tests after 400 s with pytest's summary
#                                   of what ran (session 35's group B, cut by an outer timeout at 98.6%,
#                                   printed nothing)
#   LORA_FUSED_BENCH_ARGS="--ops qlora_linear --M 4096" scripts/gpu_check.sh        a chosen benchmark grid
#   scripts/gpu_check.sh --prebuilt ...   install .prebuilt/'s wheel (scripts/build_prebuilt.sh, made
#                                   on the CPU machine from these same sources; carry ".prebuilt")
#                                   instead of building here: about 230 s less a call
#   scripts/gpu_check.sh --sanitize --no-tests --no-bench   build + compute-sanitizer (memcheck,
#                                   racecheck, initcheck, synccheck) over scripts/sanitize_slice.py
#                                   (LORA_FUSED_SANITIZERS="racecheck" picks tools)
#
# Python packages missing on the machine (bitsandbytes, ...) can be carried as wheels in ./.whl;
# they are installed into a private folder first (no network needed). scripts/slim_wheel.py drops
# the native libraries the device does not load (bitsandbytes: 41 -> 3.4 MiB), so that .whl and
# .prebuilt fit in a call's 64 MiB beside the tree.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BENCH=quick
TESTS=1
SANITIZE=0
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --full) BENCH=full ;;
    --no-bench) BENCH=none ;;
    --no-tests) TESTS=0 ;;
    --sanitize) SANITIZE=1 ;;
    --no-build) BUILD=0 ;;  # reuse the build a previous call on this (still warm) machine installed
    --prebuilt) BUILD=prebuilt ;;
    --cuda-cases) export LORA_FUSED_CUDA_CASES_ONLY=1 ;;
    *) echo "gpu_check.sh: unknown option $arg (use --full, --no-bench, --no-tests, --sanitize, --no-build, --prebuilt or --cuda-cases)"; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lf-site .whl/*.whl \
    || { echo "gpu_check.sh: installing carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/lf-site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  nvcc --version | tail -1
  echo "CC=${CC:-} CXX=${CXX:-}"; c++ --version | head -1; ${CC:-cc} --version | head -1
  [ -n "${CXX:-}" ] && head -c 800 "$CXX" | grep -a -v "^\s*$" | head -20
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The image's CC/CXX (/opt/gcc/bin/*) are wrappers whose links carry no dynamic libstdc++: an
# extension built through them crashed on its first C++ exception (thrown under one C++ runtime,
# caught under torch's). Build with the system compiler, and check the result below.
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
# The GPU at hand only: sm_90a on Hopper (wgmma/TMA code needs the "a" target), else its own arch.
ARCH=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if (M, m) == (9, 0) else ''))")
export TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ $BUILD = 1 ]; then
  rm -rf build  # a stale object built by another compiler must not be reused
  start=$(date +%s)
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "gpu_check.sh: BUILD FAILED (log: build.log)"; exit 1
  fi
  echo "build for TORCH_CUDA_ARCH_LIST=$ARCH with CXX=${CXX:-c++} took $(( $(date +%s) - start )) s"
elif [ $BUILD = prebuilt ]; then
  # Only a wheel built from exactly these sources, for this GPU and this torch, stands in for a build.
  [ -f .prebuilt/sources.sha256 ] && compgen -G ".prebuilt/lora_fused-*.whl" >/dev/null \
    || { echo "gpu_check.sh: --prebuilt needs .prebuilt/ (scripts/build_prebuilt.sh; run with carry \".prebuilt\")"; exit 1; }
  [ "$(cat .prebuilt/sources.sha256)" = "$(scripts/sources_hash.sh)" ] \
    || { echo "gpu_check.sh: .prebuilt/ was built from other sources than these (csrc/, lora_fused/, setup.py): run scripts/build_prebuilt.sh again"; exit 1; }
  [ "$ARCH" = 9.0a ] || { echo "gpu_check.sh: .prebuilt/ holds sm_90a code; this GPU is $ARCH: build here instead"; exit 1; }
  "$PY" -m pip install -q --no-deps --no-index --force-reinstall .prebuilt/lora_fused-*.whl > "$OUT/build.log" 2>&1 \
    || { tail -20 "$OUT/build.log"; echo "gpu_check.sh: installing .prebuilt/'s wheel failed"; exit 1; }
  (cd / && "$PY" -c "import lora_fused, torch, sys; b = lora_fused.build_info()['built_with_torch']; sys.exit(0 if b == torch.__version__ else 'gpu_check.sh: .prebuilt/ was built with torch %s, this is %s (TORCH_VERSION=... scripts/build_prebuilt.sh)' % (b, torch.__version__))") || exit 1
  echo "installed the prebuilt $(basename .prebuilt/lora_fused-*.whl) (sources $(cut -c1-12 .prebuilt/sources.sha256))"
fi
SO=$(cd / && "$PY" -c "import lora_fused._C as m; print(m.__file__)")
if ! ldd "$SO" | grep -q "libstdc++"; then
  echo "gpu_check.sh: $SO does not link libstdc++ dynamically; C++ exceptions from it would crash. Fix the compiler (CXX)."; exit 1
fi

# Run from outside the source tree so Python imports the installed package, not ./lora_fused.
RUN_DIR=$(mktemp -d)
export LORA_FUSED_EXPECT_CUDA=1
# The randomized tests (tests/test_fuzz.py) draw 40 cases per op in a normal run, 1000 with --full.
[ "$BENCH" = full ] && export LORA_FUSED_FUZZ_CASES=${LORA_FUSED_FUZZ_CASES:-1000}
cp -r tests examples "$RUN_DIR/"
(cd "$RUN_DIR" && "$PY" -c "import lora_fused, json; print(json.dumps(lora_fused.build_info()))") | tee "$OUT/build_info.json"
# xdist workers (when installed; LORA_FUSED_XDIST of them, default 4) keep one crashing test from
# taking the whole run down.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n ${LORA_FUSED_XDIST:-4}")
TEST_RC=0
if [ $TESTS = 1 ]; then
  # LORA_FUSED_TEST_TIMEOUT=S interrupts pytest (SIGINT) after S seconds: it still prints its summary
  # (what passed and failed so far) and writes junit.xml, which names the tests that ran; an outer
  # `timeout` kills it silently. --durations: the slowest tests, to plan the next call's split.
  STOP=()
  [ -n "${LORA_FUSED_TEST_TIMEOUT:-}" ] && STOP=(timeout -s INT -k 30 "$LORA_FUSED_TEST_TIMEOUT")
  (cd "$RUN_DIR" && "${STOP[@]}" "$PY" -m pytest ${LORA_FUSED_TESTS:-tests} -q -rs -p no:cacheprovider $XDIST --durations=30 \
     --junitxml="$OUT/junit.xml" 2>&1) > "$OUT/pytest.log"
  TEST_RC=$?
  tail -25 "$OUT/pytest.log"
fi

SAN_RC=0
if [ $SANITIZE = 1 ]; then
  # Only lora_fused's kernels are instrumented (torch's and cuBLAS's are not ours to fix, and
  # initcheck reports their padding reads); the slice checks its own results against float64.
  cp scripts/sanitize_slice.py "$RUN_DIR/"
  # initcheck runs unfiltered: with the filter, writes by uninstrumented (torch) kernels are invisible
  # to it and every read of a torch-made tensor is reported as uninitialized.
  for tool in ${LORA_FUSED_SANITIZERS:-memcheck racecheck initcheck synccheck}; do
    case $tool in
      initcheck) FILTER=""; ARGS="--quick" ;;
      racecheck) FILTER="--kernel-name kns=lora_fused"; ARGS="--no-cublas" ;;
      *) FILTER="--kernel-name kns=lora_fused"; ARGS="" ;;
    esac
    (cd "$RUN_DIR" && compute-sanitizer --tool $tool $FILTER --error-exitcode 9 \
       "$PY" sanitize_slice.py $ARGS > "$OUT/sanitize_$tool.log" 2>&1)
    rc=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize_$tool.log" | tail -1)
    ran=$(grep -c "^ok " "$OUT/sanitize_$tool.log")
    echo "sanitize $tool: rc=$rc, $ran checks ran, ${summary:-no summary line}"
    if [ $rc -ne 0 ] || ! grep -q "all kernels ran" "$OUT/sanitize_$tool.log"; then SAN_RC=1; tail -15 "$OUT/sanitize_$tool.log"; fi
  done
fi

BENCH_RC=0
if [ "$BENCH" != none ]; then
  # LORA_FUSED_BENCH_ARGS replaces the quick/full grid with a chosen one (e.g. "--ops qlora_linear --M 4096").
  GRID=${LORA_FUSED_BENCH_ARGS:-$([ "$BENCH" = quick ] && echo --quick)}
  (cd "$RUN_DIR" && "$PY" -m lora_fused.bench $GRID --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1) > "$OUT/bench.txt"
  BENCH_RC=$?
  tail -60 "$OUT/bench.txt"
fi
[ -n "${LORA_FUSED_BENCH_ARGS:-}" ] && [ "$BENCH" != none ] && BENCH="$LORA_FUSED_BENCH_ARGS"
echo "gpu_check.sh: tests $([ $TESTS = 1 ] && echo "rc=$TEST_RC" || echo skipped), sanitize $([ $SANITIZE = 1 ] && echo "rc=$SAN_RC" || echo skipped), bench ($BENCH) rc=$BENCH_RC, outputs in $OUT"
[ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ] && [ $SAN_RC -eq 0 ]
