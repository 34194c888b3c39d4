"""A real `dtml serve` process (uvicorn) on loopback: the README's curl lines work, uploads over the limit
get 413 before they are sent whole, SIGTERM drains within its bound. Every process is stopped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.cli import app
from tests.conftest import REPO, SAMPLE, sample_ids
from tests.serve.conftest import write_crop
from tests.serve.orthanc import free_port, orthanc_missing, running_orthanc

pytestmark = pytest.mark.slow
README = REPO / "README.md"
START_TIMEOUT_S = 90.0


@contextlib.contextmanager
def dtml_serve(*args: str, cwd: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `dtml serve ARGS` on a free loopback port, wait for /healthz, yield (base URL, process); stop it."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dtml_deploy", "serve", "--port", str(port), *args], cwd=cwd,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"{base}/healthz", timeout=2).close()
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"dtml serve did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
            yield base, proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def _post_file(base: str, path: Path) -> str:
    r = subprocess.run(["curl", "-s", "-F", f"file=@{path}", f"{base}/v1/jobs"], capture_output=True, timeout=60)
    return json.loads(r.stdout)["id"]


def _job(base: str, job_id: str) -> dict:
    with urllib.request.urlopen(f"{base}/v1/jobs/{job_id}", timeout=10) as r:
        return json.loads(r.read())


def _readme_block(starts: str) -> list[str]:
    """The lines of the README's bash block whose first line starts with `starts`."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if b.startswith(starts)).strip().splitlines()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_readme_curl_lines_work_against_a_real_server(tmp_path):
    lines = _readme_block("dtml serve")
    serve_args = lines[0].split("&")[0].split()[2:]  # `dtml serve ARGS &`: the server is started here
    store = serve_args.index("--store") + 1
    serve_args[store] = str(tmp_path / serve_args[store])
    with dtml_serve(*serve_args, cwd=REPO, log=tmp_path / "serve.log") as (base, _):
        script = "\n".join(["set -e", *lines[1:]]).replace("http://127.0.0.1:8000", base)
        script = script.replace("tests/data/", f"{REPO}/tests/data/")
        (tmp_path / "readme.sh").write_text(script + "\n")
        r = subprocess.run(["timeout", "120", "bash", "readme.sh"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=150)
        assert r.returncode == 0, (r.stdout, r.stderr)
        got = np.asarray(nib.load(str(tmp_path / "mask.nii.gz")).dataobj)
        scan = REPO / re.search(r"file=@(\S+)", "\n".join(lines)).group(1)
        r = CliRunner().invoke(app, ["segment", str(scan), "-o", str(tmp_path / "cli"), "--device", "cpu",
                                     "--no-progress"])
        assert r.exit_code == 0, r.output
        np.testing.assert_array_equal(got, np.asarray(nib.load(str(tmp_path / "cli" / scan.name)).dataobj))
        if orthanc_missing() is None:
            _readme_dicomweb_line(base, tmp_path)


def _readme_dicomweb_line(base: str, tmp_path: Path) -> None:
    """The README's DICOMweb curl line, against a real Orthanc holding a series made from a real case."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from tests.dtml_deploy.test_formats import _oblique_lps, _real_voxels, write_dicom_series

    (line,) = _readme_block("curl -s -H 'Content-Type: application/json'")
    series = write_dicom_series(tmp_path / "series", _real_voxels(SAMPLE), *_oblique_lps())
    datasets = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
    with running_orthanc(tmp_path / "orthanc") as url:
        DICOMwebClient(url).store_instances(datasets)
        env = dict(os.environ, STUDY=datasets[0].StudyInstanceUID, SERIES=datasets[0].SeriesInstanceUID)
        cmd = line.replace("http://127.0.0.1:8000", base).replace("http://127.0.0.1:8042/dicom-web", url)
        r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
        job_id = json.loads(r.stdout)["id"]
        deadline = time.monotonic() + 120
        while (job := _job(base, job_id))["status"] not in ("done", "failed") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert job["status"] == "done" and job["stored_seg"], job
        found = DICOMwebClient(url).search_for_series(study_instance_uid=str(datasets[0].StudyInstanceUID),
                                                      search_filters={"Modality": "SEG"})
        assert len(found) == 1


def _raw_upload(base: str, headers: list[str], chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send a request by hand from a thread while waiting for the answer; the sender stops as soon as the
    server has answered. Returns (the answer's first bytes, the body bytes sent by then)."""
    import threading

    host, port = base.removeprefix("http://").split(":")
    sent, answered = [0], threading.Event()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())

        def send() -> None:
            for chunk in chunks:
                if answered.is_set():
                    return
                try:
                    s.sendall(chunk)
                except OSError:  # the server closed the connection after answering
                    return
                sent[0] += len(chunk)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = s.recv(65536)
        answered.set()
        n = sent[0]
        sender.join(10)
        return answer, n


