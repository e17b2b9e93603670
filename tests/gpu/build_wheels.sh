#!/usr/bin/env bash
# Build the wheel folder that tests/gpu/smoke.py needs on a bare CUDA machine with no network.
# Assumed there: Python 3.12, torch, transformers 5.17, accelerate, peft, numpy, pillow, pyarrow (and what
# they pull in: huggingface-hub, tokenizers, safetensors, pyyaml, tqdm, jinja2, networkx, psutil, packaging).
# Carried here: trl, datasets and rasterio with the dependencies such a machine lacks (no vLLM, no Ray).
# Usage: tests/gpu/build_wheels.sh [OUT_DIR]  (default gpu_wheels/); fails when the folder exceeds 60 MB.
# On the GPU machine:  pip install --no-index --find-links gpu_wheels trl datasets rasterio
#                      python tests/gpu/smoke.py --out smoke_out
set -euo pipefail
OUT="${1:-gpu_wheels}"
LIMIT_MB="${LIMIT_MB:-60}"
mkdir -p "$OUT"
WHEELS=(
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0
  pandas==3.1.1 python-dateutil six
  rasterio==1.4.4 affine attrs certifi "click!=8.2.*,>=4.0" "cligj>=0.5" click-plugins pyparsing
)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$OUT" "${WHEELS[@]}"
size_mb=$(( $(du -sb "$OUT" | cut -f1) / 1000000 ))
echo "wheel folder $OUT: ${size_mb} MB ($(ls "$OUT"/*.whl | wc -l) wheels)"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
  echo "error: $OUT is ${size_mb} MB > ${LIMIT_MB} MB" >&2
  exit 1
fi
