"""Names with matplotlib's mathtext characters (`$`, `_`, `^`, `\\`, `{}`) are drawn as written: in segment
previews, evaluate's report thumbnails, `dtml plot` and the benchmark chart; the masks are written and every
case is listed once."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("matplotlib", reason="pictures need matplotlib (the viz extra)")

from dtml_deploy.cli import app
from dtml_deploy.viz.bench_plot import benchmark_figure
from dtml_deploy.viz.figure import figure_rgb, new_figure, verbatim
from tests.conftest import crop_real_case, make_bundle, sample_ids
from tests.dtml_deploy.test_viz_plots import _rows, _write_log

# a$b and x_1^2 and c\d as users name files; a pair of `$` is mathtext (broken or silently italic)
NAMES = ["a$b", "x_1^2", "c\\d", "x$^$y", "p$q$r", "a$_$b", "{$\\alpha$}"]


def _drawn(text: str, **kw: object) -> np.ndarray:
    fig = new_figure(3.0, 0.5, 100)
    fig.text(0.02, 0.3, text, fontsize=10, **kw)
    return figure_rgb(fig)


@pytest.mark.parametrize("name", NAMES)
def test_verbatim_draws_the_characters_as_written(name: str) -> None:
    assert np.array_equal(_drawn(verbatim(name)), _drawn(name, parse_math=False))


def test_benchmark_chart_draws_row_names_as_written() -> None:
    rows = [{"name": n, "status": "passed", "ms_per_window_best": 10.0 + i, "ms_per_window_b1": 12.0,
             "best_batch": 2, "mvox_per_s": 1.0} for i, n in enumerate(NAMES)]
    fig = benchmark_figure(rows, title="x$^$y")
    figure_rgb(fig)  # renders
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert [t.replace("\\$", "$") for t in ticks] == NAMES


@pytest.mark.slow
def test_segment_previews_and_evaluate_report_with_such_names(sample_root: Path, tmp_path: Path) -> None:
    cid = sample_ids(sample_root)[0]
    scans, gt = tmp_path / "scans", tmp_path / "gt"
    scans.mkdir()
    gt.mkdir()
    for n in NAMES:
        nib.save(crop_real_case(sample_root, cid, (32, 32, 32)), str(scans / f"{n}.nii.gz"))
        nib.save(crop_real_case(sample_root, cid, (32, 32, 32), "labels"), str(gt / f"{n}.nii.gz"))
    bundle = make_bundle(patch=(32, 32, 32)).save(tmp_path / "b")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["segment", str(scans), "--model", str(bundle), "--device", "cpu", "--no-progress",
                                 "-o", str(out), "--preview", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert "error" not in r.output and "Traceback" not in r.output
    cases = json.loads((tmp_path / "s.json").read_text())["cases"]
    assert sorted(Path(c["input"]).name for c in cases) == sorted(f"{n}.nii.gz" for n in NAMES)
    assert all(c["status"] == "ok" for c in cases)
    for n in NAMES:
        assert (out / f"{n}.nii.gz").is_file() and (out / f"{n}_preview.png").stat().st_size > 1000
    pred = tmp_path / "pred"
    pred.mkdir()
    for n in NAMES:
        (pred / f"{n}.nii.gz").write_bytes((out / f"{n}.nii.gz").read_bytes())
    r = CliRunner().invoke(app, ["evaluate", str(pred), str(gt), "--json", str(tmp_path / "e.json"),
                                 "--report", str(tmp_path / "e.html")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "e.json").read_text())["cases"]
    assert sorted(row["case"] for row in rows) == sorted(NAMES)
    assert (tmp_path / "e.html").read_text().count("data:image/png;base64") >= len(NAMES)


def test_plot_draws_a_run_named_with_mathtext(tmp_path: Path) -> None:
    run = tmp_path / "run$^$x_1"
    _write_log(run / "train_log.jsonl", _rows())
    r = CliRunner().invoke(app, ["plot", str(run)])
    assert r.exit_code == 0, r.output
    assert (run / "training_curves.png").stat().st_size > 1000


def test_a_thumbnail_that_fails_lists_its_case_once(sample_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import dtml_deploy.viz.report as report

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    for n in ("good", "drawn_badly"):
        lab = crop_real_case(sample_root, sample_ids(sample_root)[0], (32, 32, 32), "labels")
        nib.save(lab, str(pred / f"{n}.nii.gz"))
        nib.save(lab, str(gt / f"{n}.nii.gz"))
    real = report.preview_png

    def failing(mask: np.ndarray, affine: np.ndarray, spacing: object, title: str, **kw: object) -> bytes:
        if title.startswith("drawn_badly"):
            raise RuntimeError("cannot draw")
        return real(mask, affine, spacing, title, **kw)

    monkeypatch.setattr(report, "preview_png", failing)
    r = CliRunner().invoke(app, ["evaluate", str(pred), str(gt), "--json", str(tmp_path / "e.json"),
                                 "--report", str(tmp_path / "e.html")])
    assert r.exit_code == 1, r.output
    rows = json.loads((tmp_path / "e.json").read_text())["cases"]
    assert sorted(row["case"] for row in rows) == ["drawn_badly", "good"]
    bad = next(row for row in rows if row["case"] == "drawn_badly")
    assert bad["status"] == "failed" and "cannot draw" in bad["error"]
