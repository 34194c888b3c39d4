"""Concurrency and faults in process: windows of concurrent jobs share batches with unchanged results, a
full queue answers 503 with Retry-After, a PACS that is down or answers garbage fails the job in one line,
the bearer token guards every route but /healthz, and the server refuses an unsafe bind."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dtml_deploy.backends.base import BackendOptions, create_backend
from dtml_deploy.bundle import Bundle
from dtml_deploy.cli import app
from dtml_deploy.engine.sliding import EngineConfig, SlidingWindowEngine
from dtml_deploy.serve.batching import SharedBackend, WindowBatcher
from tests.serve.conftest import wait_job

pytestmark = pytest.mark.slow  # real crops through a real model, a few seconds each


class _SlowCounting:
    """A backend wrapper that counts forwards and their sizes and takes a while for each (as a device
    does), so that jobs arriving meanwhile queue up."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.sizes = inner, delay, []
        self.options, self.device, self.outputs = inner.options, inner.device, inner.outputs
        self.bundle, self.name, self.input_dtype = inner.bundle, inner.name, inner.input_dtype

    def predict(self, windows: torch.Tensor) -> torch.Tensor:
        self.sizes.append(windows.shape[0])
        time.sleep(self.delay)
        return self.inner.predict(windows)

    def describe(self) -> str:
        return self.inner.describe()


