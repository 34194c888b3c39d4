"""The HTTP routes of `dtml serve`: jobs as resources (POST creates, GET polls, results are
sub-resources), health, readiness and Prometheus metrics. Errors are JSON `{"error": one line}`."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from dtml_deploy.errors import DtmlError, InputError
from dtml_deploy.serve.auth import BearerAuth
from dtml_deploy.serve.dicomweb import DicomWebSource, PacsError
from dtml_deploy.serve.inference import Model, parse_job_options
from dtml_deploy.serve.jobs import JobQueue, QueueFull
from dtml_deploy.serve.metrics import Metrics
from dtml_deploy.serve.settings import ServeSettings
from dtml_deploy.serve.store import Job, JobStore, UnknownJob
from dtml_deploy.serve.uploads import TooLarge, display_name, receive_form, upload_suffix
from dtml_deploy.serve.work import run_job

MAX_JSON_BYTES = 64 * 1024
STOP_JOIN_S = 10.0  # after a drain, how long the workers may take to leave a job given up on
MEDIA_TYPES = {".dcm": "application/dicom", ".gz": "application/gzip", ".png": "image/png"}


@dataclass
class Service:
    """What the routes share: the model, the job store and queue, the metrics."""

    model: Model
    settings: ServeSettings
    store: JobStore
    jobs: JobQueue
    metrics: Metrics

    @classmethod
    def start(cls, model: Model, settings: ServeSettings) -> Service:
        store = JobStore(settings.store)
        store.recover("the server stopped before the job finished; submit it again")
        # The gauges read `jobs` when scraped, by then it exists.
        metrics = Metrics(lambda: jobs.depth, lambda: jobs.running, lambda: model.batcher.stats)
        jobs = JobQueue(store, lambda job: run_job(job, store, model, settings), settings.workers, settings.queue,
                        on_finish=metrics.finished)
        service = cls(model, settings, store, jobs, metrics)
        threading.Thread(target=service._expire_loop, name="dtml-retention", daemon=True).start()
        return service

    def _expire_loop(self) -> None:
        wait = min(60.0, self.settings.retention_s / 4)
        while True:
            threading.Event().wait(wait)
            with contextlib.suppress(OSError):  # a folder removed under it (DELETE) is retried next round
                self.store.expire(self.settings.retention_s)

    def stop(self, drain_s: float) -> None:
        """Drain the queue (see JobQueue.drain), stop the device thread, and let the workers end: a job given
        up on fails at its next batch, so no thread is inside torch when the process exits."""
        self.jobs.drain(drain_s)
        self.model.close()
        self.jobs.join(STOP_JOIN_S)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


async def _read_json(request: Request) -> Any:
    import json

    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise TooLarge(f"a JSON job is at most {MAX_JSON_BYTES // 1024} KB")
    try:
        return json.loads(body)
    except ValueError as e:
        raise InputError(f"the body is not JSON ({e})") from None


def _dicomweb_job(service: Service, body: Any) -> Job:
    if not isinstance(body, dict) or not isinstance(body.get("dicomweb"), dict):
        raise InputError('a JSON job is {"dicomweb": {"url": ..., "study": UID, "series": UID}, "store": true}')
    unknown = set(body) - {"dicomweb", "store", "options"} or set(body["dicomweb"]) - {"url", "study", "series"}
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    missing = {"url", "study"} - {k for k, v in body["dicomweb"].items() if v is not None}
    if missing:
        raise InputError(f"dicomweb needs {' and '.join(sorted(missing))}")
    source = DicomWebSource(**{k: str(v) for k, v in body["dicomweb"].items() if v is not None})
    if not isinstance(body.get("options") or {}, dict):
        raise InputError('"options" is an object: {"head": "seg", "tta": true, ...}')
    options = parse_job_options(body.get("options") or {})
    if not isinstance(body.get("store", False), bool):
        raise InputError('"store" is true or false')
    job = service.store.create(name=f"series {source.series or '(the study)'}", dicomweb=vars(source),
                               store=body.get("store", False), options=options)
    service.store.save(job)
    return job


async def _upload_job(service: Service, request: Request) -> Job:
    limit = service.settings.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + 64 * 1024:
        raise TooLarge(f"the upload ({int(length) / 2**20:.1f} MB) is larger than the server's limit of "
                       f"{limit / 2**20:g} MB")
    job = service.store.create()
    folder = service.store.folder(job.id)
    try:
        form = await receive_form(request.headers["content-type"], request.stream(), folder / "upload.part", limit)
        suffix = upload_suffix(form.filename)
        job.options = parse_job_options(form.fields)
        (folder / "input").mkdir()
        (folder / "upload.part").rename(folder / "input" / f"{job.id}{suffix}")
        job.name, job.input = display_name(form.filename), f"input/{job.id}{suffix}"
        service.store.save(job)
    except BaseException:
        service.store.delete(job.id)
        raise
    return job


def _result(service: Service, job_id: str, key: str, missing: str) -> Path:
    job = service.store.load(job_id)
    if job.status in ("queued", "running"):
        raise _NotYet(f"job {job_id} is {job.status}")
    if job.status == "failed":
        raise _NotYet(f"job {job_id} failed: {job.error}")
    path = service.store.result(job, (job.report or {}).get(key))
    if path is None:
        raise UnknownJob(missing)
    return path


class _NotYet(DtmlError):
    """The job has no results yet (409)."""


def create_app(service: Service, token: str | None) -> Any:
    """The ASGI app: FastAPI routes, wrapped in the bearer-token check when a token is set."""
    app = FastAPI(title="dtml", summary="Left-atrium segmentation jobs", version="1")
    statuses = {TooLarge: 413, InputError: 400, PacsError: 400, UnknownJob: 404, _NotYet: 409}

    @app.exception_handler(DtmlError)
    async def dtml_error(request: Request, e: DtmlError) -> JSONResponse:
        if isinstance(e, QueueFull):
            service.metrics.rejected()
            return _error(503, str(e), {"Retry-After": str(e.retry_after)})
        code = next((c for t, c in statuses.items() if isinstance(e, t)), 500)
        return _error(code, str(e).splitlines()[0] if str(e) else type(e).__name__)

    _health_routes(app, service)
    _job_routes(app, service)
    _result_routes(app, service)
    return app if token is None else BearerAuth(app, token)


def _health_routes(app: FastAPI, service: Service) -> None:
    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "model": service.model.describe()}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        jobs = service.jobs
        if not jobs.accepting:
            return _error(503, "shutting down")
        if jobs.depth >= jobs.capacity:
            return _error(503, "the queue is full", {"Retry-After": str(jobs.retry_after())})
        return JSONResponse({"status": "ready", "queued": jobs.depth, "running": jobs.running})

    @app.get("/metrics")
    def metrics() -> Response:
        body, ctype = service.metrics.text()
        return Response(body, media_type=ctype)


def _job_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request) -> JSONResponse:
        jobs, ctype = service.jobs, request.headers.get("content-type", "")
        if not jobs.accepting or jobs.depth >= jobs.capacity:  # before reading an upload that cannot queue
            raise QueueFull("the server is shutting down" if not jobs.accepting else
                            f"the queue is full ({jobs.capacity} jobs waiting); retry later", jobs.retry_after())
        if ctype.startswith("multipart/form-data"):
            job = await _upload_job(service, request)
        elif ctype.startswith("application/json"):
            job = _dicomweb_job(service, await _read_json(request))
        else:
            return _error(415, "send multipart/form-data with a 'file' part, or a JSON DICOMweb job")
        jobs.submit(job)
        return JSONResponse({"id": job.id, "status": "queued"}, 202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return service.store.load(job_id).public()

    @app.delete("/v1/jobs/{job_id}", status_code=204)
    def delete_job(job_id: str) -> Response:
        job = service.store.load(job_id)
        if job.status in ("queued", "running"):
            raise _NotYet(f"job {job_id} is {job.status}; delete it once it has finished")
        service.store.delete(job_id)
        return Response(status_code=204)


def _result_routes(app: FastAPI, service: Service) -> None:
    @app.get("/v1/jobs/{job_id}/mask")
    def mask(job_id: str) -> FileResponse:
        path = _result(service, job_id, "output", "no mask")
        ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                            filename=f"mask{ext}" if ext != ".dcm" else "seg.dcm")

    @app.get("/v1/jobs/{job_id}/preview")
    def preview(job_id: str) -> FileResponse:
        return FileResponse(_result(service, job_id, "preview", "this job drew no preview (submit it with "
                                    "preview=true)"), media_type="image/png")

    @app.get("/v1/jobs/{job_id}/report")
    def report(job_id: str) -> JSONResponse:
        job = service.store.load(job_id)
        if job.status in ("queued", "running") or job.report is None:
            if job.status == "failed":
                return JSONResponse({"input": job.name, "status": "failed", "error": job.error})
            raise _NotYet(f"job {job_id} is {job.status}")
        return JSONResponse(job.report)
