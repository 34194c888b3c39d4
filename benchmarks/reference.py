"""A plain re-implementation of the paper's test loop (UA-MT/DTC/DTML `test_single_case`).

One window per forward, fp32, scores accumulated in numpy on the host, divided by a count map, then
thresholded at 0.5. The networks run wherever their weights are (CPU or a GPU, as the paper's code).
Kept deliberately naive: it is the correctness reference for the fused engine and
the speed baseline of benchmarks/segment_speed.py. `heads` picks which maps it stitches.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dtml_deploy.nets.dual import DualTaskNet, sdm_to_mask


def reference_sliding_window(net: DualTaskNet, image: np.ndarray, patch: tuple[int, int, int],
                             stride: tuple[int, int, int] = (18, 18, 4),
                             heads: tuple[str, ...] = ("p_seg",)) -> dict[str, np.ndarray]:
    """Stitched maps (`p_seg`, `p_dis`, `sdm`) of a normalised volume, on the input grid."""
    net.eval()
    device = next(net.parameters()).device
    w, h, d = image.shape
    pads = [max(p - s, 0) for p, s in zip(patch, image.shape)]
    lo = [p // 2 for p in pads]
    if any(pads):
        image = np.pad(image, [(lo[i], pads[i] - lo[i]) for i in range(3)], mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch[0]) / stride[0]) + 1
    sy = math.ceil((hh - patch[1]) / stride[1]) + 1
    sz = math.ceil((dd - patch[2]) / stride[2]) + 1
    score = {k: np.zeros(image.shape, dtype=np.float32) for k in heads}
    cnt = np.zeros(image.shape, dtype=np.float32)
    for x in range(sx):
        xs = min(stride[0] * x, ww - patch[0])
        for y in range(sy):
            ys = min(stride[1] * y, hh - patch[1])
            for z in range(sz):
                zs = min(stride[2] * z, dd - patch[2])
                tile = image[xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]]
                t = torch.from_numpy(np.ascontiguousarray(tile, dtype=np.float32))[None, None].to(device)
                with torch.no_grad():
                    maps = {}
                    if "p_seg" in heads:
                        maps["p_seg"] = torch.sigmoid(net.seg(t))
                    if "p_dis" in heads or "sdm" in heads:
                        sdm = torch.tanh(net.dis(t))
                        maps["sdm"], maps["p_dis"] = sdm, sdm_to_mask(sdm, net.k)
                for k in heads:
                    score[k][xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += maps[k][0, 0].cpu().numpy()
                cnt[xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += 1
    crop = tuple(slice(lo[i], lo[i] + s) for i, s in enumerate((w, h, d)))
    return {k: (v / cnt)[crop] for k, v in score.items()}
