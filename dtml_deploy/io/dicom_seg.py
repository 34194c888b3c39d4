"""DICOM Segmentation (SEG) out, through highdicom: a BINARY segment 'left atrium cavity' on the
source series' own slices, referencing them, with the algorithm (dtml, its version, the bundle hash).

Frames map one to one onto the source slices in the series' sorted order (empty frames are kept), so
frame k carries mask[:, :, k] transposed to (rows, columns) and the source slice's position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dtml_deploy.errors import InputError
from dtml_deploy.io.itk_io import ItkGeometry
from dtml_deploy.io.volume import Volume
from dtml_deploy.version import __version__

SEGMENT_LABEL = "left atrium cavity"


def _require() -> tuple[Any, Any]:
    try:
        import highdicom as hd
        import pydicom
    except ImportError:
        raise InputError("writing DICOM SEG needs highdicom and pydicom: pip install 'dtml[dicom]'") from None
    return hd, pydicom


def build_seg(ref: Volume, mask: np.ndarray, bundle_hash: str) -> Any:
    """The SEG dataset for `mask` (X, Y, Z) on `ref`, a volume read from a DICOM series."""
    if not (isinstance(ref.header, ItkGeometry) and ref.header.family == "dicom"):
        raise InputError(f"{ref.path}: --format dicom-seg needs a DICOM series as input")
    if tuple(mask.shape) != ref.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the reference grid {ref.shape}")
    hd, pydicom = _require()
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in ref.header.files]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="dtml", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={"bundle_hash": bundle_hash})
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.LeftAtrium,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
    try:
        return hd.seg.Segmentation(
            source_images=sources, pixel_array=np.ascontiguousarray(mask.transpose(2, 1, 0) > 0),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
            series_instance_uid=hd.UID(), series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="dtml", manufacturer_model_name="dtml",
            software_versions=__version__, device_serial_number="none", series_description="dtml left atrium",
            omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError) as e:  # highdicom's checks on the source series
        raise InputError(f"{ref.path}: cannot build DICOM SEG from this series ({str(e)[:160]})") from None


def save_seg(dataset: Any, path: Path) -> None:
    dataset.save_as(str(path), enforce_file_format=True)
