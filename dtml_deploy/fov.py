"""A scan's field of view against a whole LA LGE-MRI acquisition: what a user-cropped raw scan looks like.

The networks learned from images z-scored over the WHOLE scan and then cropped around the atrium (LA2018:
crops of 92-152 x 82-100 mm in-plane). A raw scan is z-scored here, over what it holds; when a user
cropped it first, the mean and spread come from the crop, the networks see other intensities, and
accuracy drops (one held-out case measured outside: 84.6 Dice instead of 92.3). dtml cannot know a scan
was cropped, but it can see an in-plane field of view far smaller than any whole acquisition (LA LGE-MRI
covers the chest: about 320-400 mm, e.g. 576 x 0.625 mm = 360 mm). Data that was already z-scored (the
training crops, kept as stored) is not concerned: it was normalised over its whole scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ZSCORED_HERE = "zscore"  # intensity.prepare's word for a scan it z-scored itself


@dataclass(frozen=True)
class FovRule:
    """When a raw scan's field of view says it was cropped."""

    # Smallest in-plane field of view (mm) of a whole scan: far below any LA LGE-MRI acquisition (about
    # 320-400 mm) and above the largest atrium crop of LA2018 (152 mm).
    min_in_plane_mm: float = 200.0


def in_plane_mm(shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float]:
    """The two largest physical extents of the volume (mm), largest first: the acquisition's plane, whatever
    the axis order (an LGE stack covers far less through-plane)."""
    extents = sorted((float(n) * float(s) for n, s in zip(shape, spacing)), reverse=True)
    return extents[0], extents[1]


def fov_part(shape: Sequence[int], spacing: Sequence[float], intensity: str | None,
             rule: FovRule = FovRule()) -> float:
    """1.0 for a whole scan or data kept as stored; for a raw scan z-scored here, its smaller in-plane
    extent over the rule's minimum when below it (a 100 mm crop: 0.5). The QC's intensity part uses it."""
    if intensity != ZSCORED_HERE:
        return 1.0
    return min(in_plane_mm(shape, spacing)[1] / rule.min_in_plane_mm, 1.0)


def cropped_scan_warning(shape: Sequence[int], spacing: Sequence[float], intensity: str | None,
                         rule: FovRule = FovRule()) -> str | None:
    """The case's warning (without the `warning: <case>: ` prefix) for a raw scan that looks cropped."""
    if fov_part(shape, spacing, intensity, rule) >= 1.0:
        return None
    a, b = in_plane_mm(shape, spacing)
    return (f"field of view {a:.0f} x {b:.0f} mm, far smaller than a whole LA LGE-MRI scan (about 360 mm): a "
            "cropped raw scan is z-scored over the crop, not over the whole scan as in training, which costs "
            "accuracy; give dtml the whole scan, or z-score the whole scan before cropping it (then it is kept "
            "as stored)")
