"""`dtml serve`: the segmentation service (dtml_deploy/serve), with the same settings options as `segment`."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from dtml_deploy.cli import segment as segment_cmd
from dtml_deploy.cli.common import echo_err, load_predictor, predictor_settings, require_viz, user_errors
from dtml_deploy.serve.settings import SERVE_EXTRA, ServeError, ServeSettings

# The settings options of `segment`, taken from its signature so that each is defined once.
SEGMENT_SETTINGS = ("model", "backend", "artifact", "device", "precision", "protocol", "overlap", "stride", "batch",
                    "blend", "head", "tta", "qc", "lcc", "resample", "intensity", "save_prob", "save_sdm",
                    "save_uncertainty", "output_format", "preview", "compile", "cuda_graphs", "cudnn_fusion",
                    "spacing", "max_windows")


def _with_segment_settings(command: Any) -> Any:
    """Append `segment`'s settings options to `command`'s own; the command receives them in **options."""
    theirs = inspect.signature(segment_cmd.segment).parameters
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*own, *(theirs[n] for n in SEGMENT_SETTINGS)])
    return command


def _default(name: str) -> Any:
    return ServeSettings.__dataclass_fields__[name].default


def require_serve() -> None:
    """One line naming the extra when the web stack is missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "python_multipart", "dicomweb_client", "prometheus_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeError(f"dtml serve needs {', '.join(missing)}: {SERVE_EXTRA}")


@_with_segment_settings
def serve(
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; any other needs --token-file)")]
        = _default("host"),
    port: Annotated[int, typer.Option(help="TCP port")] = _default("port"),
    token_file: Annotated[Path | None, typer.Option(
        help="File holding a bearer token; every endpoint but /healthz then needs 'Authorization: Bearer TOKEN'")]
        = _default("token_file"),
    workers: Annotated[int, typer.Option(help="Jobs segmented at once (their windows share device batches)")]
        = _default("workers"),
    queue: Annotated[int, typer.Option(help="Jobs that may wait; beyond that POST answers 503 with Retry-After")]
        = _default("queue"),
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload accepted (larger: 413)")]
        = _default("max_upload_mb"),
    store: Annotated[Path, typer.Option(help="Job store folder (inputs, results, job.json per job)")]
        = _default("store"),
    retention_hours: Annotated[float, typer.Option(help="Finished jobs are deleted this long after they end")]
        = _default("retention_s") / 3600,
    drain_seconds: Annotated[float, typer.Option(help="On SIGTERM, how long running jobs may still take")]
        = _default("drain_s"),
    **options: Any,
) -> None:
    """Serve segmentation over HTTP: upload a scan or name a DICOMweb series, poll the job, fetch the mask."""
    with user_errors():
        require_serve()
        settings = ServeSettings(host=host, port=port, token_file=token_file, workers=workers, queue=queue,
                                 max_upload_mb=max_upload_mb, store=store, retention_s=retention_hours * 3600,
                                 drain_s=drain_seconds)
        from dtml_deploy.serve.settings import check_bind, read_token

        read_token(settings)  # refuse an unsafe bind, a bad token file or a port in use before loading the model
        check_bind(settings)
        if options.get("preview"):
            require_viz("--preview")
        from dtml_deploy.ranks import Ranks
        from dtml_deploy.serve.inference import Model
        from dtml_deploy.serve.server import run_server

        model = options.pop("model")
        predictor = load_predictor(model, predictor_settings(**options), Ranks())
        if predictor.chosen:  # --artifact FOLDER: which of its models serves, and why
            echo_err(f"dtml serve: {predictor.chosen}")
        run_server(Model(predictor), settings, echo_err)
