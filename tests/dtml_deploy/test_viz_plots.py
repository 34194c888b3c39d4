"""Training curves, TensorBoard scalars and the benchmark chart: each drawn from the rows it claims to show
(the JSONL log, the benchmark report), checked on the plotted data and on the PNG read back."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("matplotlib", reason="plots need matplotlib (the viz extra)")

from dtml_deploy.cli import app
from dtml_deploy.viz.bench_plot import benchmark_figure
from dtml_deploy.viz.curves import curves_figure
from dtml_deploy.viz.figure import figure_rgb, png_to_rgb
from dtml_training.log_reader import LogTail, read_log
from dtml_training.run_visuals import run_visuals
from dtml_training.tensorboard_sink import TensorBoardTail, tag_of
from tests.conftest import make_bundle


def _rows(n: int = 40, val_every: int = 10) -> list[dict]:
    """Rows shaped like TrainLogger's: per-iteration losses and scalars, validation events."""
    rng = np.random.default_rng(0)
    rows = []
    for it in range(n):
        seg, dis, con = (float(v) for v in rng.uniform(0.05, 1.0, 3) / (1 + it / 10))
        rows.append({"iteration": it, "loss_seg": seg, "loss_dis": dis, "loss_con": con,
                     "loss": seg + dis + 0.1 * con, "lambda": 0.1 * it / n, "lr": 0.01 * 0.1 ** (it // 25),
                     "it_per_s": 2.0 + it % 3, "elapsed_s": it * 0.4})
        if (it + 1) % val_every == 0:
            rows.append({"event": "validation", "iteration": it + 1, "val_dice_seg": 0.5 + it / 100,
                         "val_dice_sdm": 0.45 + it / 100})
    return rows


def _write_log(path: Path, rows: list[dict], partial: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + partial)


def _cli(*args: object):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r


def test_log_reader_and_tail_tolerate_a_line_being_written(tmp_path: Path) -> None:
    log, rows = tmp_path / "train_log.jsonl", _rows(6, val_every=100)
    _write_log(log, rows[:3], partial='{"iteration": 3, "loss_se')
    assert read_log(log) == rows[:3]
    tail = LogTail(log, from_start=True)
    assert tail.read_new() == rows[:3]
    assert tail.read_new() == []  # the half-written line waits
    _write_log(log, rows[:5])  # the writer finished line 3 and wrote line 4 (same file rewritten here)
    assert tail.read_new() == rows[3:5]  # no row lost or doubled
    log.unlink()
    _write_log(log, rows[5:])  # a new run replaced the log
    assert tail.read_new() == rows[5:]


def test_log_tail_skips_what_an_earlier_run_left(tmp_path: Path) -> None:
    log, rows = tmp_path / "train_log.jsonl", _rows(4, val_every=100)
    _write_log(log, rows[:2])
    tail = LogTail(log)  # a run starting now: the two old rows are not its own
    with log.open("a") as f:
        f.write(json.dumps(rows[2]) + "\n")
    assert tail.read_new() == [rows[2]]


def test_curves_plot_the_logged_values(tmp_path: Path) -> None:
    rows = _rows()
    fig = curves_figure(rows)
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}
    steps = [r for r in rows if "event" not in r]
    vals = [r for r in rows if r.get("event") == "validation"]
    for key in ("loss", "loss_seg", "loss_dis", "loss_con", "lambda", "lr", "it_per_s"):
        np.testing.assert_array_equal(lines[key].get_xdata(), [r["iteration"] for r in steps])
        np.testing.assert_array_equal(lines[key].get_ydata(), [r[key] for r in steps], err_msg=key)
    for key in ("val_dice_seg", "val_dice_sdm"):
        np.testing.assert_array_equal(lines[key].get_xdata(), [10, 20, 30, 40])
        np.testing.assert_array_equal(lines[key].get_ydata(), [r[key] for r in vals])
    assert figure_rgb(fig).std() > 10


