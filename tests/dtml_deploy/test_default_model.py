"""The shipped default model: loads, describes itself, and segments a real LA case on the CPU."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.bundle import Bundle
from dtml_deploy.cli import DEFAULT_MODEL, app
from dtml_deploy.metrics import dice


def test_default_model_is_shipped_and_self_describing():
    b = Bundle.load(DEFAULT_MODEL)
    assert b.model.net.n_filters == 16 and b.model.patch_size == (112, 112, 80) and b.model.k == 1500.0
    assert all(p.stat().st_size <= 15_000_000 for p in DEFAULT_MODEL.glob("*.safetensors"))
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert cfg["weights"]["dtype"] == "float16"
    t = b.meta["training"]
    assert b.meta["recipe"]["recipe"] == "dtml" and t["iterations"] == 6000
    assert t["n_labeled"] == 16 and t["n_unlabeled"] == 64 and "H200" in t["device"]
    assert t["wall_seconds"] > 0 and len(b.meta["data_fingerprint"]) == 16


@pytest.mark.slow
def test_default_model_segments_an_unseen_real_case_on_cpu(la2018, tmp_path):
    """The first case of the paper's unlabeled list: training never read its label."""
    splits = json.loads((la2018 / "splits.json").read_text())
    cid = splits["unlabeled_16"][0]
    assert cid not in Bundle.load(DEFAULT_MODEL).meta["training"]["labeled_ids"]
    scan = la2018 / "images" / f"{cid}.nii.gz"
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["segment", str(scan), "-o", str(out), "--device", "cpu", "--no-progress",
                                 "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    pred = np.asarray(nib.load(str(out / f"{cid}.nii.gz")).dataobj)
    label = np.asarray(nib.load(str(la2018 / "labels" / f"{cid}.nii.gz")).dataobj)
    report = json.loads((tmp_path / "r.json").read_text())["cases"][0]
    assert report["intensity"] == "as stored"  # LA2018 is already z-scored; not normalised twice
    assert dice(pred, label) > 0.85
    assert report["agreement"] > 0.85  # the two heads agree on a case the model gets right
