"""Against a real Orthanc: a DICOM series built from a real case is uploaded, segmented by a DICOMweb job
(WADO-RS in) and its SEG stored back into the same study (STOW-RS out); the SEG read back from Orthanc
with highdicom equals the CLI's for the same series. `dtml segment --dicomweb` does the same."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.cli import app
from tests.serve.conftest import CPU, wait_job
from tests.serve.orthanc import orthanc_missing, running_orthanc

pytestmark = [pytest.mark.slow, pytest.mark.skipif(orthanc_missing() is not None, reason=str(orthanc_missing()))]
pytest.importorskip("dicomweb_client", reason="the serve extra (dicomweb-client) is not installed")
hd = pytest.importorskip("highdicom", reason="the dicom extra (highdicom) is not installed")
pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")


@pytest.fixture(scope="module")
def pacs(sample_root, tmp_path_factory):
    """Orthanc holding one real LA series (a 32^3 crop around the atrium, oblique, as a scanner's int16)."""
    from dicomweb_client.api import DICOMwebClient

    from tests.dtml_deploy.test_formats import _oblique_lps, _real_voxels, write_dicom_series

    root = tmp_path_factory.mktemp("pacs")
    series = write_dicom_series(root / "series", _real_voxels(sample_root), *_oblique_lps())
    datasets = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    with running_orthanc(root / "orthanc") as url:
        client = DICOMwebClient(url)
        client.store_instances(datasets)
        yield {"url": url, "client": client, "folder": series, "study": str(datasets[0].StudyInstanceUID),
               "series": str(datasets[0].SeriesInstanceUID)}


def _cli(folder: Path, bundle: Path, out: Path, *extra: str) -> dict:
    r = CliRunner().invoke(app, ["segment", str(folder), "-o", str(out), "--model", str(bundle), *CPU,
                                 "--json", str(out.parent / f"{out.name}.json"), *extra])
    assert r.exit_code == 0, r.output
    return json.loads((out.parent / f"{out.name}.json").read_text())["cases"][0]


def _segs_in_study(client, study: str) -> list[str]:
    found = client.search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"})
    return [s["0020000E"]["Value"][0] for s in found]


def test_a_dicomweb_job_stores_the_cli_seg_into_the_same_study(pacs, service_client, serve_bundle, tmp_path):
    _, client = service_client()
    before = _segs_in_study(pacs["client"], pacs["study"])
    r = client.post("/v1/jobs", json={"dicomweb": {"url": pacs["url"], "study": pacs["study"],
                                                   "series": pacs["series"]}, "store": True})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "done", job
    assert {"fetch", "windows", "store"} <= set(job["stages"])
    added = sorted(set(_segs_in_study(pacs["client"], pacs["study"])) - set(before))
    assert len(added) == 1
    (stored,) = pacs["client"].retrieve_series(pacs["study"], added[0])
    assert str(stored.SOPInstanceUID) == job["stored_seg"] and stored.StudyInstanceUID == pacs["study"]
    seg = hd.seg.Segmentation.from_dataset(stored)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pacs["series"]
    assert seg.SegmentSequence[0].SegmentLabel == "left atrium cavity"
    case = _cli(pacs["folder"], serve_bundle, tmp_path / "cli")
    cli_seg = pydicom.dcmread(case["output"])
    np.testing.assert_array_equal(stored.pixel_array, cli_seg.pixel_array)
    mask = np.asarray(nib.load(str(Path(case["output"]).with_name(Path(case["output"]).name[:-8] + ".nii.gz")))
                      .dataobj)
    assert 0 < int(stored.pixel_array.sum()) == int(mask.sum()) == case["foreground_voxels"] < mask.size
    got = client.get(f"/v1/jobs/{job['id']}/mask")
    assert got.headers["content-type"] == "application/dicom" and got.content[128:132] == b"DICM"


def test_segment_dicomweb_reads_the_study_and_stores_its_seg(pacs, serve_bundle, tmp_path):
    before = _segs_in_study(pacs["client"], pacs["study"])
    out = tmp_path / "over_dicomweb"
    r = CliRunner().invoke(app, ["segment", "--dicomweb", pacs["url"], "--study", pacs["study"], "--store",
                                 "-o", str(out), "--model", str(serve_bundle), *CPU])
    assert r.exit_code == 0, r.output
    assert "stored " in r.output and "into its study" in r.output
    # No --series: the study's image series only (any SEG stored there before is not a scan to segment).
    remote = np.asarray(nib.load(str(out / f"{pacs['series']}.nii.gz")).dataobj)
    case = _cli(pacs["folder"], serve_bundle, tmp_path / "local")
    np.testing.assert_array_equal(remote, np.asarray(nib.load(str(tmp_path / "local" / Path(case["output"]).name
                                                                  .replace("_seg.dcm", ".nii.gz"))).dataobj))
    assert len(_segs_in_study(pacs["client"], pacs["study"])) == len(before) + 1
    r = CliRunner().invoke(app, ["segment", "--dicomweb", pacs["url"], "--study", pacs["study"], "--store",
                                 "--format", "nii.gz", "-o", str(tmp_path / "x"), "--model", str(serve_bundle), *CPU])
    assert r.exit_code == 2 and "--store sends the DICOM SEG back; --format nii.gz writes none" in r.output
