"""`dtml segment` and `dtml evaluate --model` under torchrun: 2 CPU processes against 1, and ranks that fail.

Each test launches torchrun's agent for real (`python -m torch.distributed.run --nproc-per-node 2`, or
dtml's launcher `python -m dtml_deploy.launch` around it), so the ranks meet through torchrun's own store
exactly as on a multi-GPU node.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dtml_deploy.io.extent import voxel_estimate
from dtml_deploy.ranks import balanced_shards
from tests.conftest import REPO, centred_bundle_dir, sample_ids

pytestmark = pytest.mark.slow  # each launch starts two Python processes with torch (seconds each)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dtml(args: list[str], ranks: int | None, env: dict[str, str] | None = None,
          entry: list[str] | None = None, timeout: float = 300, agent: str = "dtml_deploy.launch"
          ) -> subprocess.CompletedProcess:
    """`dtml ARGS` in a fresh process, or with `ranks` CPU processes (one thread each) under `agent`:
    dtml's launcher (dtml-torchrun) or plain torchrun (`torch.distributed.run`)."""
    entry = entry or ["-m", "dtml_deploy"]
    launcher = [] if ranks is None else ["-m", agent, "--nproc-per-node", str(ranks),
                                         "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    full_env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run([sys.executable, *launcher, *entry, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def _without_timing(report: dict) -> list[dict]:
    cases = []
    for case in report["cases"]:
        case = {k: v for k, v in case.items() if k != "seconds"}
        case["output"] = case["output"] and Path(case["output"]).name
        cases.append(case)
    return cases


@pytest.fixture(scope="module")
def scans(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four real scans (the sample's three and a copy) and a bundle whose masks are part foreground."""
    root = tmp_path_factory.mktemp("torchrun")
    ids = sample_ids(sample_root)
    folder = root / "scans"
    folder.mkdir()
    for i, cid in enumerate([*ids, ids[0]]):
        shutil.copy(sample_root / "images" / f"{cid}.nii.gz", folder / f"case{i}.nii.gz")
    return {"folder": folder, "bundle": centred_bundle_dir(sample_root, root), "root": root}


def test_two_ranks_write_what_one_process_writes_and_a_bad_input_fails_alone(scans: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    inputs = sorted(scans["folder"].glob("*.nii.gz"))[:3]
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    inputs.insert(2, bad)
    shards = balanced_shards([voxel_estimate(p) for p in inputs], 2)
    # the split this test relies on: the bad input shares rank 1 with a good case, rank 0 has good ones
    assert shards == [[0, 3], [1, 2]]
    args = ["segment", *map(str, inputs), "--model", str(scans["bundle"]), "--no-progress", "--save-prob"]
    one = _dtml([*args, "-o", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")], None)
    two = _dtml([*args, "-o", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")], 2)
    assert one.returncode == 1, one.stderr
    assert two.returncode == 1, two.stderr  # dtml's code: some case failed
    r1, r2 = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert (r1["ranks"], r2["ranks"]) == (1, 2)
    assert _without_timing(r1) == _without_timing(r2)
    assert [c["status"] for c in r2["cases"]] == ["ok", "ok", "failed", "ok"]
    assert "broken.nii.gz" in r2["cases"][2]["error"]
    for name in (f"case{i}{s}.nii.gz" for i in range(3) for s in ("", "_prob")):
        a = np.asarray(nib.load(tmp_path / "one" / name).dataobj)
        b = np.asarray(nib.load(tmp_path / "two" / name).dataobj)
        assert np.array_equal(a, b), name
    masks = [np.asarray(nib.load(tmp_path / "two" / f"case{i}.nii.gz").dataobj) for i in range(3)]
    assert all(0 < m.sum() < m.size for m in masks)  # real masks, not empty ones that agree trivially
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    # rank 0 printed every case once, the error line once, and the summary; no traceback, not even torchrun's
    err = two.stderr
    assert all(err.count(f"case{i}: ") == 1 for i in range(3)), err
    assert err.count("error: ") == 1 and "3 of 4 scan(s) segmented on 2 ranks" in err
    assert "dtml_deploy/" not in err and "Traceback" not in err and "ChildFailedError" not in err


def test_all_cases_failed_ends_with_dtml_lines_and_code_2(tmp_path: Path) -> None:
    bad = [tmp_path / f"broken{i}.nii.gz" for i in range(2)]
    for p in bad:
        p.write_bytes(b"not a nifti file")
    args = ["segment", *map(str, bad), "-o", str(tmp_path / "out"), "--no-progress"]
    ours = _dtml(args, 2)
    assert ours.returncode == 2, ours.stderr
    lines = [ln for ln in ours.stderr.splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("error:")] == [ln for ln in lines if "broken" in ln]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 2 and "0 of 2 scan(s) segmented" in ours.stderr
    assert "Traceback" not in ours.stderr and "ChildFailedError" not in ours.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # plain torchrun cannot pass the code on: it says so, and names the launcher that can
    plain = _dtml(args, 2, agent="torch.distributed.run")
    assert plain.returncode == 1 and "ChildFailedError" in plain.stderr
    assert "note: torchrun reports dtml's exit code 2 as a crash" in plain.stderr and "dtml-torchrun" in plain.stderr


def test_launcher_runs_a_dtml_command_given_without_module(tmp_path: Path) -> None:
    from dtml_deploy.launch import _dtml_args

    args = _dtml_args(["--nproc-per-node", "2", "segment", "a.nii.gz", "-o", "out"])
    assert (args.module, args.training_script, args.training_script_args) == (
        True, "dtml_deploy", ["segment", "a.nii.gz", "-o", "out"])
    kept = _dtml_args(["--nproc-per-node", "2", "-m", "dtml_deploy", "evaluate", "--data", "d"])
    assert (kept.training_script, kept.training_script_args) == ("dtml_deploy", ["evaluate", "--data", "d"])


def test_two_ranks_evaluate_like_one_process(sample_root: Path, scans: dict[str, Path], tmp_path: Path) -> None:
    args = ["evaluate", "--model", str(scans["bundle"]), "--data", str(sample_root), "--no-progress"]
    one = _dtml([*args, "--json", str(tmp_path / "one.json")], None)
    two = _dtml([*args, "--json", str(tmp_path / "two.json"), "--report", str(tmp_path / "two.html")], 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    r1, r2 = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    strip = [{k: v for k, v in c.items() if k != "seconds"} for c in r1["cases"]]
    assert strip == [{k: v for k, v in c.items() if k != "seconds"} for c in r2["cases"]]
    assert [c["case"] for c in r2["cases"]] == sample_ids(sample_root)
    drop = ("seconds",)
    assert {k: v for k, v in r1["summary"].items() if k not in drop} == \
        {k: v for k, v in r2["summary"].items() if k not in drop}
    assert r2["summary"]["cases"]["scored"] == 3 and r2["summary"]["dice"]["count"] == 3
    # the summary table is printed once, by rank 0, and the HTML report has every case's thumbnail,
    # including those drawn on rank 1
    assert two.stdout.count("Dice") == one.stdout.count("Dice") >= 1
    html = (tmp_path / "two.html").read_text()
    assert html.count("data:image/png;base64") >= 3
    for cid in sample_ids(sample_root):
        assert cid in html


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_a_rank_that_dies_or_hangs_ends_the_job_with_the_report_written(scans: dict[str, Path], tmp_path: Path,
                                                                         fault: str) -> None:
    inputs = sorted(scans["folder"].glob("*.nii.gz"))
    assert balanced_shards([voxel_estimate(p) for p in inputs], 2) == [[0, 2], [1, 3]]
    out, report = tmp_path / "out", tmp_path / "report.json"
    args = ["segment", *map(str, inputs), "--model", str(scans["bundle"]), "-o", str(out), "--json", str(report),
            "--no-progress", "--rank-timeout", "5"]
    res = _dtml(args, 2, {"DTML_TEST_FAULT": f"1:{fault}:case3"},
                entry=[str(REPO / "tests" / "cli" / "torchrun_faults.py")], timeout=240)
    assert res.returncode == 1, res.stderr  # dtml's code for a job with failed cases, not torchrun's
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr
    if fault == "die":  # the rank that died is named in one line; rank 0, which gave its code, is not
        assert "error: rank 1 exited with code 7" in res.stderr and "error: rank 0" not in res.stderr
    assert "elastic/multiprocessing" not in res.stderr  # the agent's own log lines, with torch's source paths
    cases = json.loads(report.read_text())["cases"]
    by_name = {Path(c["input"]).name: c for c in cases}
    assert len(cases) == 4 and by_name["case3.nii.gz"]["status"] == "failed"
    why = "showed no progress for" if fault == "hang" else "the job was stopped (SIGTERM"
    assert why in by_name["case3.nii.gz"]["error"], by_name["case3.nii.gz"]
    assert f"error: {'rank 1 showed no progress' if fault == 'hang' else 'the job was stopped'}" in res.stderr
    # rank 1 finished case1 before the fault: it is in the report and on disk; whatever a rank had not
    # finished is marked so and left nothing behind, not even a hidden temporary file
    assert by_name["case1.nii.gz"]["status"] == "ok"
    for c in cases:
        mask = out / Path(c["input"]).name
        assert mask.is_file() == (c["status"] == "ok"), c
        if c["status"] != "ok":
            assert "not segmented" in c["error"]
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(c["input"]).name for c in cases if c["status"] == "ok")


def test_two_nodes_share_the_cases_through_a_c10d_rendezvous(scans: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """Two torchrun agents as two nodes (one process each, both LOCAL_RANK 0) meeting at one endpoint."""
    inputs = sorted(scans["folder"].glob("*.nii.gz"))[:3]
    port = _free_port()
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "dtml-test", "-m", "dtml_deploy"]
    args = ["segment", *map(str, inputs), "--model", str(scans["bundle"]), "-o", str(tmp_path / "out"),
            "--json", str(tmp_path / "report.json"), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    agents = [subprocess.Popen([sys.executable, "-m", "dtml_deploy.launch", *node, *args], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [a.communicate(timeout=240) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ranks"] == 2 and [c["status"] for c in report["cases"]] == ["ok"] * 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"case{i}.nii.gz" for i in range(3)]
    # exactly one agent's rank 0 printed the summary
    assert sum("3 of 3 scan(s) segmented on 2 ranks" in err for _, err in outs) == 1
