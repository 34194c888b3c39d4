"""`dtml segment --dicomweb URL --study UID [--series UID] [--store]`: the series come over WADO-RS into a
temporary folder (removed afterwards) and are segmented as folders would be; with --store each case's
DICOM SEG goes back into its study over STOW-RS."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from dtml_deploy.errors import InputError
from dtml_deploy.segment import CaseReport

DicomWebOpt = Annotated[str | None, typer.Option(
    help="Read the series from this DICOMweb server (WADO-RS), e.g. http://pacs:8042/dicom-web")]
StudyOpt = Annotated[str | None, typer.Option(help="--dicomweb: the study's UID")]
SeriesOpt = Annotated[str | None, typer.Option(
    help="--dicomweb: one series' UID (default: every image series of the study)")]
StoreOpt = Annotated[bool, typer.Option(help="--dicomweb: store each DICOM SEG back into its study (STOW-RS)")]


@contextlib.contextmanager
def scans_from(inputs: list[str], expand: Callable[..., list[Path]], noting: bool, url: str | None,
               study: str | None, series: str | None) -> Iterator[list[Path]]:
    """The local scans (`expand(inputs, note)`, its notes on stderr when `noting`: rank 0), or the series of
    `study` on `url` (or the one named) fetched into folders named by their series UID, removed afterwards."""
    if url is None:
        from dtml_deploy.cli.common import echo_err

        yield expand(inputs, echo_err if noting else lambda _: None)
        return
    from dtml_deploy.serve.dicomweb import DicomWebSource, fetch_series, image_series

    if study is None:
        raise InputError("--dicomweb needs --study UID (and optionally --series UID)")
    source = DicomWebSource(url=url, study=study, series=series)
    with tempfile.TemporaryDirectory(prefix="dtml-dicomweb-") as tmp:
        yield [fetch_series(source, uid, Path(tmp) / uid) for uid in image_series(source)]


def check_dicomweb_options(url: str | None, inputs: list[str], study: str | None, series: str | None, store: bool,
                           output_format: str) -> None:
    """Refuse, before any work, options that do not go together."""
    if url is None:
        given = [n for n, v in (("--study", study), ("--series", series), ("--store", store)) if v]
        if given:
            raise InputError(f"{', '.join(given)} only go with --dicomweb URL")
        if not inputs:
            raise InputError("no scans given: name files, folders or globs, or --dicomweb URL --study UID")
        return
    if inputs:
        raise InputError("give scans or --dicomweb, not both")
    if store and output_format not in ("auto", "dicom-seg"):
        raise InputError(f"--store sends the DICOM SEG back; --format {output_format} writes none")


def stored(reports: list[CaseReport] | None, url: str | None, say: Callable[[str], None]) -> list[CaseReport] | None:
    """With `url`: STOW-RS each segmented case's SEG into its study; a case whose SEG the PACS did not take
    becomes failed. Returns `reports`."""
    from dtml_deploy.serve.dicomweb import PacsError, store_seg

    if url is None or not reports:
        return reports
    for rep in reports:
        if rep.status != "ok" or not str(rep.output).endswith("_seg.dcm"):
            continue
        try:
            uid = store_seg(str(url), Path(str(rep.output)))
            say(f"  stored {Path(str(rep.output)).name} into its study on {url} (SOP Instance UID {uid})")
        except PacsError as e:
            say(f"error: {e}")
            rep.status, rep.error = "failed", str(e)
    return reports
