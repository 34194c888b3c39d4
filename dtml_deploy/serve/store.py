"""The job store: one folder per job under the store root, its state in `job.json`.

The only state of the service: any replica that mounts the same root answers for any job, and a restart
finds every job it held. A job id is 32 hex digits made by the server; anything else names no job, so an
id can never reach outside its own folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtml_deploy.errors import DtmlError

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
STATUSES = ("queued", "running", "done", "failed")


class UnknownJob(DtmlError):
    """No job has this id (or it has been deleted after its retention time)."""


@dataclass
class Job:
    """A job's state, as `job.json` holds it; paths are relative to the job's folder."""

    id: str
    status: str = "queued"
    created: float = field(default_factory=time.time)
    name: str = ""  # what the client called the scan (messages only; never a path)
    input: str | None = None  # the scan, relative to the folder
    dicomweb: dict[str, Any] | None = None  # url, study, series of a DICOMweb job
    store: bool = False  # store the SEG back into the study
    options: dict[str, Any] = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    report: dict[str, Any] | None = None  # the per-case report `segment --json` writes
    stored: str | None = None  # the SOP Instance UID of the SEG stored back
    stages: dict[str, float] = field(default_factory=dict)
    owner: str = field(default_factory=socket.gethostname)  # the replica that queued it (see recover)

    def public(self) -> dict[str, Any]:
        """What GET /v1/jobs/{id} answers."""
        rep = self.report or {}
        seconds = round(self.finished - self.created, 3) if self.finished else None
        return {"id": self.id, "status": self.status, "error": self.error, "name": self.name,
                "qc": rep.get("qc"), "seconds": seconds, "stages": self.stages, "stored_seg": self.stored,
                "dicomweb": self.dicomweb}


class JobStore:
    """Job folders under `root` (made if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, job_id: str) -> Path:
        if not JOB_ID.match(job_id):
            raise UnknownJob(f"no job {job_id[:40]!r}")
        return self.root / job_id

    def create(self, **fields: Any) -> Job:
        job = Job(id=uuid.uuid4().hex, **fields)
        (self.root / job.id).mkdir()
        return job

    def save(self, job: Job) -> None:
        """Write job.json atomically (a reader sees the old state or the new, never half)."""
        folder = self.folder(job.id)
        fd, tmp = tempfile.mkstemp(prefix=".job.", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(job), f)
        os.replace(tmp, folder / "job.json")

    def load(self, job_id: str) -> Job:
        path = self.folder(job_id) / "job.json"
        try:
            return Job(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise UnknownJob(f"no job {job_id}") from None

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def result(self, job: Job, relative: str | None) -> Path | None:
        """A result file of `job`, only when it lies inside the job's folder."""
        if not relative:
            return None
        folder = self.folder(job.id).resolve()
        path = (folder / relative).resolve()
        return path if path.is_relative_to(folder) and path.is_file() else None

    def all_ids(self) -> list[str]:
        return [p.name for p in self.root.iterdir() if JOB_ID.match(p.name) and (p / "job.json").is_file()]

    def expire(self, retention_s: float, now: float | None = None) -> list[str]:
        """Delete finished jobs older than `retention_s` (and folders a crash left without job.json)."""
        now = time.time() if now is None else now
        gone = []
        for p in self.root.iterdir():
            if not JOB_ID.match(p.name):
                continue
            try:
                job = self.load(p.name)
            except (UnknownJob, ValueError, TypeError):
                if now - p.stat().st_mtime > retention_s:
                    shutil.rmtree(p, ignore_errors=True)
                    gone.append(p.name)
                continue
            if job.finished is not None and now - job.finished > retention_s:
                self.delete(job.id)
                gone.append(job.id)
        return gone

    def recover(self, reason: str) -> int:
        """Fail the jobs a previous run of this replica (same host name) left queued or running: their work
        is lost, their record is not. Other replicas' jobs in a shared store are left to them."""
        n, me = 0, socket.gethostname()
        for job_id in self.all_ids():
            job = self.load(job_id)
            if job.status in ("queued", "running") and job.owner == me:
                job.status, job.error, job.finished = "failed", reason, time.time()
                self.save(job)
                n += 1
        return n
