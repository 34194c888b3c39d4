"""training/validate.py: each head's validation Dice equals segmenting the case and scoring it directly."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dtml_deploy.backends.base import BackendOptions
from dtml_deploy.backends.torch_backend import TorchBackend
from dtml_deploy.engine.sliding import EngineConfig
from dtml_deploy.io.datasets import open_source
from dtml_deploy.metrics import dice
from dtml_deploy.segment import Segmenter, SegmentOptions
from dtml_training.data.cache import load_image, load_label
from dtml_training.validate import validate
from tests.conftest import make_bundle


def _cropped_cases(sample_root: Path, dst: Path, n: int = 2) -> Path:
    """The first `n` real sample cases cropped around their centre to 36x36x34 (8 windows of 32^3)."""
    for sub in ("images", "labels"):
        (dst / sub).mkdir(parents=True)
    for path in sorted((sample_root / "images").glob("*.nii.gz"))[:n]:
        for sub in ("images", "labels"):
            img = nib.load(str(sample_root / sub / path.name))
            data = np.asarray(img.dataobj)
            lo = [(s - c) // 2 for s, c in zip(data.shape, (36, 36, 34))]
            crop = data[lo[0]:lo[0] + 36, lo[1]:lo[1] + 36, lo[2]:lo[2] + 34]
            nib.save(nib.Nifti1Image(np.asarray(crop, dtype=np.float32 if sub == "images" else np.uint8),
                                     img.affine), str(dst / sub / path.name))
    return dst


def test_validation_dice_per_head_matches_direct_scoring(sample_root: Path, tmp_path: Path) -> None:
    src = open_source(_cropped_cases(sample_root, tmp_path))
    cases = tuple(src.labeled(i) for i in src.case_ids)
    first = load_image(cases[0])
    bundle = make_bundle(centre_on=first[:32, :32, :32])
    net = bundle.build()
    got = validate(net, bundle.model, cases, torch.device("cpu"))
    assert set(got) == {"val_dice_seg", "val_dice_sdm"}
    for head, channel in (("seg", "p_seg"), ("sdm", "p_dis")):
        seg = Segmenter(bundle, TorchBackend(bundle, BackendOptions(precision="fp32", batch=1), (channel,)),
                        SegmentOptions(engine=EngineConfig(head=head, qc=False)))
        scores = []
        for case in cases:
            img = load_image(case)
            scores.append(dice(seg.segment_array(img).mask, load_label(case, img.shape)))
        assert got[f"val_dice_{head}"] == pytest.approx(float(np.mean(scores)), abs=1e-12)
    assert 0.0 < got["val_dice_seg"] < 1.0  # the centred heads give a real, imperfect mask
