"""Case previews: the pictures themselves (outline on the boundary, no outline for an empty mask, no heat
where the heads agree, spacing-true aspect, orientation from the affine), checked on the RGB arrays and
on the PNG read back, on a real LA sample scan and on synthetic boxes of known geometry."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

pytest.importorskip("matplotlib", reason="previews need matplotlib (the viz extra)")

from dtml_deploy.errors import DtmlError
from dtml_deploy.viz.figure import png_to_rgb, require_matplotlib
from dtml_deploy.viz.preview import (
    PreviewStyle,
    compose,
    intensity_window,
    mask_volume_ml,
    preview_png,
    slice_views,
)

STYLE = PreviewStyle()
CYAN = np.array(STYLE.outline_rgb)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Reference: mask pixels with a 4-neighbour outside the mask or outside the slice."""
    p = np.pad(mask, 1, constant_values=False)
    inside = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inside


def _is_colour(rgb: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return np.all(rgb == colour, axis=-1)


def _cyan_png(rgb: np.ndarray) -> np.ndarray:
    """Outline pixels in a decoded PNG (8-bit, so a tolerance)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r < 40) & (g > 215) & (b > 215)


@pytest.fixture(scope="module")
def real_case(sample_root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]:
    cid = sorted((sample_root / "images").glob("*.nii.gz"))[0].name
    img = nib.load(str(sample_root / "images" / cid))
    lab = np.asarray(nib.load(str(sample_root / "labels" / cid)).dataobj) > 0
    return (np.asarray(img.get_fdata(dtype=np.float32)), lab, img.affine,
            tuple(float(z) for z in img.header.get_zooms()[:3]))


def _disagreement(mask: np.ndarray) -> np.ndarray:
    """A realistic |p_seg - p_dis|: large in a band around the boundary, exactly 0 far from it."""
    dist = ndi.distance_transform_edt(~mask) + ndi.distance_transform_edt(mask)
    return np.where(dist < 3, 0.6 / (1 + dist), 0.0).astype(np.float32)


def test_outline_pixels_are_the_mask_boundary(real_case) -> None:
    image, label, affine, spacing = real_case
    views = slice_views(label, affine, spacing, image=image, uncertainty=_disagreement(label))
    window = intensity_window(image)
    for v in views:
        rgb = compose(v, window)
        drawn = _is_colour(rgb, CYAN)
        assert v.mask.any(), v.name  # the slices go through the atrium's centroid
        np.testing.assert_array_equal(drawn, _boundary(v.mask), err_msg=v.name)


def test_views_cut_the_canonical_volume_at_the_centroid(real_case) -> None:
    """The displayed slices are the RAS-reoriented arrays (nibabel's own) at the mask's centroid."""
    _image, label, affine, spacing = real_case
    canon = nib.as_closest_canonical(nib.Nifti1Image(label.astype(np.uint8), affine))
    ras = np.asarray(canon.dataobj) > 0
    centre = [int(np.rint(c)) for c in ndi.center_of_mass(ras)]
    views = {v.name: v for v in slice_views(label, affine, spacing)}
    np.testing.assert_array_equal(views["axial"].mask, ras[:, :, centre[2]][::-1, ::-1].T)
    np.testing.assert_array_equal(views["coronal"].mask, ras[:, centre[1], :][::-1, ::-1].T)
    np.testing.assert_array_equal(views["sagittal"].mask, ras[centre[0], :, :][::-1, ::-1].T)
    assert [views[n].index for n in ("sagittal", "coronal", "axial")] == centre


def test_empty_mask_draws_no_outline_and_cuts_the_centre(real_case) -> None:
    image, label, affine, spacing = real_case
    empty = np.zeros_like(label)
    views = slice_views(empty, affine, spacing, image=image)
    assert [v.index for v in views] == [label.shape[2] // 2, label.shape[1] // 2, label.shape[0] // 2]
    for v in views:
        assert not _is_colour(compose(v, intensity_window(image)), CYAN).any()
    rgb = png_to_rgb(preview_png(empty, affine, spacing, "empty", image=image))
    assert not _cyan_png(rgb).any()
    full = png_to_rgb(preview_png(label, affine, spacing, "full", image=image))
    assert _cyan_png(full).sum() > 100  # the same check does see an outline when there is one


def test_disagreement_overlay_is_zero_where_the_heads_agree(real_case) -> None:
    image, label, affine, spacing = real_case
    unc = _disagreement(label)
    window = intensity_window(image)
    with_heat = slice_views(label, affine, spacing, image=image, uncertainty=unc)
    without = slice_views(label, affine, spacing, image=image)
    for v, ref in zip(with_heat, without):
        a, b = compose(v, window), compose(ref, window)
        agree = v.uncertainty == 0
        assert agree.any() and (~agree).any()
        np.testing.assert_array_equal(a[agree], b[agree])  # bit-identical: no heat at all
        hot = ~agree & ~_is_colour(a, CYAN)
        assert np.all(a[hot][:, 0] > b[hot][:, 0] - 1e-6) and np.all(a[hot][:, 0] >= a[hot][:, 2])
        assert np.abs(a[hot] - b[hot]).max() > 0.1  # and visible where they disagree


def test_views_keep_the_aspect_ratio_of_the_spacing() -> None:
    """A 20x10x8-voxel box at spacing 1 x 1 x 2.5 mm is 20 x 10 x 20 mm: the outlines in the written PNG
    must have the physical proportions (axial 2:1, coronal 1:1, sagittal 1:2), not the voxel counts'."""
    shape, spacing = (40, 30, 20), (1.0, 1.0, 2.5)
    mask = np.zeros(shape, bool)
    mask[10:30, 10:20, 6:14] = True
    rgb = png_to_rgb(preview_png(mask, np.diag([*spacing, 1.0]), spacing, "box"))
    labels, n = ndi.label(_cyan_png(rgb))
    assert n == 3
    boxes = sorted(ndi.find_objects(labels), key=lambda s: s[1].start)  # left to right: axial, coronal, sagittal
    ratios = [(b[1].stop - b[1].start) / (b[0].stop - b[0].start) for b in boxes]
    assert ratios == pytest.approx([2.0, 1.0, 0.5], rel=0.04)


def test_orientation_letters_and_pixels_follow_the_affine(real_case) -> None:
    """The same anatomy stored RAS, LPS-flipped, and with permuted axes draws the same views with the
    same letters; the letters are the radiological convention's."""
    image, label, affine, spacing = real_case
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [image.shape[0] - 1, image.shape[1] - 1]  # voxel i -> n-1-i on the first two axes
    perm = np.eye(4)[[2, 0, 1, 3]]  # stored axes (z, x, y)
    variants = [
        (image, label, affine, spacing),
        (image[::-1, ::-1].copy(), label[::-1, ::-1].copy(), affine @ flip, spacing),
        (image.transpose(2, 0, 1).copy(), label.transpose(2, 0, 1).copy(), affine @ perm.T,
         (spacing[2], spacing[0], spacing[1])),
    ]
    drawn = [slice_views(lab, aff, sp, image=img) for img, lab, aff, sp in variants]
    for views in drawn[1:]:
        for v, ref in zip(views, drawn[0]):
            np.testing.assert_array_equal(v.image, ref.image)
            assert v.edges == ref.edges and v.pixel_mm == ref.pixel_mm
    edges = {v.name: v.edges for v in drawn[0]}
    assert edges["axial"] == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert edges["coronal"] == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert edges["sagittal"] == {"left": "A", "right": "P", "top": "S", "bottom": "I"}


def test_mask_volume_in_millilitres() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[:4, :5, :2] = True  # 40 voxels of 0.5 x 1 x 2.5 mm = 50 mm^3
    assert mask_volume_ml(mask, (0.5, 1.0, 2.5)) == pytest.approx(0.05)


def test_missing_matplotlib_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DtmlError) as e:
        require_matplotlib("--preview")
    assert str(e.value) == "--preview needs matplotlib: pip install 'dtml[viz]'"
