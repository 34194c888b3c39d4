"""Where dtml writes, through the CLI: a report or picture never replaces an input, a label, a prediction, an
output of the same run or a foreign file; outputs of one run never collide; `--overwrite` replaces a case's
whole output set, and only once the new one is complete; two runs into one folder never lose a mask
silently; `-o` and `plot -o` name files and folders as they look.

Built from real 32^3 crops of the shipped sample and a random-weight bundle (one window per case).
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest

from tests.cli.test_bad_inputs import CPU, PATCH, _cli, _files, _one_error
from tests.conftest import REPO, centred_bundle_dir
from tests.conftest import crop_real_case as _crop
from tests.conftest import sample_ids as _ids


@pytest.fixture(scope="module")
def bundle_dir(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return centred_bundle_dir(sample_root, tmp_path_factory.mktemp("bundle"), PATCH)


def _case(sample_root: Path, path: Path, index: int = 0, folder: str = "images") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(_crop(sample_root, _ids(sample_root)[index], (PATCH,) * 3, folder), str(path))
    return path


@pytest.fixture
def scan(sample_root: Path, tmp_path: Path) -> Path:
    return _case(sample_root, tmp_path / "in" / "CASE.nii.gz")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- reports and pictures


def _pair(sample_root: Path, root: Path) -> tuple[Path, Path]:
    """PRED_DIR and GT_DIR of one real case (the label cropped like its image, scored against itself)."""
    cid = _ids(sample_root)[0]
    return (_case(sample_root, root / "pred" / f"{cid}.nii.gz", folder="labels"),
            _case(sample_root, root / "gt" / f"{cid}.nii.gz", folder="labels"))


REPORT_CLASHES = {  # name -> (which file the report path is, extra arguments)
    "segment --json is the input scan": ("scan", ["--json"]),
    "segment --json is the input scan, --overwrite": ("scan", ["--overwrite", "--json"]),
    "segment --json is the mask it writes": ("mask", ["--json"]),
    "segment --json is a training log": ("log", ["--json"]),
    "evaluate --json is the label": ("label", ["--json"]),
    "evaluate --csv is the prediction": ("pred", ["--csv"]),
    "evaluate --report is a training log": ("log", ["--report"]),
    "evaluate --json is a segment report": ("segment_report", ["--json"]),
    "evaluate --json is a new file named like a scan": ("new_scan_name", ["--json"]),
}


@pytest.mark.parametrize("kind", list(REPORT_CLASHES))
def test_a_report_never_replaces_an_input_or_a_foreign_file(kind: str, scan: Path, sample_root: Path,
                                                            bundle_dir: Path, tmp_path: Path) -> None:
    which, option = REPORT_CLASHES[kind]
    pred, label = _pair(sample_root, tmp_path)
    log = tmp_path / "run" / "train_log.jsonl"
    log.parent.mkdir()
    log.write_text('{"iteration": 1, "loss": 0.5}\n')
    seg_report = tmp_path / "seg.json"
    seg_report.write_text(json.dumps({"backend": "torch", "bundle_hash": "x", "engine": {}, "cases": []}))
    target = {"scan": scan, "mask": tmp_path / "out" / scan.name, "log": log, "label": label, "pred": pred,
              "segment_report": seg_report, "new_scan_name": tmp_path / "gt" / "NEW.nii.gz"}[which]
    before = _snapshot(tmp_path)
    if kind.startswith("segment"):
        r = _cli("segment", scan, "-o", tmp_path / "out", "--model", bundle_dir, *CPU, *option, target)
    else:
        r = _cli("evaluate", pred.parent, label.parent, *option, target)
    names = [target, scan] if which in ("scan", "mask") else [target]
    _one_error(r, 2, *names)
    assert _snapshot(tmp_path) == before  # nothing replaced, nothing written


@pytest.mark.parametrize("option,target", [("--json", "log"), ("--plot", "log"), ("--plot", "jpg"),
                                           ("--json", "scan")])
def test_benchmark_reports_never_replace_a_foreign_file(option: str, target: str, scan: Path, bundle_dir: Path,
                                                        tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"iteration": 1, "loss": 0.5}\n')
    path = {"log": log, "jpg": tmp_path / "chart.jpg", "scan": scan}[target]
    before = _snapshot(tmp_path)
    r = _cli("benchmark", "--model", bundle_dir, "--data", scan, "--device", "cpu", option, path)
    _one_error(r, 2, path)
    assert _snapshot(tmp_path) == before


def test_one_path_for_two_reports_names_both_options(sample_root: Path, tmp_path: Path) -> None:
    pred, label = _pair(sample_root, tmp_path)
    r = _cli("evaluate", pred.parent, label.parent, "--json", tmp_path / "r", "--csv", tmp_path / "r")
    _one_error(r, 2, tmp_path / "r", "--json", "--csv")
    assert not (tmp_path / "r").exists()


def test_an_earlier_report_of_the_same_kind_is_replaced(scan: Path, sample_root: Path, bundle_dir: Path,
                                                        tmp_path: Path) -> None:
    pred, label = _pair(sample_root, tmp_path)
    js, cs = tmp_path / "e.json", tmp_path / "e.csv"
    for _ in range(2):
        r = _cli("evaluate", pred.parent, label.parent, "--json", js, "--csv", cs)
        assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["summary"]["cases"]["scored"] == 1
    seg = tmp_path / "s.json"
    for overwrite in ([], ["--overwrite"]):
        r = _cli("segment", scan, "-o", tmp_path / "out", "--model", bundle_dir, *CPU, *overwrite, "--json", seg)
        assert r.exit_code == 0, r.output
        assert json.loads(seg.read_text())["cases"][0]["input"] == str(scan)


# ---------------------------------------------------------------------- collisions inside one run


def _collide_prob(sample_root: Path, d: Path) -> tuple[list[Path], list[str]]:
    return [_case(sample_root, d / "x.nii.gz"), _case(sample_root, d / "x_prob.nii.gz", 1)], ["--save-prob"]


def _collide_stem(sample_root: Path, d: Path) -> tuple[list[Path], list[str]]:
    return [_case(sample_root, d / "a" / "x.nii.gz"), _case(sample_root, d / "b" / "x.nii.gz", 1)], []


def _collide_suffix(sample_root: Path, d: Path) -> tuple[list[Path], list[str]]:
    return [_case(sample_root, d / "x.nii"), _case(sample_root, d / "x.nii.gz", 1)], []


COLLISIONS = {"a case's _prob is another case's mask": _collide_prob, "one name from two folders": _collide_stem,
              "a.nii and a.nii.gz": _collide_suffix, "the same input twice": None}


@pytest.mark.parametrize("kind", list(COLLISIONS))
def test_outputs_that_would_collide_are_refused_before_any_work(kind: str, sample_root: Path, bundle_dir: Path,
                                                                tmp_path: Path) -> None:
    make = COLLISIONS[kind]
    twice = ([_case(sample_root, tmp_path / "x.nii.gz")] * 2, [])
    inputs, extra = make(sample_root, tmp_path / "in") if make else twice
    out = tmp_path / "out"
    r = _cli("segment", *inputs, "-o", out, "--model", bundle_dir, *CPU, *extra, "--json", tmp_path / "r.json")
    _one_error(r, 2, *inputs)
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_an_output_that_is_another_input_is_refused(sample_root: Path, bundle_dir: Path, tmp_path: Path) -> None:
    """-o the input folder: `x`'s probability map would be the input `x_prob`, the mask the input itself."""
    d = tmp_path / "in"
    x, other = _case(sample_root, d / "x.nii.gz"), _case(sample_root, d / "x_prob.nii.gz", 1)
    before = _snapshot(d)
    r = _cli("segment", x, other, "-o", d, "--model", bundle_dir, *CPU, "--save-prob", "--format", "nrrd")
    _one_error(r, 2, x, other)
    r = _cli("segment", x, "-o", d, "--model", bundle_dir, *CPU, "--overwrite")
    _one_error(r, 2, x, "input")
    assert _snapshot(d) == before


