#!/usr/bin/env bash
# One device call (about 6 minutes on one H100/H200; give it timeout_s 560), from the repository root:
#   carry: [".whl", ".devdata/la_one"]
# .devdata/la_one holds one real LA2018 case (images/ and labels/ of 5FKQL4K14KCB72Y8YMC2, 1.1 MB):
#   mkdir -p .devdata/la_one/{images,labels} and copy that case's two files from ../shared/data/LA2018.
# The shipped default model (38 MB) travels with the checkout, so this call fits the 64 MiB limit.
# 0. the GPU tests (tests/test_gpu.py, about a minute).
# 1. benchmarks/segment_speed.py: section A on the real case (paper loop vs engine), section B on
#    576x576x88 at overlap 0.5 (MONAI fp16 sw_batch 8 vs the engine at batch 4, 6 and 8): the GPU speed target.
# 2. dtml benchmark --device cuda on the real case with the shipped model: the GPU rows (fp16, graphs +
#    cuDNN fusion, compiled, ORT CUDA EPs if present, TensorRT if present) with agreement vs torch fp32.
# Results land in $OUT: inference_gpu.log, segment_speed_gpu.json, dtml_benchmark_gpu.json.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD DTML_DATA=$PWD/.devdata/la_one
log=$OUT/inference_gpu.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  echo "## GPU tests"
  timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -6
  echo "## segment_speed"
  timeout 330 python3 benchmarks/segment_speed.py --real-case --batch 8 4 6 --repeats 5 \
      --json "$OUT/segment_speed_gpu.json" 2>&1 | tail -30
  echo "## dtml benchmark"
  timeout 150 python3 -m dtml_deploy benchmark --data .devdata/la_one/images/5FKQL4K14KCB72Y8YMC2.nii.gz \
      --device cuda --no-progress --json "$OUT/dtml_benchmark_gpu.json" 2>&1 | tail -25
} 2>&1 | tee "$log"
