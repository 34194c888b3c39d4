"""`dtml evaluate`: score masks against labels, or segment a data set with a bundle and score it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from dtml_deploy.cli.common import (
    ENGINE_OPTIONS,
    INPUT_OPTIONS,
    POST_OPTIONS,
    ProgressOpt,
    RankTimeoutOpt,
    checked_spacing,
    default_of,
    echo_err,
    exit_for_failures,
    load_predictor,
    predictor_settings,
    require_viz,
    user_errors,
    with_shared,
)
from dtml_deploy.ranks import ShardSettings


def _unique(ids: list[str], cases: str) -> list[str]:
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise ValueError(f"--cases {cases}: case {dupes[0]!r} is listed twice; each case is scored once")
    return ids


def case_list(source: object, cases: str) -> list[str]:
    """A split name of splits.json, a file of ids, or comma-separated ids (each id once)."""
    splits = getattr(source, "splits", {})
    if cases in splits:
        return _unique(list(splits[cases]), cases)
    if Path(cases).is_file():
        from dtml_deploy.io.datasets import read_case_list

        return _unique(read_case_list(Path(cases)), cases)
    ids = _unique([c.strip() for c in cases.split(",") if c.strip()], cases)
    known = set(getattr(source, "case_ids", ()))
    unknown = [c for c in ids if c not in known]
    if unknown:
        raise ValueError(f"--cases: {unknown[0]!r} is neither a split of splits.json, a file, nor a case id")
    return ids


def _score_with_model(data: Path, labels: Path | None, cases: str | None, model: Path | None,
                      options: dict[str, Any], progress: bool, ignore_geometry: bool,
                      visit: Callable[..., None] | None,
                      shard: ShardSettings) -> tuple[list[dict], dict[str, object]] | None:
    """Segment the listed cases of a data root with a bundle and score them; rows and the run's record.
    Under torchrun the cases are shared among the ranks; rank 0 gets every row, the others None."""
    from dtml_deploy.cli.console import opening_lines
    from dtml_deploy.evaluate import score_model
    from dtml_deploy.io.datasets import open_source
    from dtml_deploy.ranks import Ranks

    source = open_source(data, labels_dir=labels)
    ids = case_list(source, cases) if cases else list(source.case_ids)
    ranks = Ranks.from_env()
    predictor = load_predictor(model, predictor_settings(qc=True, **options), ranks)
    if ranks.is_main:
        for note in source.notes:
            typer.echo(note, err=True)
        for line in opening_lines(predictor, f"segmenting {len(ids)} cases", precision_chosen=True, qc=True):
            typer.echo(line, err=True)
    done: list[str] = []
    rows = score_model(predictor, [source.labeled(i) for i in ids],
                       (lambda c: done.append(c) or echo_err(f"  {len(done)}/{len(ids)} {c}"))
                       if progress else None, ignore_geometry=ignore_geometry, visit=visit, shard=shard)
    if rows is None:
        return None
    _warn_guessed(rows, predictor.bundle.model.spacing)
    for r in rows:
        if r.get("warnings"):
            typer.echo(f"warning: {r['case']}: {r['warnings']}", err=True)
    record = predictor.record()
    record["engine"].pop("batch")
    return rows, {**record, "cases_from": cases}


def _score_folder_pair(pred_dir: Path, gt_dir: Path, ignore_geometry: bool, spacing: tuple[float, float, float] | None,
                       visit: Callable[..., None] | None) -> tuple[list[dict], dict[str, object]]:
    """Rows for PRED_DIR GT_DIR, with a warning when labelled cases have no prediction."""
    from dtml_deploy.evaluate import score_folders

    rows, unscored = score_folders(pred_dir, gt_dir, ignore_geometry, spacing, visit)
    _warn_guessed(rows, (1.0, 1.0, 1.0))  # read_volume's default: distances in mm are voxels
    if unscored and any(r["status"] == "ok" for r in rows):  # a smaller set would flatter the mean: say so
        typer.echo(f"warning: {len(unscored)} labelled case(s) have no prediction and are not scored: "
                   f"{', '.join(unscored[:5])}{' ...' if len(unscored) > 5 else ''}", err=True)
    return rows, ({"unscored_labels": unscored} if unscored else {})


def _print_and_write(rows: list[dict], json_out: Path | None, csv_out: Path | None,
                     extra: dict[str, object]) -> tuple[int, dict]:
    """One `error:` line per failed case, the table of the scored ones, the reports; returns the number of
    failures and the summary."""
    from dtml_deploy.evaluate import format_table, summarise_rows, write_reports

    summary = summarise_rows(rows)
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        typer.echo(f"error: {r['error']}", err=True)
    if len(failed) < len(rows):
        typer.echo(format_table(rows, summary))
    write_reports(rows, summary, json_out, csv_out, extra)
    return len(failed), summary


def _warn_guessed(rows: list[dict], model_spacing: tuple[float, float, float]) -> None:
    """Once per run: the geometry that h5 cases lack and that was assumed."""
    from dtml_deploy.io.geometry import guessed_geometry_note

    for r in rows:
        if r.get("geometry_guessed"):
            typer.echo(guessed_geometry_note(r["case"], r["geometry_guessed"].split(","), model_spacing), err=True)
            return


def _check_outputs(json_out: Path | None, csv_out: Path | None, report: Path | None) -> Any:
    """Refuse unusable report paths before any work (a folder, a scan, a label, a prediction, any file but an
    earlier report of the same kind: io/reports.py); the thumbnail collector when --report is given."""
    from dtml_deploy.io.reports import EVALUATE_CSV, EVALUATE_HTML, EVALUATE_JSON, check_distinct, check_report_target

    check_distinct([(json_out, "--json"), (csv_out, "--csv"), (report, "--report")])
    for path, kind in ((json_out, EVALUATE_JSON), (csv_out, EVALUATE_CSV), (report, EVALUATE_HTML)):
        if path is not None:
            check_report_target(path, kind)
    if report is None:
        return None
    from dtml_deploy.viz.report import Thumbnails

    require_viz("--report")
    return Thumbnails()


@with_shared
def evaluate(
    pred_dir: Annotated[Path | None, typer.Argument(help="Folder of predicted masks")] = None,
    gt_dir: Annotated[Path | None, typer.Argument(help="Folder of labels (same case names)")] = None,
    model: Annotated[Path | None, typer.Option(help="Segment with this bundle instead of reading masks")] = None,
    data: Annotated[Path | None, typer.Option(help="Data root for --model (LA2018, h5 or folder layout)")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels folder for a generic folder pair")] = None,
    cases: Annotated[str | None, typer.Option(help="Split name in splits.json, file of ids, or id,id,...")] = None,
    engine: Any = ENGINE_OPTIONS,
    post: Any = POST_OPTIONS,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write per-case rows and summary as JSON")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write per-case rows as CSV")] = None,
    report: Annotated[Path | None, typer.Option(
        help="Write a self-contained HTML report: summary, sortable cases with previews, charts (needs dtml[viz])")]
        = None,
    progress: ProgressOpt = True,
    rank_timeout: RankTimeoutOpt = default_of(ShardSettings, "stall_timeout_s"),
    inputs_: Any = INPUT_OPTIONS,
    ignore_geometry: Annotated[bool, typer.Option(
        help="Score a prediction whose affine differs from its label's (the shapes must still match)")] = False,
    **options: Any,
) -> None:
    """Score masks (PRED_DIR GT_DIR), or segment and score with --model --data --cases. Under torchrun
    --model's cases are shared among the ranks (one per GPU, or CPU processes); rank 0 scores and reports."""
    from dtml_deploy.ranks import Ranks

    with user_errors():
        shard = ShardSettings(stall_timeout_s=rank_timeout)
        thumbs = _check_outputs(json_out, csv_out, report)
        visit: Callable[..., None] | None = thumbs  # type: ignore[assignment]
        if model is not None or data is not None:
            if data is None:
                raise ValueError("--model needs --data (and usually --cases)")
            options["save_uncertainty"] = report is not None
            scored = _score_with_model(data, labels, cases, model, options, progress, ignore_geometry, visit, shard)
            if scored is None:  # another rank of a torchrun launch: rank 0 reports every case
                return
            rows, extra = scored
        elif pred_dir is not None and gt_dir is not None:
            if not Ranks.from_env().is_main:  # masks on disk need no devices: rank 0 scores them all
                return
            rows, extra = _score_folder_pair(pred_dir, gt_dir, ignore_geometry, checked_spacing(options["spacing"]),
                                             visit)
        else:
            raise ValueError("give PRED_DIR GT_DIR, or --model BUNDLE --data DIR [--cases LIST]")
        n_failed, summary = _print_and_write(rows, json_out, csv_out, extra)
        if report is not None:
            from dtml_deploy.viz.report import write_html_report

            scored = [r for r in rows if r.get("status", "ok") == "ok"]
            write_html_report(report, scored, summary, {"predictions": f"masks in {pred_dir}", **extra},
                              thumbs.png)  # type: ignore[attr-defined]
    exit_for_failures(n_failed, len(rows))