# ---------------------------------------------------------------------- --overwrite


def test_overwrite_replaces_the_whole_set_and_says_what_it_removed(scan: Path, bundle_dir: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _cli("segment", scan, "-o", out, "--model", bundle_dir, *CPU, "--save-prob", "--save-sdm")
    assert r.exit_code == 0, r.output
    assert _files(out) == ["CASE.nii.gz", "CASE_prob.nii.gz", "CASE_sdm.nii.gz"]
    (out / "CASE.nii.gz").unlink()  # only the maps of the older run are left: still its outputs
    r = _cli("segment", scan, "-o", out, "--model", bundle_dir, *CPU)
    _one_error(r, 2, out / "CASE_prob.nii.gz", "--overwrite")
    r = _cli("segment", scan, "-o", out, "--model", bundle_dir, *CPU, "--overwrite", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert _files(out) == ["CASE.nii.gz"]  # no map of the older run beside the new mask
    assert "removed" in r.stderr and "CASE_prob.nii.gz" in r.stderr and "CASE_sdm.nii.gz" in r.stderr
    removed = json.loads((tmp_path / "r.json").read_text())["cases"][0]["removed"]
    assert sorted(Path(p).name for p in removed) == ["CASE_prob.nii.gz", "CASE_sdm.nii.gz"]


def test_a_failed_overwrite_keeps_the_previous_outputs(scan: Path, bundle_dir: Path, tmp_path: Path) -> None:
    """The new set fails while being put in place (a folder where its last map goes): the mask and map it
    had already put in place are taken back and the older ones restored."""
    out = tmp_path / "out"
    r = _cli("segment", scan, "-o", out, "--model", bundle_dir, *CPU, "--save-prob")
    assert r.exit_code == 0, r.output
    (out / "CASE_sdm.nii.gz").mkdir()
    before = _snapshot(out)
    r = _cli("segment", scan, "-o", out, "--model", bundle_dir, *CPU, "--overwrite", "--save-prob", "--save-sdm")
    _one_error(r, 2, out / "CASE_sdm.nii.gz")
    assert _snapshot(out) == before and sorted(os.listdir(out)) == ["CASE.nii.gz", "CASE_prob.nii.gz",
                                                                    "CASE_sdm.nii.gz"]


# ---------------------------------------------------------------------- -o and plot -o


@pytest.mark.parametrize("name", ["out.mhd", "out.nhdr", "out.h5", "out.dcm", "out.png", "out.json"])
def test_o_with_a_suffix_dtml_cannot_write_is_refused(name: str, scan: Path, bundle_dir: Path, tmp_path: Path) -> None:
    r = _cli("segment", scan, "-o", tmp_path / name, "--model", bundle_dir, *CPU)
    err = _one_error(r, 2, tmp_path / name, ".nii.gz", ".nrrd", ".mha")
    assert name[3:] in err
    assert _files(tmp_path) == ["in"]  # no folder named like a file


def _run_folder(root: Path) -> Path:
    """A `dtml train` run folder holding the first 300 rows of the shipped model's real training log."""
    run = root / "run"
    run.mkdir()
    with gzip.open(REPO / "benchmarks" / "results" / "la_train_log_h200.jsonl.gz", "rt") as f:
        (run / "train_log.jsonl").write_text("".join(next(f) for _ in range(300)))
    return run


@pytest.mark.parametrize("how", ["trailing slash", "existing folder"])
def test_plot_o_folder_writes_the_default_name_inside(how: str, sample_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = _run_folder(tmp_path)
    folder = tmp_path / "pics"
    if how == "existing folder":
        folder.mkdir()
    r = _cli("plot", run, "-o", f"{folder}/" if how == "trailing slash" else folder)
    assert r.exit_code == 0, r.output
    assert folder.is_dir() and _files(folder) == ["training_curves.png"]
    r = _cli("plot", run, "-o", folder)  # an earlier picture of dtml's is replaced
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("target", ["log", "jpg", "checkpoint"])
def test_plot_o_refuses_the_log_another_suffix_or_a_foreign_file(target: str, sample_root: Path,
                                                                 tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = _run_folder(tmp_path)
    foreign = run / "notes.png"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n not drawn by dtml")
    path = {"log": run / "train_log.jsonl", "jpg": tmp_path / "c.jpg", "checkpoint": foreign}[target]
    before = _snapshot(tmp_path)
    _one_error(_cli("plot", run, "-o", path), 2, path)
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------- two processes


def _spawn(args: list, meet: Path, where: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DTML_TEST_MEET=f"{where}:{meet}")
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "cli" / "concurrent_runs.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


@pytest.mark.slow
def test_two_runs_into_one_folder_never_lose_a_mask_silently(scan: Path, bundle_dir: Path, tmp_path: Path) -> None:
    """Both runs pass the "exists?" check before either writes (they meet there); the second to write is
    refused with a line that says so, and the folder holds one mask and nothing else."""
    meet, out = tmp_path / "meet", tmp_path / "out"
    meet.mkdir()
    procs = [_spawn(["segment", scan, "-o", out, "--model", bundle_dir, *CPU], meet, "infer") for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another run" in loser and str(out / scan.name) in loser
    assert sorted(os.listdir(out)) == ["CASE.nii.gz"]  # no temporaries, no lock or claim files


@pytest.mark.slow
def test_a_run_stopped_while_writing_leaves_nothing_behind(scan: Path, bundle_dir: Path, tmp_path: Path) -> None:
    meet, out = tmp_path / "meet", tmp_path / "out"
    meet.mkdir()
    proc = _spawn(["segment", scan, "-o", out, "--model", bundle_dir, *CPU, "--save-prob"], meet, "commit")
    deadline = time.monotonic() + 240
    while not any(meet.iterdir()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert any(out.iterdir())  # its temporaries are there while it waits to put them in place
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: stopped by SIGTERM (finished cases are written)"], err
    assert os.listdir(out) == []


def test_overwrite_never_lets_a_report_replace_an_input_s_data_file(scan: Path, bundle_dir: Path,
                                                                     tmp_path: Path) -> None:
    """A MetaImage header's data file is read with it: --json on it is refused even with --overwrite."""
    sitk = pytest.importorskip("SimpleITK")
    mhd = tmp_path / "in" / "META.mhd"
    sitk.WriteImage(sitk.ReadImage(str(scan)), str(mhd))
    raw = tmp_path / "in" / "META.raw"
    before = _snapshot(tmp_path / "in")
    r = _cli("segment", mhd, "-o", tmp_path / "out", "--model", bundle_dir, *CPU, "--overwrite", "--json", raw)
    _one_error(r, 2, raw, mhd)
    assert _snapshot(tmp_path / "in") == before and not (tmp_path / "out").exists()
