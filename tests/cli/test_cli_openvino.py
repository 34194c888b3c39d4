"""`dtml export --openvino/--int8`, and segment/evaluate/benchmark with `--backend openvino`, end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.cli import app
from dtml_deploy.metrics import agreement
from tests.conftest import SAMPLE, centred_bundle_dir, crop_real_case, sample_ids

pytest.importorskip("openvino", reason="the openvino extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

COMMON = ["--device", "cpu", "--no-progress"]


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny bundle centred on a real crop, 40^3 real crops of the sample cases, and `dtml export --int8`
    of the bundle calibrated on them (its output folder)."""
    root = tmp_path_factory.mktemp("ov-cli")
    crops = root / "crops"
    crops.mkdir()
    for cid in sample_ids(SAMPLE):
        nib.save(crop_real_case(SAMPLE, cid, (40, 40, 40)), str(crops / f"{cid}.nii.gz"))
    bundle = centred_bundle_dir(SAMPLE, root)
    r = _run("export", "--model", bundle, "-o", root / "exp", "--int8", "--calibration", crops / "*.nii.gz",
             "--calibration-windows", "2", "--no-verify", "--min-int8-agreement", "0.9")  # a random net, not trained
    assert r.exit_code == 0, r.output
    return {"bundle": bundle, "crops": crops, "export": root / "exp", "log": r.output}  # type: ignore[dict-item]


def test_int8_without_calibration_is_one_line_and_writes_nothing(tmp_path):
    r = _run("export", "-o", tmp_path / "e", "--int8")
    assert r.exit_code == 2 and r.stderr.strip() == ("error: --int8 needs real scans to calibrate on: pass "
                                                     "--calibration SCANS (files, folders or globs)")
    assert not (tmp_path / "e").exists()
    r = _run("export", "-o", tmp_path / "e", "--int8", "--calibration", tmp_path / "none-*.nii.gz")
    assert r.exit_code == 2 and "matches no scan" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_missing_openvino_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else
                        real_find_spec(name, *a))
    (tmp_path / "model-int8.xml").write_text("<net/>")
    r = _run("segment", SAMPLE / "images", "-o", tmp_path / "o", "--backend", "openvino", "--artifact",
             tmp_path / "model-int8.xml", *COMMON)
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: the openvino backend needs openvino; pip install 'dtml[openvino]'"
    r = _run("export", "-o", tmp_path / "e", "--openvino")
    assert r.exit_code == 2 and "pip install 'dtml[openvino]'" in r.stderr and not (tmp_path / "e").exists()


@pytest.mark.slow
def test_export_writes_both_irs_after_checking_int8_on_each_calibration_scan(made):
    names = sorted(p.name for p in made["export"].iterdir())
    assert names == ["model-fp32.bin", "model-fp32.onnx", "model-fp32.xml", "model-int8.bin", "model-int8.xml",
                     "speed.json"]
    checked = [ln for ln in made["log"].splitlines() if "int8 vs fp32 on" in ln]  # type: ignore[attr-defined]
    assert sorted(ln.split(" on ")[1].split(":")[0] for ln in checked) == sample_ids(SAMPLE)
    assert "calibrating on 6 windows of 3 scan(s)" in made["log"]  # type: ignore[operator]


@pytest.mark.slow
def test_int8_below_the_stated_agreement_is_refused_naming_the_case(made, tmp_path):
    r = _run("export", "--model", made["bundle"], "-o", tmp_path / "e", "--int8", "--calibration", made["crops"],
             "--calibration-windows", "1", "--no-verify", "--min-int8-agreement", "1.0")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    named = r.stderr.split("int8 masks disagree with fp32 on ")[1].split(":")[0]
    assert named in sample_ids(SAMPLE) and "< 1.0 (--min-int8-agreement); nothing was written" in r.stderr
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_segment_with_both_irs_agrees_with_torch(made, tmp_path):
    scan = sorted(made["crops"].iterdir())[0]
    common = ["--model", made["bundle"], *COMMON]
    masks = {}
    for name, extra in (("torch", ["--backend", "torch"]),
                        ("fp32", ["--backend", "openvino", "--artifact", made["export"] / "model-fp32.xml"]),
                        ("int8", ["--artifact", made["export"] / "model-int8.xml"])):  # auto: the file's backend
        r = _run("segment", scan, "-o", tmp_path / name, *common, *extra)
        assert r.exit_code == 0, r.output
        masks[name] = np.asarray(nib.load(str(tmp_path / name / scan.name)).dataobj)
    assert "with openvino on cpu (int8 IR" in r.stderr
    assert 0.02 < masks["torch"].mean() < 0.98
    assert agreement(masks["fp32"], masks["torch"]) > 0.999 and agreement(masks["int8"], masks["torch"]) > 0.9


