"""The README's commands stay true."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from dtml_deploy.cli import app
from dtml_deploy.metrics import dice

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_quick_start_segments_the_sample(tmp_path, monkeypatch):
    text = README.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("dtml segment tests/data/"))
    args = shlex.split(line.split("&&")[0])[1:]  # drop 'dtml'
    assert args[0] == "segment"
    monkeypatch.chdir(README.parent)
    out = tmp_path / "masks"
    args[args.index("-o") + 1] = str(out)
    r = CliRunner().invoke(app, [*args, "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    (mask,) = out.glob("*.nii.gz")
    m = np.asarray(nib.load(str(mask)).dataobj)
    # The sample case is on the paper's unlabeled list: training never read this label.
    label = np.asarray(nib.load(str(README.parent / "tests/data/la_sample/labels" / mask.name)).dataobj)
    assert m.dtype == np.uint8 and dice(m, label) > 0.85  # shipped model, default pipeline (0.906 measured)


def test_every_command_in_the_readme_exists():
    names = set(re.findall(r"^dtml (\w+)", README.read_text(), flags=re.M))
    r = CliRunner().invoke(app, ["--help"])
    assert names == {"train", "export", "segment", "evaluate", "benchmark", "plot", "serve"}
    for name in names:
        assert name in r.output
        assert CliRunner().invoke(app, [name, "--help"]).exit_code == 0


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    """The README's Python API block, executed as written on the shipped sample case."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests" / "data").mkdir(parents=True)
    (tmp_path / "tests" / "data" / "la_sample").symlink_to(README.parent / "tests" / "data" / "la_sample")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["written"] == [Path("api-out") / "SN4LF8SGBSRQUPTDSX78.nii.gz"]
    mask = np.asarray(nib.load(str(tmp_path / scope["written"][0])).dataobj)
    label = np.asarray(nib.load(str(README.parent / "tests/data/la_sample/labels/SN4LF8SGBSRQUPTDSX78.nii.gz")).dataobj)
    assert dice(mask, label) > 0.85  # the shipped model's mask, as the CLI's quick start (0.906 measured)
