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