@pytest.mark.slow
def test_export_times_the_folder_here_and_auto_runs_its_fastest_row(made, tmp_path):
    from dtml_deploy.speed_record import host_id, read_record

    record, why_not = read_record(made["export"])
    assert record is not None and why_not == "" and record.host == host_id()
    timed = {r.label: r for r in record.rows}
    assert {"torch fp32", "onnx fp32", "openvino fp32", "openvino int8"} <= set(timed)
    assert all(r.ms_per_window > 0 for r in record.rows)
    assert f"runs {min(record.rows, key=lambda r: r.ms_per_window).label} on this machine" in made["log"]
    scan = sorted(made["crops"].iterdir())[0]

    def auto_line(out: Path, *extra) -> str:
        r = _run("segment", scan, "-o", out, "--model", made["bundle"], "--artifact", made["export"], *extra,
                 *COMMON)
        assert r.exit_code == 0, r.output
        return next(ln for ln in r.stderr.splitlines() if ln.startswith("--backend "))

    fastest = min(record.rows, key=lambda r: r.ms_per_window)
    assert auto_line(tmp_path / "o").startswith(f"--backend auto: running {fastest.label}")
    assert "the fastest measured on this machine" in auto_line(tmp_path / "o2")
    line = auto_line(tmp_path / "q", "--backend", "onnx")  # a named backend: its own measured row
    assert line.startswith(f"--backend onnx: running onnx fp32 ({made['export'] / 'model-fp32.onnx'})"), line
    (made["export"] / "model-int8.xml").rename(made["export"] / "kept.xml")
    try:  # a timed file gone: the fastest of the rows that can still run
        rest = min((r for r in record.rows if r.label != "openvino int8"), key=lambda r: r.ms_per_window)
        assert auto_line(tmp_path / "p").startswith(f"--backend auto: running {rest.label}")
    finally:
        (made["export"] / "kept.xml").rename(made["export"] / "model-int8.xml")


@pytest.mark.slow
def test_evaluate_and_benchmark_run_the_irs(made, tmp_path):
    first = sample_ids(SAMPLE)[0]
    r = _run("evaluate", "--model", made["bundle"], "--data", SAMPLE, "--cases", first, "--backend", "openvino",
             "--artifact", made["export"] / "model-int8.xml", "--overlap", "0.25", "--json", tmp_path / "e.json",
             *COMMON)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert "openvino" in report["backend"] and [row["case"] for row in report["cases"]] == [first]
    assert all(row.get("status", "ok") == "ok" and row["dice"] > 0 for row in report["cases"])
    scan = sorted(made["crops"].iterdir())[0]
    r = _run("benchmark", "--model", made["bundle"], "--data", scan, "--formats",
             "torch-fp32,openvino-fp32,openvino-int8", "--repeats", "1", "--warmup", "0", "--batch", "1",
             "--json", tmp_path / "b.json", *COMMON)
    assert r.exit_code == 0, r.output
    rows = {row["key"]: row for row in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert rows["openvino-fp32"]["status"] == "passed" and rows["openvino-fp32"]["agreement"] > 0.999
    assert rows["openvino-int8"]["precision"] == "int8" and rows["openvino-int8"]["agreement"] > 0.9
    assert rows["openvino-int8"]["ms_per_window_b1"] > 0