def test_windows_of_concurrent_jobs_share_batches_with_unchanged_results(serve_bundle):
    bundle = Bundle.load(serve_bundle)
    cfg = EngineConfig(qc=True, keep_prob=True)
    real = create_backend("torch", bundle, BackendOptions(device="cpu", batch=4), cfg.channels)
    rng = np.random.default_rng(0)
    volumes = [rng.normal(size=(32, 32, 32)).astype(np.float32) for _ in range(4)]  # one window each
    alone = [SlidingWindowEngine(real, bundle.model.patch_size, cfg).run(v) for v in volumes]
    counting = _SlowCounting(real, delay=0.3)
    batcher = WindowBatcher(counting)  # type: ignore[arg-type]
    shared = SharedBackend(batcher)
    results: list = [None] * 4

    def job(i: int) -> None:
        results[i] = SlidingWindowEngine(shared, bundle.model.patch_size, cfg).run(volumes[i])

    threads = [threading.Thread(target=job, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    batcher.close()
    # Four one-window jobs: the first runs alone, the three that arrive meanwhile run as one batch.
    assert counting.sizes == [4, 4] and batcher.stats.windows == 4 and batcher.stats.forwards == 2
    for a, b in zip(alone, results):
        np.testing.assert_array_equal(a.mask, b.mask)
        # fp32 convolutions in a batch of 4 instead of 1 round differently (5e-6 measured); a mixed-up row
        # (another job's window) would differ by tenths.
        np.testing.assert_allclose(a.prob, b.prob, atol=2e-5)
        assert a.agreement == pytest.approx(b.agreement, abs=1e-9)


def test_a_full_queue_answers_503_with_retry_after_and_nothing_is_lost(service_client, scan):
    service, client = service_client(workers=1, queue=1)
    gate = threading.Event()
    real_segment = service.model.segment

    def held(*args, **kwargs):
        gate.wait(30)
        return real_segment(*args, **kwargs)

    service.model.segment = held  # the first job holds the only worker until the queue has been tried
    files = {"file": ("scan.nii.gz", scan.read_bytes())}
    running = client.post("/v1/jobs", files=files).json()["id"]
    deadline = time.monotonic() + 10
    while client.get(f"/v1/jobs/{running}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    queued = client.post("/v1/jobs", files=files).json()["id"]
    for _ in range(3):
        r = client.post("/v1/jobs", files=files)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert "queue is full" in r.json()["error"]
    assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200
    gate.set()
    assert wait_job(client, running)["status"] == "done" and wait_job(client, queued)["status"] == "done"
    assert client.get("/readyz").status_code == 200
    assert 'dtml_jobs_total{outcome="rejected"} 3.0' in client.get("/metrics").text
    assert sorted(service.store.all_ids()) == sorted([running, queued])  # refused jobs left nothing


class _Garbage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>not DICOMweb</html>"
        self.send_response(200)
        self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=xyz')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def garbage_pacs():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_pacs_down_or_answering_garbage_fails_the_job_in_one_line(service_client, garbage_pacs):
    _, client = service_client()
    down = f"http://127.0.0.1:{_free_port()}/dicom-web"
    for url, message in ((down, f"cannot reach the PACS at {down} to send series 1.2.3 of study 1.2"),
                         (garbage_pacs, f"the PACS at {garbage_pacs} did not answer as DICOMweb to send series")):
        r = client.post("/v1/jobs", json={"dicomweb": {"url": url, "study": "1.2", "series": "1.2.3"}, "store": True})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["id"])
        assert job["status"] == "failed" and job["error"].startswith(message) and "\n" not in job["error"], job
    for body, message in (({"dicomweb": {"url": down, "study": "1.2; rm -rf /"}}, "is not a DICOM study UID"),
                          ({"dicomweb": {"url": "file:///etc", "study": "1.2"}}, "is not a DICOMweb URL"),
                          ({"dicomweb": {"url": down, "study": "1.2"}, "stor": True}, "unknown field(s) stor"),
                          ({"url": down}, 'a JSON job is {"dicomweb"'), ({"dicomweb": {}}, "needs study and url"),
                          ({"dicomweb": {"url": down, "study": "1.2"}, "options": ["tta"]}, '"options" is an object'),
                          ({"dicomweb": {"url": down, "study": "1.2"}, "options": {"tta": "x"}}, "give true or false")):
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    assert client.get("/healthz").status_code == 200


def test_the_cli_gives_the_same_line_for_a_pacs_that_is_down(serve_bundle, tmp_path):
    down = f"http://127.0.0.1:{_free_port()}/dicom-web"
    r = CliRunner().invoke(app, ["segment", "--dicomweb", down, "--study", "1.2", "--series", "1.2.3", "-o",
                                 str(tmp_path / "out"), "--model", str(serve_bundle), "--device", "cpu"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: cannot reach the PACS at {down} to send series 1.2.3 of study 1.2 (connection refused or host down)"]
    r = CliRunner().invoke(app, ["segment", "scan.nii.gz", "--study", "1.2", "--model", str(serve_bundle)])
    assert r.exit_code == 2 and "error: --study only go with --dicomweb URL" in r.output
    r = CliRunner().invoke(app, ["segment", "--model", str(serve_bundle)])
    assert r.exit_code == 2 and r.output.strip() == ("error: no scans given: name files, folders or globs, or "
                                                     "--dicomweb URL --study UID")


def test_the_token_guards_every_route_but_healthz(service_client, scan, tmp_path):
    token = "s3cret-token-0123456789"
    _, client = service_client(token=token)
    good = {"Authorization": f"Bearer {token}"}
    assert client.get("/healthz").status_code == 200
    for method, path in (("get", "/readyz"), ("get", "/metrics"), ("post", "/v1/jobs"), ("get", "/v1/jobs/" + "a" * 32),
                         ("get", "/docs"), ("get", "/openapi.json")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            r = getattr(client, method)(path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
    r = client.post("/v1/jobs", files={"file": ("scan.nii.gz", scan.read_bytes())}, headers=good)
    assert r.status_code == 202
    assert wait_job(client, r.json()["id"], headers=good)["status"] == "done"
    assert client.get("/metrics", headers=good).status_code == 200


def test_serve_refuses_an_open_bind_without_token_a_weak_token_and_a_taken_port(tmp_path, monkeypatch):
    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--store", str(tmp_path / "s")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: --host 0.0.0.0 is reachable from other machines; pass --token-file F (a bearer token every "
        "request must carry) or bind 127.0.0.1"]
    weak = tmp_path / "token"
    weak.write_text("short\n")
    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--token-file", str(weak)])
    assert r.exit_code == 2 and "the token must be one line of at least 16 characters" in r.output
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--port", str(port), "--store", str(tmp_path / "s")])
    assert r.exit_code == 2 and r.output.strip() == (f"error: cannot listen on 127.0.0.1:{port} "
                                                     "(Address already in use)"), r.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    r = CliRunner().invoke(app, ["serve"])
    assert r.exit_code == 2 and r.output.strip() == "error: dtml serve needs fastapi: pip install 'dtml[serve]'"
    assert not Path("dtml-jobs").exists() or Path("dtml-jobs").is_dir()


def test_a_drain_lets_running_jobs_finish_and_fails_queued_ones_with_the_reason(service_client, scan):
    service, client = service_client(workers=1, queue=4)
    gate = threading.Event()
    real_segment = service.model.segment
    service.model.segment = lambda *a, **k: (gate.wait(30), real_segment(*a, **k))[1]
    files = {"file": ("scan.nii.gz", scan.read_bytes())}
    running = client.post("/v1/jobs", files=files).json()["id"]
    while client.get(f"/v1/jobs/{running}").json()["status"] != "running":
        time.sleep(0.02)
    queued = client.post("/v1/jobs", files=files).json()["id"]
    drain = threading.Thread(target=service.jobs.drain, args=(30,))
    drain.start()
    time.sleep(0.2)
    r = client.post("/v1/jobs", files=files)
    assert r.status_code == 503 and "shutting down" in r.json()["error"] and client.get("/readyz").status_code == 503
    assert client.get(f"/v1/jobs/{queued}").json()["error"].startswith("the server shut down (SIGTERM) before")
    gate.set()
    drain.join(30)
    assert not drain.is_alive() and client.get(f"/v1/jobs/{running}").json()["status"] == "done"
