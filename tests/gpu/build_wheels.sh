#!/usr/bin/env bash
# Build the wheel folder that tests/gpu/device_check.sh (smoke.py, the CUDA-branch tests, deepspeed_sft.py) needs
# on a bare CUDA machine with no network. Assumed there (the workplace's CUDA image, Python 3.12): torch,
# transformers 5.17, accelerate, peft, numpy, pillow, pyarrow, pandas, fsspec, xxhash, attrs, certifi, click,
# pyparsing, python-dateutil, six, einops, msgpack, ninja, psutil, py-cpuinfo, pytest, pytest-timeout, hypothesis.
# Carried here: trl, datasets and rasterio with what they need beyond that; spyndex (and the packages its import
# pulls in), climaclass and earthlib, which the tiny model's tokenizer corpus and the KG importers read; and
# DeepSpeed, built here from its sdist as a pure-Python wheel (DS_BUILD_OPS=0: ops are compiled on first use),
# with pydantic and hjson. No vLLM (hundreds of MB) and no Ray.
# Usage: tests/gpu/build_wheels.sh [OUT_DIR]  (default gpu_wheels/); fails when the folder exceeds 60 MB.
# On the GPU machine: tests/gpu/device_check.sh OUT_DIR RESULTS_DIR
set -euo pipefail
OUT="${1:-gpu_wheels}"
LIMIT_MB="${LIMIT_MB:-60}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
WHEELS=(
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  rasterio==1.4.4 affine "cligj>=0.5" click-plugins
  spyndex==0.12.0 python-box toon-format tomli-w climaclass earthlib isal
  hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
)
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$OUT" "${WHEELS[@]}"
# DeepSpeed publishes an sdist only; its setup.py imports torch (the CPU build here will do)
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$OUT" deepspeed==0.18.2
size_mb=$(( $(du -sb "$OUT" | cut -f1) / 1000000 ))
echo "wheel folder $OUT: ${size_mb} MB ($(ls "$OUT"/*.whl | wc -l) wheels)"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
  echo "error: $OUT is ${size_mb} MB > ${LIMIT_MB} MB" >&2
  exit 1
fi
