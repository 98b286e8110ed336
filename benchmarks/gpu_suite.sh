#!/usr/bin/env bash
# The GPU suite: one device call runs the GPU tests, then PERF.md's P1-P4 with dummy weights
# of benchmarks/model_configs, the two ceilings and a decode profile, and prints the summary
# table last. Logs and JSON go under $OUT. Run from the repo root (carry: [".whl"]):
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh
# On two GPUs the tests and the benchmarks run side by side (one GPU each).
# Optional: TESTS (pytest paths, one sequential run), SKIP_TESTS=1, SKIP_BENCHMARKS=1,
# STAGES (subset of: ceilings llama p4 hf p5), SUITE_ONLY (subset of the llama stage's pieces,
# e.g. "p1 p2"), P5_PROMPTS (requests per rate in p5, default 200), AB (settings to A/B on
# P1, see below). One GPU: a full run no longer fits one 10-minute call; make two, with
# SKIP_BENCHMARKS=1 and then SKIP_TESTS=1 (docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/pagoda-gpu-suite}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/suite.log"
# The device image lacks msgspec (the engine's messages): install it from carried wheels
# (run with carry: [".whl"]; .whl/ is git-ignored).
python -c "import msgspec" 2>/dev/null || python -m pip install -q --no-index --no-deps \
  .whl/msgspec-*cp312*.whl 2>&1 | tail -2
# The server's dependencies, for the P5 stage (resolved from .whl/ where the image lacks them).
python -c "import fastapi, uvicorn, zmq, prometheus_client, httpx" 2>/dev/null || \
  python -m pip install -q --no-index --find-links .whl fastapi uvicorn pyzmq \
  prometheus_client httpx 2>&1 | tail -2
python -c "import uvloop" 2>/dev/null || python -m pip install -q --no-index --no-deps \
  .whl/uvloop-*cp312*.whl 2>&1 | tail -2  # optional: the server falls back to asyncio's loop
stage() {  # stage NAME SECONDS: one process per stage, so each frees the GPU when done
  echo "=== stage $1 ($(date -u +%H:%M:%S)) ===" | tee -a "$LOG"
  timeout "$2" python benchmarks/gpu_suite.py "$1" --out "$OUT" 2>&1 | tee -a "$LOG"
  echo "=== stage $1 rc=$? ===" | tee -a "$LOG"
}
{ echo "commit: ${SUITE_COMMIT:-$(git rev-parse HEAD 2>/dev/null)} (the device copy has no history:"
  echo "  pass SUITE_COMMIT=\$(git rev-parse --short HEAD) from the calling side)"; date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null
  python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} 2>&1 | tee "$LOG"
# Tests in three groups, each with its own time limit so one slow group cannot starve the
# benchmarks. Kernel and family tests hold no GPU-sized KV cache, so they run in parallel
# (pytest-xdist from .whl/: most of their time is Triton compiling on the slow host CPU);
# the end-to-end tests size their KV cache from free GPU memory and run one at a time.
# TESTS overrides all three with one sequential run.
python -c "import xdist" 2>/dev/null || python -m pip install -q --no-index --no-deps \
  .whl/pytest_xdist-*.whl .whl/execnet-*.whl 2>&1 | tail -2
PAR=""; python -c "import xdist" 2>/dev/null && PAR="-n 8"
# The tests compare with transformers, and the image's 5.17 is wrong for two families
# (docs/models.md): when .whl/ carries the version CI uses, the tests import that one (the
# benchmarks keep the image's). If it does not import here, the image's stays.
TEST_PATH="$PYTHONPATH"
if ls .whl/transformers-*.whl >/dev/null 2>&1; then
  python -m pip install -q --no-index --no-deps --target /tmp/pagoda-tf .whl/transformers-*.whl \
    2>&1 | tail -2
  PYTHONPATH="/tmp/pagoda-tf:$PYTHONPATH" python -c "import transformers" 2>/dev/null && \
    TEST_PATH="/tmp/pagoda-tf:$PYTHONPATH"
