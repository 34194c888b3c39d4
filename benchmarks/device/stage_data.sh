#!/usr/bin/env bash
# Prepare (on the development machine) the git-ignored folders that carry LA2018 to the GPU machine.
# One call may carry at most 64 MiB, and the 80 images take ~116 MB, so the data travels in two parts:
#   .devdata/partA: labels (all 80, 2.7 MB), splits.json, and the images of the first 40 cases of the
#                   training list (the 16 labeled + 24 unlabeled);
#   .devdata/partB: the images of the other 40 cases.
# Each device call copies its part to /tmp/la, which survives back-to-back calls on a warm machine.
set -euo pipefail
src=${DTML_DATA:-../shared/data}/LA2018
[ -d "$src/images" ] || src=${DTML_DATA:-../shared/data}
cd "$(git rev-parse --show-toplevel)"
rm -rf .devdata && mkdir -p .devdata/partA/images .devdata/partA/labels .devdata/partB/images
cp "$src/splits.json" .devdata/partA/
cp "$src"/labels/*.nii.gz .devdata/partA/labels/
python3 - "$src" <<'PY'
import json, shutil, sys
src = sys.argv[1]
ids = json.load(open(f"{src}/splits.json"))["train"]
for i, cid in enumerate(ids):
    part = "partA" if i < 40 else "partB"
    shutil.copy(f"{src}/images/{cid}.nii.gz", f".devdata/{part}/images/")
PY
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl nibabel==5.4.2 monai==1.6.1
du -sh .devdata/partA .devdata/partB .whl
