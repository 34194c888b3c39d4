"""Run the service under uvicorn; SIGTERM drains the job queue before the server stops.

On the first SIGTERM (or Ctrl-C) the queue stops taking jobs (POST answers 503) while GETs go on being
served; queued jobs fail with the reason, running ones get `--drain-seconds` to finish, then uvicorn
shuts down and the process exits 0. A second signal stops at once (uvicorn's own handling).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from dtml_deploy.serve.app import Service, create_app
from dtml_deploy.serve.inference import Model
from dtml_deploy.serve.settings import ServeSettings, read_token

GRACE_S = 5.0  # after the drain, open HTTP connections get this long


def run_server(model: Model, settings: ServeSettings, say: Callable[[str], None]) -> None:
    """Serve until SIGTERM/SIGINT; returns once every job has a final state on disk."""
    import uvicorn

    token = read_token(settings)
    service = Service.start(model, settings)
    config = uvicorn.Config(create_app(service, token), host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=int(GRACE_S), access_log=False, lifespan="off")

    class DrainingServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.draining:  # a second signal: stop now
                return super().handle_exit(sig, frame)
            self.draining = True
            say(f"dtml serve: stopping: no new jobs; {service.jobs.running} running get up to "
                f"{settings.drain_s:g} s")

            def drain() -> None:
                service.jobs.drain(settings.drain_s)
                self.should_exit = True  # not uvicorn's handle_exit: a drained server exits 0, not by the signal

            threading.Thread(target=drain, name="dtml-drain", daemon=True).start()

    server = DrainingServer(config)
    auth = "bearer token required" if token else "no token (loopback only)"
    say(f"dtml serve: {model.describe()}; http://{settings.host}:{settings.port} ({auth}); job store "
        f"{settings.store}")
    try:
        server.run()
    finally:
        service.stop(0)  # nothing left after a SIGTERM drain; a server that failed to start has no jobs
    say("dtml serve: stopped")