def test_plot_command_redraws_a_run_in_progress(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_log(run / "train_log.jsonl", _rows(), partial='{"iteration": 40, "lo')
    r = _cli("plot", run)
    assert r.exit_code == 0, r.output
    png = run / "training_curves.png"
    assert r.stdout.strip() == str(png)
    rgb = png_to_rgb(png.read_bytes())
    assert rgb.shape[:2] == (700, 1100) and rgb.std() > 10
    r = _cli("plot", tmp_path / "nothing")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "no training log" in r.stderr
    _write_log(tmp_path / "fresh" / "train_log.jsonl", [], partial='{"iter')
    r = _cli("plot", tmp_path / "fresh")
    assert r.exit_code == 2 and "no complete iteration rows yet" in r.stderr


def test_tensorboard_gets_every_logged_scalar(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional integration; not installed here")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log, rows = tmp_path / "train_log.jsonl", _rows()
    tail = TensorBoardTail.start(log, tmp_path / "tb", poll_s=0.02)
    assert tail is not None
    for i in range(0, len(rows), 7):  # the trainer flushes in chunks while the tail polls
        with log.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows[i:i + 7]))
        threading.Event().wait(0.03)
    tail.stop()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k not in ("iteration", "event"):
                expected.setdefault(tag_of(k), []).append((r["iteration"], float(np.float32(v))))
    assert set(acc.Tags()["scalars"]) == set(expected)
    assert {"loss/total", "loss/seg", "loss/dis", "loss/con", "schedule/lambda", "schedule/lr",
            "speed/it_per_s", "validation/dice_seg"} <= set(expected)
    for tag, want in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == want, tag


def test_run_visuals_without_optional_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No tensorboard: skipped silently. No matplotlib: the run ends normally with one note line."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    notes: list[str] = []
    with run_visuals(tmp_path, tensorboard=True, note=notes.append):
        _write_log(tmp_path / "train_log.jsonl", _rows(5, val_every=100))
    assert notes == ["note: training_curves.png needs matplotlib: pip install 'dtml[viz]'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_log.jsonl"]


@pytest.fixture(scope="module")
def trained(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("train") / "run"
    r = _cli("train", "--data", sample_root, "--out", out, "--labeled", "1", "--labeled-bs", "1",
             "--unlabeled-bs", "1", "--iterations", "3", "--n-filters", "4", "--patch", "32", "32", "32",
             "--workers", "0", "--checkpoint-every", "0", "--no-progress")
    return out, r


def test_train_draws_its_curves(trained: tuple[Path, object]) -> None:
    out, r = trained
    assert r.exit_code == 0, r.output
    assert f"training curves: {out / 'training_curves.png'}" in r.stderr
    rgb = png_to_rgb((out / "training_curves.png").read_bytes())
    redrawn = png_to_rgb((out / "redrawn.png").read_bytes()) if _cli(
        "plot", out, "-o", out / "redrawn.png").exit_code == 0 else None
    np.testing.assert_array_equal(rgb, redrawn)  # the end-of-run picture is the log's picture


def test_train_writes_tensorboard(trained: tuple[Path, object]) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoard is an optional integration; not installed here")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, r = trained
    assert r.exit_code == 0, r.output
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    log = [row for row in read_log(out / "train_log.jsonl") if "event" not in row]
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [
        (row["iteration"], float(np.float32(row["loss"]))) for row in log]
    assert {"loss/seg", "loss/dis", "loss/con", "schedule/lambda", "schedule/lr", "speed/it_per_s"} <= set(
        acc.Tags()["scalars"])


@pytest.fixture(scope="module")
def small_scan(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = nib.load(str(sorted((sample_root / "images").glob("*.nii.gz"))[0]))
    path = tmp_path_factory.mktemp("bench") / "case.nii.gz"
    nib.save(img.slicer[16:64, 12:60, 12:44], str(path))  # 48x48x32: four windows
    return path


def test_benchmark_plot_draws_the_report_rows(small_scan: Path, tmp_path: Path) -> None:
    bundle = make_bundle().save(tmp_path / "bundle")
    r = _cli("benchmark", "--model", bundle, "--data", small_scan, "--device", "cpu", "--formats",
             "torch-fp32,torch-bf16,trt-fp16", "--batch", "1", "--repeats", "1", "--warmup", "0", "--no-progress",
             "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "b.json").read_text())
    timed = [row for row in report["rows"] if row["ms_per_window_best"] is not None]
    assert [row["key"] for row in timed] == ["torch-fp32", "torch-bf16"]  # trt: skipped here, named below
    fig = benchmark_figure(report["rows"])
    bars = {gid: [p.get_width() for p in fig.axes[i].patches if p.get_gid() == gid]
            for i, gid in ((0, "ms_b1"), (0, "ms_best"), (1, "mvox"))}
    assert bars["ms_best"] == [row["ms_per_window_best"] for row in timed]
    assert bars["ms_b1"] == [row["ms_per_window_b1"] for row in timed]
    assert bars["mvox"] == [row["mvox_per_s"] for row in timed]
    assert "TensorRT fp16 (skipped)" in fig.texts[0].get_text()
    rgb = png_to_rgb((tmp_path / "b.png").read_bytes())
    assert rgb.std() > 10
