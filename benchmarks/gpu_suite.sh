#!/usr/bin/env bash
# The GPU suite: one device call runs the GPU tests, then PERF.md's P1-P4 with dummy weights
# of benchmarks/model_configs, the two ceilings and a decode profile, and prints the summary
# table last. Logs and JSON go under $OUT (7 files). Run from the repo root:
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh
# Optional: TESTS (pytest paths), SKIP_TESTS=1, STAGES (subset of: ceilings llama p4 hf).
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
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-220}" python -m pytest ${TESTS:-tests/gpu} -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest.log" | tail -25
fi
declare -A LIMIT=([ceilings]=30 [llama]=${LLAMA_TIMEOUT:-180} [p4]=${P4_TIMEOUT:-60}
                  [hf]=${HF_TIMEOUT:-60})
for name in ${STAGES:-ceilings llama p4 hf}; do stage "$name" "${LIMIT[$name]}"; done
stage table 20
