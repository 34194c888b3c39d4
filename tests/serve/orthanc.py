"""A real Orthanc (Debian's orthanc + orthanc-dicomweb) on loopback for the tests: free ports, its own
storage in a temporary folder, remote access off, the DICOMweb plugin on; always stopped."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_S = 30.0


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if shutil.which(ORTHANC) is None:
        return f"Orthanc is not installed ({ORTHANC}; apt-get install orthanc orthanc-dicomweb)"
    if not DICOMWEB_PLUGIN.is_file():
        return f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_orthanc(folder: Path) -> Iterator[str]:
    """Start Orthanc with its storage under `folder`; yield its DICOMweb root URL; stop it."""
    http_port, dicom_port = free_port(), free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = {"Name": "dtml-test", "HttpPort": http_port, "DicomPort": dicom_port,
              "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "storage"),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpBindAddress": "127.0.0.1",
              "DicomServerEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "config.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([ORTHANC, str(folder / "config.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/dicom-web/studies", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (folder / "orthanc.log").read_text()[-2000:]
                    raise RuntimeError(f"Orthanc did not start: {tail}") from None
                time.sleep(0.2)
        yield f"{base}/dicom-web"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
