#!/usr/bin/env bash
# Device call 1 of 2 (about 3 minutes on one H100/H200). Run from the repository root on the GPU machine:
#   carry: [".devdata/partA", ".whl"]
# Stages part A of LA2018 in /tmp/la (see stage_data.sh), installs the carried pure-Python wheels
# (nibabel, monai) into /tmp/site, then runs the GPU tests and the speed benchmarks. Everything it
# prints also lands in $OUT/gpu_checks.tar.gz.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/la /tmp/results
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
cp -r .devdata/partA/. /tmp/la/
log=/tmp/results/gpu_checks.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  echo "## GPU tests"; timeout 240 python3 -m pytest -q -x -m "gpu" tests -p no:cacheprovider 2>&1 | tail -15
  echo "## train speed"; timeout 120 python3 benchmarks/train_speed.py --data /tmp/la --unlabeled 24 --amp bf16 --amp fp16 \
     --json /tmp/results/train_speed.json 2>&1 | tail -8
  echo "## segment speed"; timeout 240 python3 benchmarks/segment_speed.py --json /tmp/results/segment_speed.json 2>&1 | tail -30
} 2>&1 | tee "$log"
tar -czf "$OUT/gpu_checks.tar.gz" -C /tmp/results .
