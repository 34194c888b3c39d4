"""The job routes in process: an upload's mask is the CLI's, options apply, results are sub-resources, bad
uploads fail with the CLI's line and leave the server healthy, job ids cannot leave their folder."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.cli import app
from tests.serve.conftest import CPU, wait_job

pytestmark = pytest.mark.slow  # real crops through a real model, a few seconds each


def _cli_mask(scan: Path, bundle: Path, out: Path, *extra: str) -> tuple[np.ndarray | None, dict]:
    r = CliRunner().invoke(app, ["segment", str(scan), "-o", str(out), "--model", str(bundle), *CPU,
                                 "--json", str(out / "report.json"), *extra])
    assert r.exit_code == 0, r.output
    case = json.loads((out / "report.json").read_text())["cases"][0]
    from dtml_deploy.io.volume import read_volume

    if case["output"].endswith(".dcm"):  # a DICOM SEG: the caller reads it with pydicom
        return None, case
    return read_volume(Path(case["output"])).array.astype(np.uint8), case


def _submit(client, path: Path, name: str | None = None, **fields) -> str:
    r = client.post("/v1/jobs", files={"file": (name or path.name, path.read_bytes())}, data=fields)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    return r.json()["id"]


def test_upload_job_gives_the_cli_mask_report_and_metrics(service_client, scan, serve_bundle, tmp_path):
    _, client = service_client()
    job_id = _submit(client, scan)
    job = wait_job(client, job_id)
    assert job["status"] == "done" and job["error"] is None and job["seconds"] > 0 and "windows" in job["stages"]
    r = client.get(f"/v1/jobs/{job_id}/mask")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    (tmp_path / "got.nii.gz").write_bytes(r.content)
    got = nib.load(str(tmp_path / "got.nii.gz"))
    want, case = _cli_mask(scan, serve_bundle, tmp_path / "cli")
    assert 0 < want.sum() < want.size  # the centred bundle gives a mask that can differ
    np.testing.assert_array_equal(np.asarray(got.dataobj), want)
    np.testing.assert_allclose(got.affine, nib.load(str(scan)).affine)
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    assert report["input"] == "scan.nii.gz" and not report["output"].startswith("/")
    for key in ("status", "shape", "spacing", "windows", "foreground_voxels", "agreement", "intensity"):
        assert report[key] == case[key], key
    assert client.get(f"/v1/jobs/{job_id}/preview").status_code == 404  # no preview asked for
    metrics = client.get("/metrics").text
    names = {ln.split("{")[0].split(" ")[0] for ln in metrics.splitlines() if ln and not ln.startswith("#")}
    assert names and all(n.startswith("dtml_") for n in names), names
    assert 'dtml_jobs_total{outcome="done"} 1.0' in metrics
    assert "dtml_queue_depth 0.0" in metrics and 'dtml_stage_seconds_count{stage="windows"} 1.0' in metrics
    windows = next(float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith("dtml_windows_total"))
    assert windows == case["windows"]


def test_job_options_apply_and_bad_ones_are_one_line(service_client, scan, serve_bundle, tmp_path):
    _, client = service_client()
    job_id = _submit(client, scan, head="seg", lcc="false", format="nrrd")
    assert wait_job(client, job_id)["status"] == "done"
    r = client.get(f"/v1/jobs/{job_id}/mask")
    assert r.headers["content-disposition"].endswith('filename="mask.nrrd"')
    (tmp_path / "got.nrrd").write_bytes(r.content)
    from dtml_deploy.io.volume import read_volume

    want, _ = _cli_mask(scan, serve_bundle, tmp_path / "cli", "--head", "seg", "--no-lcc", "--format", "nrrd")
    np.testing.assert_array_equal(read_volume(tmp_path / "got.nrrd").array.astype(np.uint8), want)
    for fields, message in (({"head": "both"}, "option head='both': choose from seg, sdm, mean"),
                            ({"gpu": "1"}, "unknown option 'gpu'"), ({"tta": "maybe"}, "give true or false")):
        r = client.post("/v1/jobs", files={"file": ("scan.nii.gz", scan.read_bytes())}, data=fields)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    assert client.get("/healthz").status_code == 200


def test_bad_uploads_fail_with_the_cli_line_and_the_server_stays_healthy(service_client, scan, serve_bundle,
                                                                        tmp_path):
    service, client = service_client()
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file\n" * 40)
    job = wait_job(client, _submit(client, bad))
    from dtml_deploy.serve.work import hide_paths

    # The CLI's line for the file the job read, with the server's path shown as the client's file name.
    folder = service.store.folder(job["id"])
    stored = folder / service.store.load(job["id"]).input
    r = CliRunner().invoke(app, ["segment", str(stored), "-o", str(tmp_path / "cli"), "--model", str(serve_bundle),
                                 *CPU])
    cli_line = next(ln for ln in r.output.splitlines() if ln.startswith("error: "))
    assert job["status"] == "failed" and f"error: {job['error']}" == hide_paths(cli_line, folder, "broken.nii.gz")
    assert job["error"].startswith("broken.nii.gz: cannot read NIfTI") and str(tmp_path) not in job["error"]
    assert client.get(f"/v1/jobs/{job['id']}/mask").status_code == 409
    assert client.get(f"/v1/jobs/{job['id']}/report").json()["error"] == job["error"]
    for files, message in ((("scan.txt", b"x"), "scan.txt: not an accepted upload"),
                           (("../../etc/passwd.nii.gz", b"x" * 10), None)):
        r = client.post("/v1/jobs", files={"file": files})
        if message:
            assert r.status_code == 400 and message in r.json()["error"]
        else:  # the name only chooses the format: the job runs in its own folder and fails on the content
            assert r.status_code == 202
            failed = wait_job(client, r.json()["id"])
            assert failed["status"] == "failed" and failed["name"] == "passwd.nii.gz"
    assert client.post("/v1/jobs", data={"head": "seg"}, files={"x": ("a", b"")}).status_code == 400
    assert client.post("/v1/jobs", content=b"raw", headers={"content-type": "text/plain"}).status_code == 415
    assert client.get("/healthz").status_code == 200
    assert wait_job(client, _submit(client, scan))["status"] == "done"
    assert sorted(p.name for p in service.store.root.iterdir()) == sorted(service.store.all_ids())


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_members_never_become_paths_and_bombs_are_refused(tmp_path):
    from dtml_deploy.errors import InputError
    from dtml_deploy.serve.uploads import extract_series

    archive = tmp_path / "series.zip"
    archive.write_bytes(_zip({"../../evil.dcm": b"a", "/abs/x.dcm": b"b", "ok/IM1": b"c"}))
    out = extract_series(archive, tmp_path / "job" / "series", max_bytes=2**20)
    assert sorted(p.name for p in out.iterdir()) == ["00000.dcm", "00001.dcm", "00002.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job", "series.zip"]
    archive.write_bytes(_zip({"zeros.dcm": bytes(8 * 2**20)}))  # 8 MB of zeros, a few KB zipped
    assert archive.stat().st_size < 64 * 1024
    with pytest.raises(InputError, match="expands beyond the server's limit of 1 MB"):
        extract_series(archive, tmp_path / "bomb", max_bytes=2**20)
    assert not (tmp_path / "bomb").exists()
    archive.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="not a readable zip"):
        extract_series(archive, tmp_path / "bad", max_bytes=2**20)


def test_job_ids_cannot_reach_other_files(service_client, scan):
    service, client = service_client()
    job_id = _submit(client, scan)
    wait_job(client, job_id)
    for bad in ("..", "..%2F..%2Fetc%2Fpasswd", job_id.upper(), job_id + "0", "0" * 31, "%2E%2E"):
        for tail in ("", "/mask", "/report"):
            assert client.get(f"/v1/jobs/{bad}{tail}").status_code == 404, (bad, tail)
    # a job.json that names a file outside its folder (a tampered store) gives nothing
    outside = service.store.root / "secret.nii.gz"
    outside.write_bytes(b"secret")
    job = service.store.load(job_id)
    job.report["output"] = "../secret.nii.gz"
    service.store.save(job)
    assert client.get(f"/v1/jobs/{job_id}/mask").status_code == 404


def test_retention_deletes_finished_jobs_and_delete_frees_early(service_client, scan):
    import time

    service, client = service_client()
    first, second = _submit(client, scan), _submit(client, scan)
    wait_job(client, first), wait_job(client, second)
    assert service.store.expire(3600) == []
    assert service.store.expire(3600, now=time.time() + 3601) != []
    assert client.get(f"/v1/jobs/{first}").status_code == 404
    third = _submit(client, scan)
    wait_job(client, third)
    assert client.delete(f"/v1/jobs/{third}").status_code == 204
    assert client.get(f"/v1/jobs/{third}").status_code == 404 and not any(service.store.root.iterdir())


def test_a_zipped_dicom_series_gives_the_cli_seg(service_client, serve_bundle, sample_root, tmp_path):
    import pydicom

    from tests.dtml_deploy.test_formats import _oblique_lps, _real_voxels, write_dicom_series

    series = write_dicom_series(tmp_path / "series", _real_voxels(sample_root), *_oblique_lps())
    archive = tmp_path / "series.zip"
    archive.write_bytes(_zip({f"study/{p.name}": p.read_bytes() for p in sorted(series.iterdir())}))
    _, client = service_client()
    job = wait_job(client, _submit(client, archive))
    assert job["status"] == "done" and "unzip" in job["stages"], job
    r = client.get(f"/v1/jobs/{job['id']}/mask")
    assert r.headers["content-type"] == "application/dicom"
    (tmp_path / "got.dcm").write_bytes(r.content)
    _, case = _cli_mask(series, serve_bundle, tmp_path / "cli")
    want = pydicom.dcmread(case["output"]).pixel_array
    np.testing.assert_array_equal(pydicom.dcmread(tmp_path / "got.dcm").pixel_array, want)
    assert 0 < want.sum() < want.size


def test_nrrd_and_mha_uploads_come_back_in_their_own_format(service_client, scan, serve_bundle, tmp_path):
    sitk = pytest.importorskip("SimpleITK", reason="the itk extra (SimpleITK) is not installed")
    from dtml_deploy.io.volume import read_volume

    _, client = service_client()
    for suffix in (".nrrd", ".mha"):
        path = tmp_path / f"scan{suffix}"
        sitk.WriteImage(sitk.ReadImage(str(scan)), str(path))
        job = wait_job(client, _submit(client, path))
        assert job["status"] == "done", job
        r = client.get(f"/v1/jobs/{job['id']}/mask")
        assert r.headers["content-disposition"].endswith(f'filename="mask{suffix}"')
        (tmp_path / f"got{suffix}").write_bytes(r.content)
        want, _ = _cli_mask(path, serve_bundle, tmp_path / f"cli_{suffix[1:]}")
        np.testing.assert_array_equal(read_volume(tmp_path / f"got{suffix}").array.astype(np.uint8), want)
