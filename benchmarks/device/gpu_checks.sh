#!/usr/bin/env bash
# Device call 1 of 2 (about 1-2 minutes on one H100/H200). Run from the repository root on the GPU machine:
#   carry: [".devdata/partA", ".whl"]
# Stages part A of LA2018 in /tmp/la (see stage_data.sh) and the carried pure-Python wheels (nibabel,
# monai) in /tmp/site, then runs the GPU tests and a short training-speed check, so that call 2
# (reproduce_la.sh) starts on a machine known to work. Output also lands in $OUT/gpu_checks.tar.gz.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/la /tmp/results
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
cp -r .devdata/partA/. /tmp/la/
log=/tmp/results/gpu_checks.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  echo "## GPU tests"; timeout 120 python3 -m pytest -q -x -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -6
  echo "## train speed (bf16 autocast, part A of the data)"
  timeout 90 python3 benchmarks/train_speed.py --data /tmp/la --unlabeled $(( $(cat /tmp/la/n_images) - 16 )) \
     --amp bf16 --warmup 25 --iterations 75 --json /tmp/results/train_speed_smoke.json 2>&1 | tail -4
} 2>&1 | tee "$log"
tar -czf "$OUT/gpu_checks.tar.gz" -C /tmp/results .
