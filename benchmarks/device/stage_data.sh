#!/usr/bin/env bash
# Prepare (on the development machine) the git-ignored folders that carry LA2018 to the GPU machine.
# One call may carry at most 64 MiB, and the 80 images take ~116 MB, so the data travels in two parts:
#   .devdata/partA: labels (all 80, 2.7 MB), splits.json, and the images of the first cases of the
#                   training list up to 57.5 MB (the 16 labeled and the first unlabeled ones);
#                   travels with .whl (5 MB of wheels) and the repository (~1 MB);
#   .devdata/partB: the images of the remaining cases (~64 MB), travels alone with the repository (the wheels were installed by call 1).
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
import os
ids = json.load(open(f"{src}/splits.json"))["train"]
size, part = 0, "partA"
for cid in ids:
    f = f"{src}/images/{cid}.nii.gz"
    size += os.path.getsize(f)
    if size > 57.5e6:
        part = "partB"
    shutil.copy(f, f".devdata/{part}/images/")
n_a = len(os.listdir(".devdata/partA/images"))
open(".devdata/partA/n_images", "w").write(f"{n_a}\n")
print("part A:", n_a, "images; part B:", len(ids) - n_a)
PY
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl nibabel==5.4.2 monai==1.6.1
du -sh .devdata/partA .devdata/partB .whl
