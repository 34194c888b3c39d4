"""`--artifact FOLDER`: the fastest measured backend with a usable artifact, and the ranking's source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dtml_deploy.backend_choice as choice
from dtml_deploy.backend_choice import CPU_RANKING, RANKING_SOURCE, pick_from_folder, resolve_backend

REPO = Path(__file__).resolve().parents[2]


def _folder(tmp_path: Path, *names: str) -> Path:
    for n in names:
        (tmp_path / n).write_text("")
    return tmp_path


def test_cpu_picks_int8_when_present_and_installed(tmp_path, monkeypatch):
    monkeypatch.setattr(choice, "_installed", lambda backend: True)
    folder = _folder(tmp_path, "model-fp32.onnx", "model-fp32.xml", "model-int8.xml")
    got = pick_from_folder(folder, "auto", "cpu")
    assert (got.backend, got.artifact) == ("openvino", folder / "model-int8.xml")
    assert RANKING_SOURCE in got.reason


def test_cpu_without_int8_runs_torch_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(choice, "_installed", lambda backend: backend != "openvino")
    folder = _folder(tmp_path, "model-fp32.onnx", "model-int8.xml")
    got = pick_from_folder(folder, "auto", "cpu")
    assert (got.backend, got.artifact) == ("torch", None)
    assert "model-int8.xml skipped: pip install 'dtml[openvino]'" in got.reason


def test_named_backend_takes_its_own_artifact_or_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(choice, "_installed", lambda backend: True)
    folder = _folder(tmp_path, "model-fp32.xml", "model-fp16.onnx")
    assert pick_from_folder(folder, "openvino", "cpu").artifact == folder / "model-fp32.xml"
    assert pick_from_folder(folder, "onnx", "cpu").artifact == folder / "model-fp16.onnx"
    with pytest.raises(ValueError, match=r"no artifact for --backend trt there \(found: model-fp16.onnx, "
                                         r"model-fp32.xml\)"):
        pick_from_folder(folder, "trt", "cpu")


def test_xml_artifact_runs_on_openvino_and_torch_switches_are_refused():
    assert resolve_backend("auto", Path("m/model-int8.xml")) == "openvino"
    with pytest.raises(ValueError, match="--compile is an option of the torch backend"):
        resolve_backend("openvino", Path("m/model-int8.xml"), compile=True)


def test_cpu_ranking_follows_the_measurement():
    """Every measured row faster than torch fp32 (by > 5 %) on the default grid ranks before torch, and the
    ranked rows are in order of their measured time."""
    doc = json.loads((REPO / RANKING_SOURCE).read_text())
    seconds = {r["method"].removeprefix("dtml engine ").split(",")[0]: r["seconds"]
               for r in doc["rows"] if r["grid"] == "default" and "seconds" in r}
    ranked = [f"{b} {p}" for b, p in CPU_RANKING]
    assert [seconds[n] for n in ranked] == sorted(seconds[n] for n in ranked)
    torch_at = ranked.index("torch fp32")
    faster = [n for n, s in seconds.items() if s < 0.95 * seconds["torch fp32"]]
    assert all(n in ranked[:torch_at] for n in faster), (faster, ranked)


def _record(folder: Path, ms: dict[str, float], host: str | None = None) -> None:
    """A speed.json for `folder` timing the named rows ('openvino int8', 'torch fp32', ...)."""
    from dtml_deploy.speed_record import SpeedRecord, Timing, host_id, weights_digest, write_record

    rows = []
    for label, value in ms.items():
        backend, precision = label.split()
        name = "" if backend == "torch" else choice.FORMATS[backend].filename(precision)
        if name and not (folder / name).exists():
            (folder / name).write_text(label)
            if name.endswith(".xml"):
                (folder / name).with_suffix(".bin").write_text(label + " weights")
        rows.append(Timing(backend, precision, name, value, weights_digest(folder / name) if name else ""))
    write_record(folder, SpeedRecord(host=host or host_id(), batch=4, rows=tuple(rows)))


def test_a_folder_timed_here_runs_its_fastest_row(tmp_path, monkeypatch):
    monkeypatch.setattr(choice, "_installed", lambda backend: True)
    _record(tmp_path, {"torch fp32": 900.0, "openvino fp32": 700.0, "openvino int8": 800.0, "onnx fp32": 1200.0})
    got = pick_from_folder(tmp_path, "auto", "cpu")  # measured here: OpenVINO fp32 beat int8 on this machine
    assert (got.backend, got.artifact) == ("openvino", tmp_path / "model-fp32.xml")
    assert got.reason.startswith(f"openvino fp32 ({tmp_path / 'model-fp32.xml'}): 700 ms per window, 1.3x torch fp32")
    assert "openvino fp32 700 ms, openvino int8 800 ms, torch fp32 900 ms, onnx fp32 1200 ms" in got.reason
    assert pick_from_folder(tmp_path, "onnx", "cpu").artifact == tmp_path / "model-fp32.onnx"
    (tmp_path / "model-fp32.bin").write_text("other weights")  # re-exported since: its timing no longer applies
    assert pick_from_folder(tmp_path, "auto", "cpu").artifact == tmp_path / "model-int8.xml"


def test_torch_bf16_measured_fastest_runs_in_bf16_unless_a_precision_was_given(tmp_path, monkeypatch):
    from dtml_deploy.settings import PredictorSettings, artifact_from_folder

    monkeypatch.setattr(choice, "_installed", lambda backend: True)
    _record(tmp_path, {"torch fp32": 900.0, "torch bf16": 300.0, "openvino int8": 400.0})
    picked, line = artifact_from_folder(PredictorSettings.build(device="cpu", artifact=tmp_path))
    assert (picked.backend, picked.runtime.artifact, picked.runtime.precision) == ("torch", None, "bf16")
    assert line.startswith("--backend auto: running torch bf16: 300 ms per window, 3.0x torch fp32")
    settings = PredictorSettings.build(device="cpu", artifact=tmp_path, precision="fp32")
    picked, _ = artifact_from_folder(settings)
    assert (picked.backend, picked.runtime.artifact) == ("openvino", tmp_path / "model-int8.xml")


@pytest.mark.parametrize("how", ["another machine", "unreadable"])
def test_a_record_that_does_not_apply_falls_back_to_the_ranking_and_says_why(tmp_path, monkeypatch, how):
    monkeypatch.setattr(choice, "_installed", lambda backend: True)
    _record(tmp_path, {"torch fp32": 100.0, "openvino int8": 800.0},
            host="Some Other CPU, 64 logical cores" if how == "another machine" else None)
    if how == "unreadable":
        (tmp_path / "speed.json").write_text('{"schema": 1, "rows": [')
    got = pick_from_folder(tmp_path, "auto", "cpu")
    assert (got.backend, got.artifact) == ("openvino", tmp_path / "model-int8.xml")  # the repository's ranking
    assert RANKING_SOURCE in got.reason
    expected = ("was measured on another machine (Some Other CPU, 64 logical cores)" if how == "another machine"
                else "speed.json is unreadable (")
    assert expected in got.reason
