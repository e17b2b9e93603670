#!/usr/bin/env bash
# One prepared run on a bare CUDA machine (no network): install the carried wheels, print the versions, then
#   smoke:     the 7B-dimension smoke check (tests/gpu/smoke.py)
#   tests:     the tests whose code takes its CUDA branch when a GPU is there (SFT and GRPO trainers on cuda,
#              bf16 autocast with fp32 master weights, the learning test)
#   deepspeed: the 7B SFT config's ZeRO-2 through the project's launcher (tests/gpu/deepspeed_sft.py); needs
#              the deepspeed wheel among the carried ones
# Every phase has its own time limit and log under OUT_DIR, and a failed phase does not stop the next.
# Usage (repo root): tests/gpu/device_check.sh WHEEL_DIR OUT_DIR [SMOKE_S] [TESTS_S]
#   PHASES="smoke tests deepspeed" (default) picks phases; TESTS="tests/test_x.py ..." replaces the test list.
#   WHEEL_DIR: from tests/gpu/build_wheels.sh (cp312 wheels of what the machine lacks)
set -uo pipefail
WHEELS="$1"; OUT="$2"; SMOKE_S="${3:-300}"; TESTS_S="${4:-240}"
PHASES="${PHASES:-smoke tests deepspeed}"
TESTS="${TESTS:-tests/test_learning.py tests/test_rl_gpu_path.py tests/test_rl_scripted.py tests/test_rl_train.py tests/test_sft_stage.py tests/test_model_tiny.py}"
mkdir -p "$OUT"
SITE="${SITE:-/tmp/kz_site}"
if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl > "$OUT/env.txt" 2>&1; then
  echo "device_check: installing the wheels of $WHEELS failed" >&2; cat "$OUT/env.txt" >&2; exit 3
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers, trl, datasets, rasterio, accelerate, peft
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))
print('transformers', transformers.__version__, 'trl', trl.__version__, 'accelerate', accelerate.__version__,
      'peft', peft.__version__, 'datasets', datasets.__version__, 'rasterio', rasterio.__version__)"
} >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
fails=0
phase() {  # name, seconds, log, command...
  local name="$1" secs="$2" log="$3"; shift 3
  local t0 rc=0
  t0=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$log" 2>&1 || rc=$?
  echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s"; tail -c 4000 "$OUT/$log"
  [ "$rc" -eq 0 ] || fails=$((fails + 1))
}
for p in $PHASES; do
  case "$p" in
    smoke) phase smoke "$SMOKE_S" smoke.log python3 tests/gpu/smoke.py --out "$OUT" ;;
    # shellcheck disable=SC2086
    tests) phase tests "$TESTS_S" pytest.log python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" \
             --timeout 200 --junitxml "$OUT/junit.xml" --durations 15 -rfE $TESTS ;;
    deepspeed) phase deepspeed "$TESTS_S" deepspeed.log python3 tests/gpu/deepspeed_sft.py --out "$OUT" ;;
    *) echo "device_check: unknown phase $p" >&2; fails=$((fails + 1)) ;;
  esac
done
[ "$fails" -eq 0 ]
