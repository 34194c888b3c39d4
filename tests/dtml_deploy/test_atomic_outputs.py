"""io/atomic.py's output sets and io/outputs.py's plan, without a model: replacing a set restores the old one
when putting the new one in place fails, `exclusive` refuses a file that appeared meanwhile, leftovers are
removed only with the set, and a run's plan refuses shared paths with both names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dtml_deploy.errors import InputError
from dtml_deploy.io.atomic import atomic_paths
from dtml_deploy.io.outputs import OutputSpec, input_companions, output_is_file, plan_run


def _set(folder: Path, **files: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return sorted(folder.iterdir())


def test_a_set_that_fails_to_go_in_place_restores_the_old_one(tmp_path: Path) -> None:
    _set(tmp_path, a__nii="old a", b__nii="old b")
    (tmp_path / "c.nii").mkdir()  # the third target cannot be replaced by a file
    with pytest.raises(OSError), atomic_paths([tmp_path / n for n in ("a.nii", "b.nii", "c.nii")]) as tmps:
        for t in tmps:
            t.write_text("new")
    assert (tmp_path / "a.nii").read_text() == "old a" and (tmp_path / "b.nii").read_text() == "old b"
    assert sorted(os.listdir(tmp_path)) == ["a.nii", "b.nii", "c.nii"]  # no temporaries, no backups


def test_exclusive_refuses_a_file_written_meanwhile(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="another run"), atomic_paths([tmp_path / "m.nii"], exclusive=True) as tmps:
        tmps[0].write_text("mine")
        (tmp_path / "m.nii").write_text("theirs")  # another process finished first
    assert (tmp_path / "m.nii").read_text() == "theirs" and os.listdir(tmp_path) == ["m.nii"]


def test_leftovers_go_with_the_set_and_come_back_if_it_fails(tmp_path: Path) -> None:
    _set(tmp_path, m__nii="old", m_prob__nii="old map")
    with atomic_paths([tmp_path / "m.nii"], remove=lambda: [tmp_path / "m_prob.nii"]) as tmps:
        tmps[0].write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["m.nii"] and (tmp_path / "m.nii").read_text() == "new"
    _set(tmp_path, m_prob__nii="old map")
    (tmp_path / "x.nii").mkdir()
    with pytest.raises(OSError), atomic_paths([tmp_path / "m.nii", tmp_path / "x.nii"],
                                              remove=[tmp_path / "m_prob.nii"]) as tmps:
        for t in tmps:
            t.write_text("newer")
    assert (tmp_path / "m.nii").read_text() == "new" and (tmp_path / "m_prob.nii").read_text() == "old map"


def test_plan_names_both_inputs_of_a_shared_path(tmp_path: Path) -> None:
    a, b = tmp_path / "x.nii.gz", tmp_path / "x_sdm.nii.gz"
    with pytest.raises(InputError) as e:
        plan_run([a, b], ["x", "x_sdm"], tmp_path / "out", OutputSpec(maps=("sdm",)))
    assert str(a) in str(e.value) and str(b) in str(e.value) and "distance map" in str(e.value)
    plan = plan_run([a, b], ["x", "x_sdm"], tmp_path / "out", OutputSpec(maps=("prob",)))
    assert [sorted(c) for c in plan.cases] == [["mask", "prob"], ["mask", "prob"]]  # type: ignore[arg-type]


def test_a_detached_header_protects_its_data_file(tmp_path: Path) -> None:
    (tmp_path / "scan.mhd").write_text("ObjectType = Image\nNDims = 3\nElementDataFile = scan.zraw\n")
    (tmp_path / "scan.nhdr").write_text("NRRD0004\ntype: float\ndata file: ./scan.raw.gz\n")
    assert input_companions(tmp_path / "scan.mhd") == [tmp_path / "scan.zraw"]
    assert input_companions(tmp_path / "scan.nhdr") == [tmp_path / "./scan.raw.gz"]


@pytest.mark.parametrize("name,is_file", [("m.nii.gz", True), ("M.NRRD", True), ("m.mha", True), ("run.v2", False),
                                          ("results", False)])
def test_o_is_a_file_by_its_suffix(name: str, is_file: bool) -> None:
    assert output_is_file(Path(name)) is is_file


@pytest.mark.parametrize("name", ["m.mhd", "m.nhdr", "m.h5", "m.dcm", "m.png", ".nii.gz"])
def test_o_with_a_suffix_dtml_cannot_write_is_refused_with_the_list(name: str) -> None:
    with pytest.raises(InputError, match=r"\.nii\.gz, \.nii, \.nrrd, \.mha|no name before"):
        output_is_file(Path(name))
