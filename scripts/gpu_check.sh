#!/usr/bin/env bash
# One device call: the gpu-marked tests and the benchmarks, results under $OUT.
#   scripts/gpu_check.sh                 # everything
#   scripts/gpu_check.sh tests attention # a subset: tests | attention | linear | e2e | profile | vae_decode
#   E2E_ARGS="--models wan2.1-t2v-1.3b" scripts/gpu_check.sh e2e   # extra arguments for one benchmark
# The H100 image has torch + triton but not our service deps (the engine needs none of them); pytest comes
# from wheels carried in .whl/ when the image lacks it (see docs/PERFORMANCE.md for the exact call).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests attention linear e2e)
export PYTHONUNBUFFERED=1
if ! python3 -c "import pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null; date -u; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
for part in "${parts[@]}"; do
  case "$part" in
    tests) python3 -m pytest tests/gpu -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 \
             | tee "$OUT/gpu_tests.log" | tail -40; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    attention|linear|e2e|profile|vae_decode)
      [ -f "bench/$part.py" ] || { echo "bench/$part.py missing"; status=1; continue; }
      # Extra arguments per benchmark from the environment, e.g. E2E_ARGS="--models wan2.1-t2v-1.3b",
      # VAE_DECODE_ARGS="--sizes 480p".
      extra_var="$(echo "$part" | tr a-z A-Z)_ARGS"
      python3 "bench/$part.py" --out "$OUT/$part.json" ${!extra_var:-} 2>&1 | tee "$OUT/$part.log" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    *) echo "unknown part $part"; status=1 ;;
  esac
done
exit $status
