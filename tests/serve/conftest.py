"""Fixtures of the service tests: a saved random bundle centred on a real crop, small real scans, an
in-process service (FastAPI's TestClient) that is drained after each test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import pytest

from tests.conftest import SAMPLE, centred_bundle_dir, crop_real_case, sample_ids

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("python_multipart", reason="the serve extra (python-multipart) is not installed")

CPU = ("--backend", "torch", "--device", "cpu", "--no-progress")


@pytest.fixture(scope="session")
def serve_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """n_filters 4, patch 32: a 40x40x36 crop is 8 windows, a few hundredths of a second on the CPU."""
    return centred_bundle_dir(SAMPLE, tmp_path_factory.mktemp("serve_bundle"))


def write_crop(path: Path, case: int = 0, size: tuple[int, int, int] = (40, 40, 36)) -> Path:
    nib.save(crop_real_case(SAMPLE, sample_ids(SAMPLE)[case], size), str(path))
    return path


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    return write_crop(tmp_path / "scan.nii.gz")


def make_service(bundle: Path, store: Path, **settings):  # -> Service
    from dtml_deploy.predictor import Predictor
    from dtml_deploy.serve.app import Service
    from dtml_deploy.serve.inference import Model
    from dtml_deploy.serve.settings import ServeSettings

    model = Model(Predictor.load(bundle, backend="torch", device="cpu"))
    return Service.start(model, ServeSettings(store=store, **settings))


@pytest.fixture
def service_client(serve_bundle: Path, tmp_path: Path) -> Iterator:
    """A factory: (settings, token) -> (service, TestClient); every service is drained at the end."""
    from fastapi.testclient import TestClient

    from dtml_deploy.serve.app import create_app

    made = []

    def make(token: str | None = None, **settings):
        service = make_service(serve_bundle, tmp_path / "store", **settings)
        made.append(service)
        return service, TestClient(create_app(service, token))

    yield make
    for service in made:
        service.stop(10)


def wait_job(client, job_id: str, timeout: float = 60.0, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers or {}).json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")
