"""Read an `ArrayRef` as training and evaluation see it (plain file, h5 dataset, or preprocessed case)."""

from __future__ import annotations

from dtml_deploy.io.cases import ArrayRef
from dtml_deploy.io.volume import Volume, read_volume


def read_ref(ref: ArrayRef, default_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
             check_finite: bool = True, role: str = "image", spacing: tuple[float, float, float] | None = None,
             max_voxels: int | None = None) -> Volume:
    """The array of `ref`; `role` names the h5 dataset when the reference does not; `spacing` and
    `max_voxels` as for `read_volume`."""
    if ref.preprocess is not None:
        from dtml_deploy.io.challenge import read_preprocessed

        return read_preprocessed(ref)
    return read_volume(ref.path, default_spacing=default_spacing, dataset=ref.dataset or role,
                       check_finite=check_finite, spacing=spacing, max_voxels=max_voxels)
