"""`dtml benchmark` end to end through Typer's CliRunner: a tiny random bundle, one real LA case, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from dtml_deploy.backends.onnx_backend import OnnxBackend
from dtml_deploy.cli import app
from tests.conftest import SAMPLE, make_bundle

FAST = ["--device", "cpu", "--repeats", "1", "--warmup", "1", "--batch", "1", "--batch", "2", "--no-progress"]


def _case() -> Path:
    return sorted((SAMPLE / "images").glob("*.nii.gz"))[0]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Heads centred on the case's central patch, so its mask is partly foreground and agreement means
    something (an untrained net calls nearly every voxel foreground)."""
    img = np.asarray(nib.load(str(_case())).get_fdata(dtype=np.float32))
    lo = [(n - 32) // 2 for n in img.shape]
    centre = img[lo[0]:lo[0] + 32, lo[1]:lo[1] + 32, lo[2]:lo[2] + 32]
    return make_bundle(n_filters=4, patch=(32, 32, 32), centre_on=centre).save(
        tmp_path_factory.mktemp("bench") / "bundle")


def _invoke(args: list[str]):
    return CliRunner().invoke(app, ["benchmark", *args])


@pytest.fixture(scope="module")
def full_run(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict]:
    out = tmp_path_factory.mktemp("bench-out")
    res = _invoke(["--model", str(bundle_dir), "--data", str(_case()), *FAST, "--json", str(out / "b.json"),
                   "-o", str(out / "work")])
    data = json.loads((out / "b.json").read_text()) if (out / "b.json").is_file() else {}
    return res, data


def _rows(data: dict) -> dict[str, dict]:
    return {r["key"]: r for r in data["rows"]}


def test_rows_and_statuses(full_run: tuple) -> None:
    res, data = full_run
    assert res.exit_code == 0, res.output
    assert data["machine"] and data["request"]["batches"] == [1, 2]
    rows = _rows(data)
    assert list(rows)[:2] == ["torch-fp32", "torch-bf16"]
    assert rows["torch-fp32"]["status"] == "passed" and rows["torch-fp32"]["agreement"] == 1.0
    bf16 = rows["torch-bf16"]
    assert bf16["status"] in ("passed", "exported but failed parity") and 0.5 < bf16["agreement"] <= 1.0
    onnx = rows["onnx-fp32"]
    assert onnx["status"] == "passed" and onnx["agreement"] > 0.99
    assert onnx["artifact_mb"] > 0 and Path(onnx["artifact"]).is_file()
    assert rows["torch-fp16"]["status"].startswith("skipped:") and "CUDA" in rows["torch-fp16"]["status"]
    assert rows["trt-fp16"]["status"].startswith("skipped: ") and len(rows["trt-fp16"]["status"]) > 10
    assert rows["torch-compiled"]["status"].startswith("skipped:")  # CPU and not named in --formats
    assert rows["onnx-fp16"]["status"].startswith("skipped:")


def test_timings_reported(full_run: tuple) -> None:
    res, data = full_run
    for key in ("torch-fp32", "torch-bf16", "onnx-fp32"):
        row = _rows(data)[key]
        assert row["ms_per_window_b1"] > 0 and row["ms_per_window_best"] > 0
        assert set(row["ms_per_window"]) == {"1", "2"} and row["best_batch"] in (1, 2)
        assert row["seconds_min"] <= row["seconds_per_case"] <= row["seconds_max"]
        assert row["outliers"] == 0 and len(row["runs"]) == 1 and row["mvox_per_s"] > 0
        assert row["windows"] > 0 and row["peak_memory_mb"] > 0
        # the summary columns follow from the per-batch timings
        assert row["ms_per_window_best"] == min(row["ms_per_window"].values())
        assert row["ms_per_window"][str(row["best_batch"])] == row["ms_per_window_best"]
        assert row["ms_per_window_b1"] == row["ms_per_window"]["1"]
        voxels = int(np.prod(nib.load(str(_case())).shape))
        assert row["mvox_per_s"] == pytest.approx(voxels / row["seconds_per_case"] / 1e6, rel=1e-9)
        assert row["runs_on"].startswith(("torch on cpu", "onnx on cpu"))  # what actually ran, in the JSON
    assert "CPUExecutionProvider" in _rows(data)["onnx-fp32"]["runs_on"]
    assert "| row |" in res.stdout and "machine:" in res.stdout and "torch fp32" in res.stdout


def test_failing_backend_becomes_a_row(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated backend crash\nsecond line")

    monkeypatch.setattr(OnnxBackend, "__init__", broken)
    res = _invoke(["--model", str(bundle_dir), "--data", str(_case()), *FAST, "--formats", "torch-fp32,onnx-fp32"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("| onnxruntime fp32"))
    assert "failed: RuntimeError: simulated backend crash" in line and "second line" not in res.stdout
    assert "| torch fp32 | fp32 | passed" in res.stdout

    # a CI gate must not pass over a row that crashed
    res = _invoke(["--model", str(bundle_dir), "--data", str(_case()), *FAST, "--formats", "torch-fp32,onnx-fp32",
                   "--min-dice", "0.5"])
    assert res.exit_code == 1 and "onnx-fp32 (failed)" in res.stderr and "torch-fp32" not in res.stderr


def test_min_dice_gate(bundle_dir: Path) -> None:
    res = _invoke(["--model", str(bundle_dir), "--data", str(_case()), *FAST, "--formats", "torch-fp32",
                   "--min-dice", "1.01"])
    assert res.exit_code == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "torch-fp32 (1.0000)" in errors[0] and "--min-dice 1.01" in errors[0]


def test_bad_requests(bundle_dir: Path) -> None:
    res = _invoke(["--model", str(bundle_dir), "--device", "cpu", "--formats", "torch-fp99"])
    assert res.exit_code == 2 and "torch-fp99" in res.stderr
    res = _invoke(["--model", str(bundle_dir), "--device", "cpu", "--min-dice", "0.9"])
    assert res.exit_code == 2 and "--data" in res.stderr