fi
echo "tests use transformers $(PYTHONPATH=$TEST_PATH python -c \
  'import transformers; print(transformers.__version__)' 2>/dev/null)" | tee -a "$LOG"
run_tests() {  # run_tests NAME SECONDS ARGS...: full log appended to $OUT/pytest.log
  local name=$1 limit=$2 log="$OUT/pytest_$1.tmp"; shift 2
  echo "=== tests $name ($(date -u +%H:%M:%S)) ===" | tee -a "$LOG"
  # -v names each test as it ends, so a group cut by its limit shows where it was
  PYTHONPATH="$TEST_PATH" timeout "$limit" python -m pytest -v -p no:cacheprovider -rfE \
    --durations=8 "$@" \
    > "$log" 2>&1
  echo "=== tests $name rc=$? ===" | tee -a "$LOG"; tail -4 "$log" | tee -a "$LOG"
  { echo "===== $name"; cat "$log"; } >> "$OUT/pytest.log"; rm -f "$log"
}
all_tests() {
  if [ -n "${TESTS:-}" ]; then
    run_tests custom "${TEST_TIMEOUT:-240}" $TESTS
  else
    run_tests e2e "${E2E_TIMEOUT:-300}" tests/gpu/test_e2e_gpu.py
    run_tests kernels "${KERNEL_TIMEOUT:-90}" $PAR tests/gpu/test_kernels_gpu.py \
      tests/gpu/test_moe_gpu.py
    run_tests families "${FAMILY_TIMEOUT:-110}" $PAR tests/models/test_families_gpu.py
  fi
}
benchmarks() {
  [ "${SKIP_BENCHMARKS:-0}" = "1" ] && return  # a tests-only call (one GPU: see docs)
  declare -A LIMIT=([ceilings]=30 [llama]=${LLAMA_TIMEOUT:-180} [p4]=${P4_TIMEOUT:-120}
                    [hf]=${HF_TIMEOUT:-60} [p5]=${P5_TIMEOUT:-330})
  # p5 (serving, ~4-5 minutes) is not in the default set: one device call cannot hold it
  # with the rest. Run it alone: SKIP_TESTS=1 STAGES="p5".
  for name in ${STAGES:-ceilings llama p4 hf}; do
    [ -n "${LIMIT[$name]:-}" ] || { echo "STAGES: unknown stage $name (the table always runs last)" | tee -a "$LOG"; continue; }
    stage "$name" "${LIMIT[$name]}"
  done
}
NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
rm -f "$OUT/quiet_part_done"  # gpu_suite.py's QUIET_MARKER
tests_after_quiet_part() {  # waits for the marker, or for the llama stage to end without it
  if [ "${SKIP_BENCHMARKS:-0}" != "1" ] && [[ " ${STAGES:-llama} " == *" llama "* ]]; then
    for _ in $(seq "${QUIET_WAIT:-200}"); do
      [ -f "$OUT/quiet_part_done" ] || grep -q "stage llama rc=" "$LOG" && break; sleep 1
    done
  fi
  all_tests
}
# AB="NAME=VALUE[,NAME=VALUE];...": P1 as is and with each setting, first and alone (no
# tests beside it), each in its own process.
if [ -n "${AB:-}" ]; then CUDA_VISIBLE_DEVICES=0 stage ab 600; fi
if [ "${SKIP_TESTS:-0}" = "1" ]; then
  benchmarks
elif [ "$NUM_GPUS" -ge 2 ]; then
  # Two GPUs (kind nvidia-h200-x2): the tests run on the second while the benchmarks run on
  # the first, then the tensor-parallel test takes both. The tests' Triton compiles share
  # the host CPU with the benchmarks, so they start only once the llama stage has measured
  # P1, P2 and the graph times (its marker file; at most QUIET_WAIT seconds).
  CUDA_VISIBLE_DEVICES=1 tests_after_quiet_part &
  CUDA_VISIBLE_DEVICES=0 benchmarks
  wait
  run_tests tp "${TP_TIMEOUT:-120}" tests/gpu/test_tp_gpu.py
else
  all_tests  # test_tp_gpu.py needs two GPUs
  benchmarks
fi
stage table 20
