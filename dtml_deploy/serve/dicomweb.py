"""DICOMweb in and out: a series read with WADO-RS, its DICOM SEG stored back with STOW-RS.

Shared by `dtml segment --dicomweb` and the service's DICOMweb jobs. Every failure of the PACS (down,
refusing, answering an error or something that is not DICOMweb) is one `PacsError` line naming the URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtml_deploy.errors import DtmlError, InputError

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
NOT_IMAGES = ("SEG", "SR", "PR", "KO", "RTSTRUCT", "REG")  # series in a study that are not scans to segment
_SERIES_UID, _MODALITY = "0020000E", "00080060"
RETRY_ATTEMPTS, RETRY_WAIT_MS = 3, 125


class PacsError(DtmlError):
    """The PACS could not be reached or did not answer as DICOMweb."""


@dataclass(frozen=True)
class DicomWebSource:
    """A study on a DICOMweb server, and optionally one of its series (else: every image series)."""

    url: str
    study: str
    series: str | None = None

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.url):
            raise InputError(f"{self.url!r} is not a DICOMweb URL (http://host:port/dicom-web)")
        for what, uid in (("study", self.study), ("series", self.series)):
            if uid is not None and (len(uid) > 64 or not UID.match(uid)):
                raise InputError(f"{uid!r} is not a DICOM {what} UID (digits and dots, at most 64)")


def _require() -> Any:
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise InputError("DICOMweb needs dicomweb-client: pip install 'dtml[serve]'") from None
    return DICOMwebClient


def _client(url: str, timeout: float) -> Any:
    client = _require()(url=url.rstrip("/"), timeout=timeout)
    # A PACS that is busy (429, 503) gets RETRY_ATTEMPTS tries, 0.25 s then 0.5 s apart; one that is down
    # fails the job in about a second instead of the client's default half a minute of back-off.
    client.set_http_retry_params(retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS)
    return client


def pacs_error(url: str, action: str, e: BaseException) -> PacsError:
    """One line for a failed DICOMweb call."""
    import requests

    if isinstance(e, requests.ConnectionError):
        return PacsError(f"cannot reach the PACS at {url} to {action} (connection refused or host down)")
    if isinstance(e, requests.Timeout):
        return PacsError(f"the PACS at {url} did not answer in time to {action}")
    if isinstance(e, requests.HTTPError) and e.response is not None:
        r = e.response
        return PacsError(f"the PACS at {url} answered HTTP {r.status_code} ({r.reason}) to {action}")
    first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    return PacsError(f"the PACS at {url} did not answer as DICOMweb to {action} ({first})")


def image_series(source: DicomWebSource, timeout: float = 60.0) -> list[str]:
    """The series UIDs to segment: the one named, or every series of the study that holds images."""
    if source.series is not None:
        return [source.series]
    try:
        found = _client(source.url, timeout).search_for_series(study_instance_uid=source.study)
        uids = [s[_SERIES_UID]["Value"][0] for s in found
                if (s.get(_MODALITY, {}).get("Value") or [""])[0] not in NOT_IMAGES]
    except PacsError:
        raise
    except Exception as e:
        raise pacs_error(source.url, f"list the series of study {source.study}", e) from None
    if not uids:
        raise InputError(f"study {source.study} on {source.url} has no image series")
    return uids


def fetch_series(source: DicomWebSource, series: str, dest: Path, timeout: float = 120.0) -> Path:
    """Retrieve one series (WADO-RS) into the new folder `dest`, one numbered file per instance."""
    action = f"send series {series} of study {source.study}"
    try:
        datasets = _client(source.url, timeout).retrieve_series(source.study, series)
    except Exception as e:
        raise pacs_error(source.url, action, e) from None
    if not datasets:
        raise InputError(f"series {series} of study {source.study} on {source.url} has no instances")
    dest.mkdir(parents=True)
    for i, ds in enumerate(datasets):
        try:
            ds.save_as(str(dest / f"{i:05d}.dcm"), enforce_file_format=True)
        except (ValueError, AttributeError) as e:  # an answer that parsed but is no DICOM instance
            raise pacs_error(source.url, action, e) from None
    return dest


def store_seg(url: str, seg_file: Path, timeout: float = 120.0) -> str:
    """Store a DICOM SEG file into its study (STOW-RS); returns its SOP Instance UID."""
    import pydicom

    ds = pydicom.dcmread(str(seg_file))
    action = f"store the SEG into study {ds.StudyInstanceUID}"
    try:
        answer = _client(url, timeout).store_instances([ds], study_instance_uid=ds.StudyInstanceUID)
    except Exception as e:
        raise pacs_error(url, action, e) from None
    failed = getattr(answer, "FailedSOPSequence", None)
    if failed:
        reason = getattr(failed[0], "FailureReason", "?")
        raise PacsError(f"the PACS at {url} refused the SEG (failure reason {reason}) to {action}")
    return str(ds.SOPInstanceUID)
