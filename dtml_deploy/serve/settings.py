"""The service's own settings (the inference settings are `PredictorSettings`, shared with `segment`)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from dtml_deploy.errors import DtmlError

SERVE_EXTRA = "pip install 'dtml[serve]'"


class ServeError(DtmlError):
    """The service cannot start as asked (missing extra, unsafe bind, bad token file)."""


@dataclass(frozen=True)
class ServeSettings:
    """How `dtml serve` listens, queues and keeps results."""

    host: str = "127.0.0.1"  # loopback: only this machine can call it
    port: int = 8000
    token_file: Path | None = None  # a file holding the bearer token; required for a non-loopback host
    workers: int = 2  # jobs segmented at once; their windows share the device's batches
    queue: int = 16  # jobs waiting beyond those running; a full queue answers 503 with Retry-After
    max_upload_mb: float = 512.0  # an upload over this is refused with 413 as soon as it is known
    store: Path = Path("dtml-jobs")  # the job store: one folder per job (input, results, job.json)
    retention_s: float = 24 * 3600.0  # finished jobs are deleted this long after they end
    drain_s: float = 60.0  # on SIGTERM, how long running jobs may take before they are failed
    max_unzipped_mb: float = 4096.0  # a zipped series may expand to at most this

    def __post_init__(self) -> None:
        for name in ("workers", "queue"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_upload_mb", "retention_s", "drain_s", "max_unzipped_mb"):
            v = getattr(self, name)
            if not v > 0 or v == float("inf"):
                raise ServeError(f"{name.replace('_', '-')} must be a finite number > 0, got {v}")
        if not 0 <= self.port < 65536:
            raise ServeError(f"--port must be in 0..65535, got {self.port}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_unzipped_bytes(self) -> int:
        return int(self.max_unzipped_mb * 2**20)


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def read_token(settings: ServeSettings) -> str | None:
    """The bearer token from --token-file; a non-loopback host without one is refused."""
    if settings.token_file is None:
        if not is_loopback(settings.host):
            raise ServeError(f"--host {settings.host} is reachable from other machines; pass --token-file F "
                             f"(a bearer token every request must carry) or bind 127.0.0.1")
        return None
    try:
        token = Path(settings.token_file).read_text().strip()
    except OSError as e:
        raise ServeError(f"{settings.token_file}: cannot read the token file ({e.strerror})") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ServeError(f"{settings.token_file}: the token must be one line of at least 16 characters "
                         f"without spaces")
    return token


def check_bind(settings: ServeSettings) -> None:
    """Refuse, before the model loads, an address this machine does not have or a port in use."""
    try:
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((settings.host, settings.port))
    except OSError as e:
        raise ServeError(f"cannot listen on {settings.host}:{settings.port} ({e.strerror or e})") from None
