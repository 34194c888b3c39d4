"""Uploads to disk: a size-limited, streamed multipart form, and a zipped DICOM series extracted safely.

The body is parsed as it arrives (python-multipart's streaming parser), so an upload over the limit is
refused once the limit is passed, never read whole into memory or onto disk. An uploaded file's name only
chooses its format (by suffix); it is stored under a name the server makes. A zip's member names are
never used either: members are written as numbered files, with their count and expanded size bounded.
"""

from __future__ import annotations

import shutil
import zipfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from dtml_deploy.errors import InputError

# What an upload may be, by its name's suffix (longest first): single-file volumes and a zipped series.
UPLOAD_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")
MAX_FIELDS = 32  # form fields besides the file (segment options)
MAX_FIELD_BYTES = 1024
MAX_ZIP_MEMBERS = 10_000  # slices of one series; far more than a 3D LGE series has


class TooLarge(InputError):
    """The upload passed the size limit (the service answers 413)."""


@dataclass
class Form:
    """A parsed upload: the file as stored, the name the client gave it (for messages only), the fields."""

    file: Path | None = None
    filename: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def upload_suffix(filename: str) -> str:
    """The format suffix of an uploaded file's name, or a one-line error listing those accepted."""
    low = filename.lower()
    for s in UPLOAD_SUFFIXES:
        if low.endswith(s):
            return s
    raise InputError(f"{display_name(filename)}: not an accepted upload; send one of "
                     f"{', '.join(UPLOAD_SUFFIXES)} (a .zip holds one DICOM series)")


def display_name(filename: str) -> str:
    """The client's file name for messages: its last component, printable, at most 100 characters."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c if c.isprintable() else "?" for c in base)[:100] or "upload"


class _FormWriter:
    """python-multipart callbacks: the part named `file` streams to `dest`, other parts are small fields."""

    def __init__(self, dest: Path, limit: int) -> None:
        self.dest, self.limit, self.form = dest, limit, Form()
        self._headers: dict[bytes, bytes] = {}
        self._hfield, self._hvalue = b"", b""
        self._name, self._value, self._out, self._size = "", b"", None, 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._hf, "on_header_value": self._hv,
                "on_header_end": self._hend, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._headers, self._value, self._out = {}, b"", None

    def _hf(self, data: bytes, start: int, end: int) -> None:
        self._hfield += data[start:end]

    def _hv(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _hend(self) -> None:
        self._headers[self._hfield.lower()] = self._hvalue
        self._hfield, self._hvalue = b"", b""

    def _headers_done(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file":
            if self.form.file is not None:
                raise InputError("send one file per job (the form has several 'file' parts)")
            self.form.filename = params.get(b"filename", b"").decode("utf-8", "replace")
            upload_suffix(self.form.filename)  # refuse a wrong kind of file before reading it
            self.form.file = self.dest
            self._out = open(self.dest, "wb")  # noqa: SIM115 - closed in _end or by the caller's cleanup
        elif len(self.form.fields) >= MAX_FIELDS:
            raise InputError(f"too many form fields (at most {MAX_FIELDS})")

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._size > self.limit:
            raise TooLarge(f"the upload is larger than the server's limit of {self.limit / 2**20:g} MB")
        if self._out is not None:
            self._out.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise InputError(f"form field '{display_name(self._name)}' is longer than {MAX_FIELD_BYTES} bytes")

    def _end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._name:
            self.form.fields[self._name] = self._value.decode("utf-8", "replace")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


async def receive_form(content_type: str, body: AsyncIterator[bytes], dest: Path, limit: int) -> Form:
    """Stream a multipart/form-data body; its `file` part goes to `dest`. Refuses more than `limit` bytes
    (TooLarge) as soon as they have arrived."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InputError("multipart/form-data without a boundary")
    writer = _FormWriter(dest, limit)
    parser = MultipartParser(boundary, writer.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > limit + 64 * 1024:  # the form's own headers are small; its file counts above
                raise TooLarge(f"the upload is larger than the server's limit of {limit / 2**20:g} MB")
            parser.write(chunk)
        parser.finalize()
    except InputError:
        raise
    except Exception as e:  # python-multipart's parse errors
        raise InputError(f"the upload is not a valid multipart form ({str(e).splitlines()[0][:120]})") from None
    finally:
        writer.close()
    if writer.form.file is None:
        raise InputError("the form has no 'file' part (send the scan as -F file=@scan.nii.gz)")
    return writer.form


def extract_series(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack a zip holding one DICOM series into `dest` as numbered files (member names are ignored, so
    none can point outside `dest`); refuse more than MAX_ZIP_MEMBERS files or `max_bytes` expanded."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if not members:
                raise InputError("the zip holds no files")
            if len(members) > MAX_ZIP_MEMBERS:
                raise InputError(f"the zip holds {len(members)} files; at most {MAX_ZIP_MEMBERS} are accepted")
            if sum(m.file_size for m in members) > max_bytes:
                raise InputError(f"the zip expands beyond the server's limit of {max_bytes / 2**20:g} MB")
            dest.mkdir(parents=True)
            written = 0
            for i, m in enumerate(members):
                with zf.open(m) as src, open(dest / f"{i:05d}.dcm", "wb") as out:
                    while chunk := src.read(1 << 20):  # counted as written: a member may lie about its size
                        written += len(chunk)
                        if written > max_bytes:
                            raise InputError(f"the zip expands beyond the server's limit of "
                                             f"{max_bytes / 2**20:g} MB")
                        out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as e:
        shutil.rmtree(dest, ignore_errors=True)  # a corrupt, truncated, encrypted or oddly compressed zip
        raise InputError(f"the upload is not a readable zip ({str(e).splitlines()[0][:120]})") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest
