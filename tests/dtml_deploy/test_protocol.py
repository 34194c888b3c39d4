"""`--protocol dtml|paper`: one typed preset in the core, explicit flags override dtml's and must agree with
the paper's."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.cli import app
from dtml_deploy.engine.grid import PAPER_STRIDE, GridSpec
from dtml_deploy.engine.sliding import EngineConfig
from dtml_deploy.protocol import DTML, PAPER, resolve_protocol
from dtml_deploy.segment import SegmentOptions
from dtml_deploy.settings import PredictorSettings

CPU = ["--backend", "torch", "--device", "cpu", "--no-progress"]


def _cli(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_dtml_protocol_takes_its_values_from_the_core_defaults() -> None:
    e, s = EngineConfig(), SegmentOptions()
    assert (DTML.overlap, DTML.stride, DTML.blend, DTML.head, DTML.lcc, DTML.tta) == \
        (e.grid.overlap, e.grid.stride, e.blend, e.head, s.lcc, e.tta)
    assert DTML.head == "mean" == PredictorSettings().engine.head  # the default head lives in EngineConfig
    assert GridSpec().overlap == 0.5 and DTML.precision is None  # the device's default precision


def test_paper_protocol_is_the_released_codes_test_loop() -> None:
    assert (PAPER.stride, PAPER.blend, PAPER.precision, PAPER.head, PAPER.lcc, PAPER.tta) == \
        (PAPER_STRIDE, "constant", "fp32", "seg", True, False) and PAPER_STRIDE == (18, 18, 4)


def test_explicit_flags_override_dtml() -> None:
    p = resolve_protocol("dtml", head="seg", stride=[18, 18, 4], blend="constant", lcc=False, tta=True)
    assert (p.head, p.stride, p.blend, p.lcc, p.tta, p.precision) == ("seg", (18, 18, 4), "constant", False,
                                                                        True, None)
    assert resolve_protocol("dtml", head=None) == DTML  # None: not given


@pytest.mark.parametrize("flag,value,shown", [("head", "mean", "--head mean"), ("overlap", 0.25, "--overlap 0.25"),
                                              ("precision", "bf16", "--precision bf16"), ("lcc", False, "--no-lcc"),
                                              ("tta", True, "--tta"), ("blend", "gaussian", "--blend gaussian"),
                                              ("stride", (18, 18, 8), "--stride 18 18 8")])
def test_paper_refuses_a_contradicting_flag(flag: str, value: object, shown: str) -> None:
    with pytest.raises(ValueError, match=f"--protocol paper uses .*; {shown} contradicts it"):
        resolve_protocol("paper", **{flag: value})


def test_paper_accepts_flags_that_agree() -> None:
    assert resolve_protocol("paper", head="seg", stride=(18, 18, 4), blend="constant", precision="fp32",
                            lcc=True, tta=False) == PAPER
    with pytest.raises(ValueError, match="protocol must be one of"):
        resolve_protocol("nnunet")


def test_cli_refuses_the_contradiction_in_one_line_and_writes_nothing(sample_root: Path, tmp_path: Path) -> None:
    scan = next((sample_root / "images").glob("*.nii.gz"))
    out = tmp_path / "out"
    r = _cli("segment", scan, "-o", out, *CPU, "--protocol", "paper", "--head", "mean")
    assert r.exit_code == 2
    assert [ln for ln in r.output.splitlines() if ln.strip()] == [
        "error: --protocol paper uses --head seg; --head mean contradicts it (drop it, or use --protocol dtml)"]
    assert not out.exists()


def test_evaluate_protocol_paper_equals_the_papers_flags(tiny_bundle_dir: Path, sample_root: Path,
                                                         tmp_path: Path) -> None:
    """One flag gives exactly the run of the documented flags, and the report names the settings."""
    cid = json.loads((sample_root / "splits.json").read_text())["labeled_2"][0]
    common = ["evaluate", "--model", tiny_bundle_dir, "--data", sample_root, "--cases", cid, *CPU, "--batch", "16"]
    r1 = _cli(*common, "--protocol", "paper", "--json", tmp_path / "a.json")
    r2 = _cli(*common, "--stride", "18", "18", "4", "--blend", "constant", "--precision", "fp32", "--head", "seg",
              "--json", tmp_path / "b.json")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    eng = a["engine"]
    assert (eng["protocol"], eng["stride"], eng["blend"], eng["head"], eng["lcc"], eng["tta"], eng["precision"]) == \
        ("paper", [18, 18, 4], "constant", "seg", True, False, "fp32")
    assert b["engine"]["protocol"] == "dtml"
    for key in ("dice", "jaccard", "hd95", "asd", "windows", "agreement"):
        assert a["cases"][0][key] == b["cases"][0][key], key
    assert a["cases"][0]["windows"] == 4 * 4 * 7  # 80x72x56 on a 32^3 patch at stride 18/18/4


def test_segment_tta_runs_four_flips_and_reports_it(tiny_bundle_dir: Path, sample_root: Path,
                                                    tmp_path: Path) -> None:
    scan = next((sample_root / "images").glob("*.nii.gz"))
    img = nib.load(str(scan))
    crop = tmp_path / "crop.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:40, :40, :32].astype(np.float32), img.affine), str(crop))
    r = _cli("segment", crop, "-o", tmp_path / "out", "--model", tiny_bundle_dir, *CPU, "--tta",
             "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["engine"]["tta"] is True and report["cases"][0]["status"] == "ok"
