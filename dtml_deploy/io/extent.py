"""How much work a scan is, from its header alone: the weight that balances cases across ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _header_voxels(path: Path, dataset: str | None) -> int | None:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return int(np.prod(nib.load(str(path)).shape[:3]))  # nibabel reads the header only
    if name.endswith(".h5"):
        import h5py

        with h5py.File(path, "r") as f:
            key = dataset if dataset in f else next(iter(f.keys()))
            return int(np.prod(f[key].shape[:3]))
    if name.endswith((".nrrd", ".nhdr", ".mha", ".mhd")):
        from dtml_deploy.io.header_reader import read_header

        return read_header(path, geometry=False).voxels  # parsed here: ITK would print its complaints
    return None


def _bytes_on_disk(path: Path) -> int:
    if path.is_dir():  # a DICOM series: its slices
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def voxel_estimate(path: Path, dataset: str | None = None) -> int:
    """The scan's voxel count from its header (NIfTI, h5, NRRD/MHA); for a DICOM series, a file the
    header cannot be read from, or a missing reader, its bytes on disk / 2 (16-bit voxels). A missing
    file weighs 1: it fails at once wherever it goes. Never raises: reading the case reports its errors."""
    path = Path(path)
    try:
        n = _header_voxels(path, dataset)
        if n is not None:
            return max(1, n)
    except Exception:  # a weight only: reading the case reports what is wrong
        pass
    try:
        return max(1, _bytes_on_disk(path) // 2)
    except OSError:
        return 1
