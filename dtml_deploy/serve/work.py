"""What one job does: get its scan (upload, zipped series, or DICOMweb), segment it, store the SEG back."""

from __future__ import annotations

import re
import time
from pathlib import Path

from dtml_deploy.errors import DtmlError, InputError
from dtml_deploy.serve.dicomweb import DicomWebSource, fetch_series, image_series, store_seg
from dtml_deploy.serve.inference import Model
from dtml_deploy.serve.settings import ServeSettings
from dtml_deploy.serve.store import Job, JobStore
from dtml_deploy.serve.uploads import extract_series


def _scan(job: Job, folder: Path, settings: ServeSettings) -> Path:
    """The scan to segment, inside the job's folder."""
    if job.dicomweb is not None:
        t = time.perf_counter()
        source = DicomWebSource(**job.dicomweb)
        found = image_series(source)
        if len(found) > 1:
            raise InputError(f"study {source.study} has {len(found)} image series; name one with \"series\"")
        series = found[0]
        scan = fetch_series(source, series, folder / "input" / "series")
        job.stages["fetch"] = round(time.perf_counter() - t, 4)
        return scan
    scan = folder / str(job.input)
    if scan.name.endswith(".zip"):
        t = time.perf_counter()
        scan = extract_series(scan, folder / "input" / "series", settings.max_unzipped_bytes)
        (folder / str(job.input)).unlink()
        job.stages["unzip"] = round(time.perf_counter() - t, 4)
    return scan


def _public_report(report: dict, job: Job, folder: Path) -> dict:
    """The case report with the client's name for the input and result paths relative to the job."""
    out = dict(report, input=job.name)
    for key in ("output", "preview"):
        if out.get(key):
            out[key] = str(Path(out[key]).relative_to(folder))
    return out


def hide_paths(line: str, folder: Path, name: str) -> str:
    """`line` with every path inside the job's folder (also one a message cut short) shown as the client's
    name for the scan: the client sees the CLI's line for its file, never the server's paths."""
    return re.sub(re.escape(str(folder)) + r"[^\s)'\",:]*", name.replace("\\", "/"), line)


def run_job(job: Job, store: JobStore, model: Model, settings: ServeSettings) -> None:
    """Run `job` to its end: status done, or failed with one line (the CLI's, naming the client's file)."""
    folder = store.folder(job.id)
    scan: Path | None = None
    try:
        scan = _scan(job, folder, settings)
        report = model.segment(scan, folder / "out", job.options)
        job.stages.update(report.seconds)
        job.report = _public_report(report.to_dict(), job, folder)
        if report.status != "ok":
            raise InputError(report.error or "segmentation failed")
        if job.store and job.dicomweb is not None:
            t = time.perf_counter()
            if not str(report.output).endswith("_seg.dcm"):
                raise InputError("store needs the DICOM SEG output (format auto or dicom-seg)")
            job.stored = store_seg(job.dicomweb["url"], Path(str(report.output)))
            job.stages["store"] = round(time.perf_counter() - t, 4)
        job.status = "done"
    except (DtmlError, ValueError, OSError) as e:
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and e.strerror:
            line = f"cannot read or write the job's files: {e.strerror}"
        job.status, job.error = "failed", hide_paths(line, folder, job.name)
        if job.report is not None:
            job.report["error"] = job.error
