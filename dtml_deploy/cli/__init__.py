"""The `dtml` command line: the layer on top of the core (dtml_deploy), training/ and export/.

One module per command; `common` holds what they share. Every option's default and choices come from
the core's dataclasses and tuples. The toolkit's own errors end in one line on stderr and exit code 2
(1 when only some of several inputs failed). Nothing below this package imports it.
"""

from __future__ import annotations

import sys

import typer

from dtml_deploy.cli import benchmark, evaluate, export, plot, segment, serve, train
from dtml_deploy.cli.common import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="DTML: train, export, segment, evaluate and benchmark dual-task V-Nets.")
app.command("train")(train.train)
app.command("export")(export.export_cmd)
app.command("segment")(segment.segment)
app.command("evaluate")(evaluate.evaluate)
app.command("benchmark")(benchmark.benchmark)
app.command("plot")(plot.plot)
app.command("serve")(serve.serve)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
