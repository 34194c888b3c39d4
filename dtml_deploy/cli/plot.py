"""`dtml plot`: redraw a run's training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtml_deploy.cli.common import require_viz, user_errors


def plot(
    run_dir: Annotated[Path, typer.Argument(help="A `dtml train` run folder (holds train_log.jsonl)")],
    output: Annotated[str | None, typer.Option(
        "-o", "--output", help="PNG to write, or a folder for training_curves.png (default: RUN_DIR)")] = None,
) -> None:
    """Redraw a run's training curves from its log, also while it is still training (needs dtml[viz])."""
    with user_errors():
        from dtml_deploy.io.reports import picture_target
        from dtml_deploy.viz.curves import CURVES_PNG
        from dtml_training.run_visuals import draw_curves

        require_viz("dtml plot")
        typer.echo(str(draw_curves(run_dir, None if output is None else picture_target(output, CURVES_PNG))))
