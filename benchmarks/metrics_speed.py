"""Time medpy (dc + jc + hd95 + asd) against dtml_deploy.metrics.case_metrics on real LA labels.

Each label is compared with a realistic prediction made from it (shifted by (2, -1, 1) voxels, dilated
twice on one half and eroded once on the other, a blob cut out of the wall and a small false-positive
blob added). Both sides run on the same pair in the same process, one after the other; the values
must be bit-identical. Unit spacing (voxels), as the paper reports.

    python benchmarks/metrics_speed.py [--data DIR] [--cases N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def labels_dir(data: Path) -> Path:
    for cand in (data / "LA2018" / "labels", data / "labels"):
        if cand.is_dir():
            return cand
    raise SystemExit(f"no LA2018 labels under {data} (expected {data / 'LA2018' / 'labels'})")


def realistic_prediction(gt: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    g = gt.astype(bool)
    shifted = np.zeros_like(g)
    shifted[2:, :-1, 1:] = g[:-2, 1:, :-1]
    half = np.indices(g.shape)[0] < g.shape[0] // 2
    pred = np.where(half, ndi.binary_dilation(shifted, iterations=2), ndi.binary_erosion(shifted))
    grid = np.indices(g.shape)
    surface = np.argwhere(g ^ ndi.binary_erosion(g))
    centre = surface[len(surface) // 2]
    pred &= sum((grid[i] - centre[i]) ** 2 for i in range(3)) > 6**2
    pred |= sum((grid[i] - 6) ** 2 for i in range(3)) <= 3**2
    return pred.astype(np.uint8)


def _time_cases(files: list[Path]) -> tuple[float, float, int]:
    """medpy's and case_metrics' seconds over `files` (labels vs perturbed predictions), and mismatches."""
    import nibabel as nib
    from medpy.metric import binary as medpy_binary

    from dtml_deploy.metrics import case_metrics

    total_medpy = total_ours = 0.0
    mismatches = 0
    print(f"{'case':<22} {'shape':<15} {'medpy s':>8} {'ours s':>8} {'ratio':>6}  dice    hd95    asd")
    for path in files:
        gt = np.asarray(nib.load(path).dataobj)
        pred = realistic_prediction(gt)

        t0 = time.perf_counter()
        ref = {
            "dice": medpy_binary.dc(pred, gt),
            "jaccard": medpy_binary.jc(pred, gt),
            "hd95": medpy_binary.hd95(pred, gt),
            "asd": medpy_binary.asd(pred, gt),
        }
        t1 = time.perf_counter()
        ours = case_metrics(pred, gt)
        t2 = time.perf_counter()

        same = all(ours[k] == float(v) for k, v in ref.items())
        mismatches += not same
        total_medpy += t1 - t0
        total_ours += t2 - t1
        shape = "x".join(map(str, gt.shape))
        print(f"{path.name.split('.')[0]:<22} {shape:<15} {t1 - t0:8.3f} {t2 - t1:8.3f} "
              f"{(t1 - t0) / (t2 - t1):6.1f}  {ours['dice']:.4f} {ours['hd95']:7.3f} {ours['asd']:7.4f}"
              f"{'' if same else '  MISMATCH ' + str(ref)}")

    return total_medpy, total_ours, mismatches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="data root holding LA2018/ (default: $DTML_DATA or ../shared/data)")
    parser.add_argument("--cases", type=int, default=10, help="number of labels to time (default 10)")
    parser.add_argument("--json", type=Path, default=None, help="also write the totals as JSON")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error("--cases must be >= 1")

    sys.path.insert(0, str(REPO))
    from dtml_deploy.io.datasets import find_la2018
    from dtml_deploy.metrics import case_metrics

    if args.data is None:
        args.data = find_la2018()
        if args.data is None:
            raise SystemExit("no LA2018 found: set DTML_DATA or pass --data")

    files = sorted(labels_dir(args.data).glob("*.nii.gz"))[: args.cases]
    if not files:
        raise SystemExit(f"no labels in {labels_dir(args.data)}")
    case_metrics(*(np.zeros((4, 4, 4), np.uint8),) * 2)  # import/warm-up outside the timings

    total_medpy, total_ours, mismatches = _time_cases(files)
    print(f"total over {len(files)} cases: medpy {total_medpy:.3f} s, case_metrics {total_ours:.3f} s, "
          f"speedup {total_medpy / total_ours:.1f}x; values identical: {mismatches == 0}")
    if args.json:
        import json

        md = ("| cases | medpy dc+jc+hd95+asd (s) | dtml case_metrics (s) | speed-up | values identical |\n"
              "|---|---|---|---|---|\n"
              f"| {len(files)} LA labels vs perturbed predictions | {total_medpy:.3f} | {total_ours:.3f} | "
              f"{total_medpy / total_ours:.1f}x | {mismatches == 0} |")
        from common import machine

        args.json.write_text(json.dumps({"machine": machine(),
                                         "markdown": md, "medpy_s": total_medpy, "ours_s": total_ours}, indent=2))
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