def _form_chunks(total_mb: int, chunked: bool) -> Iterator[bytes]:
    head = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.nii.gz\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n")
    block = bytes(64 * 1024)
    for i in range(total_mb * 16):
        data = (head if i == 0 else b"") + block
        yield (f"{len(data):x}\r\n".encode() + data + b"\r\n") if chunked else data
        time.sleep(0.002)


def test_uploads_over_the_limit_get_413_before_they_are_sent_whole(serve_bundle, tmp_path):
    store = tmp_path / "store"
    with dtml_serve("--model", str(serve_bundle), "--device", "cpu", "--backend", "torch", "--max-upload-mb", "1",
                    "--store", str(store), cwd=tmp_path, log=tmp_path / "serve.log") as (base, proc):
        host = base.removeprefix("http://")
        common = [f"Host: {host}", "Content-Type: multipart/form-data; boundary=b"]
        answer, sent = _raw_upload(base, ["POST /v1/jobs HTTP/1.1", *common, f"Content-Length: {200 * 2**20}"],
                                   _form_chunks(200, chunked=False))
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 8 * 2**20, sent  # answered from the header, not after 200 MB
        answer, sent = _raw_upload(base, ["POST /v1/jobs HTTP/1.1", *common, "Transfer-Encoding: chunked"],
                                   _form_chunks(200, chunked=True))
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 16 * 2**20, sent  # refused once the streamed bytes passed 1 MB
        assert proc.poll() is None and urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        assert list(store.iterdir()) == []  # nothing of either upload stays on disk


def test_sigterm_stops_taking_jobs_fails_what_cannot_finish_and_exits_in_bound(serve_bundle, tmp_path):
    big = tmp_path / "big.nii.gz"  # the whole sample case at overlap 0.9: hundreds of windows, many seconds
    nib.save(nib.load(str(SAMPLE / "images" / f"{sample_ids(SAMPLE)[0]}.nii.gz")), str(big))
    small = write_crop(tmp_path / "small.nii.gz")
    store = tmp_path / "store"
    with dtml_serve("--model", str(serve_bundle), "--device", "cpu", "--backend", "torch", "--workers", "1",
                    "--overlap", "0.9", "--drain-seconds", "2", "--store", str(store), cwd=tmp_path,
                    log=tmp_path / "serve.log") as (base, proc):
        long_job = _post_file(base, big)
        deadline = time.monotonic() + 30
        while _job(base, long_job)["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        queued = _post_file(base, small)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-F", f"file=@{small}",
                            f"{base}/v1/jobs"], capture_output=True, text=True, timeout=30)
        assert r.stdout == "503"  # no new jobs while draining, and polls are still answered
        assert _job(base, long_job)["status"] == "running"
        proc.wait(timeout=30)
        took = time.monotonic() - t0
    from dtml_deploy.serve.app import STOP_JOIN_S
    from dtml_deploy.serve.server import GRACE_S

    # the drain bound, the workers leaving the given-up job, uvicorn's grace for open connections, slack
    assert proc.returncode == 0 and took < 2 + STOP_JOIN_S + GRACE_S + 5, took
    jobs = {j: json.loads((store / j / "job.json").read_text()) for j in (long_job, queued)}
    assert jobs[long_job]["status"] == "failed" and "did not finish within 2 s" in jobs[long_job]["error"]
    assert jobs[queued]["status"] == "failed" and "before the job started" in jobs[queued]["error"]
    log = (tmp_path / "serve.log").read_text()
    assert "stopping: no new jobs" in log and "Traceback" not in log
    assert subprocess.run(["pgrep", "-f", f"--store {store}"], capture_output=True).stdout == b""
