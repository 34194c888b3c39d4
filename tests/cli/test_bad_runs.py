"""Bad runs, bad bundles and bad requests for `train`, `segment --model`, `export` and `benchmark`.

Every case goes through the CLI and must end with the stated exit code, exactly one `error:` line, no
traceback, and no output left behind: the folder it would write is either not created or unchanged
byte for byte. Training cases stay tiny (n_filters 4, 32^3 patches, a few iterations on the shipped
real sample); most fail before any volume is loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dtml_deploy.bundle import Bundle
from dtml_deploy.cli import app
from dtml_deploy.errors import BundleError
from dtml_deploy.io.digest import file_sha256
from tests.conftest import SAMPLE, make_bundle

TINY = ["--labeled", "1", "--labeled-bs", "1", "--n-filters", "4", "--patch", "32", "32", "32",
        "--no-progress"]


def _run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def _snapshot(path: Path) -> dict[str, str] | None:
    """Every file under `path` with its SHA-256 (None: `path` does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": file_sha256(path)}
    return {str(p.relative_to(path)): (file_sha256(p) if p.is_file() else "dir") for p in sorted(path.rglob("*"))}


def _one_error(result, code: int) -> str:
    """The single `error:` line of a failed command, after checking the exit code and the absence of a
    traceback or an escaped exception."""
    text = result.stdout + result.stderr
    assert result.exit_code == code, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-iteration run (checkpoint, bundle, log), copied by the tests that need one."""
    out = tmp_path_factory.mktemp("run") / "run"
    r = _run("train", "--data", SAMPLE, "--out", out, *TINY, "--iterations", "2")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle().save(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture
def folder_pair(tmp_path: Path) -> tuple[Path, Path]:
    """The sample as a generic images/labels folder pair."""
    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    shutil.copytree(SAMPLE / "images", imgs)
    shutil.copytree(SAMPLE / "labels", labs)
    return imgs, labs


# ---------------------------------------------------------------------------- train: bad options


BAD_TRAIN_OPTIONS = {
    "lr-nan": (["--lr", "nan"], "lr must be a finite number"),
    "lr-inf": (["--lr", "inf"], "lr must be a finite number"),
    "lr-zero": (["--lr", "0"], "lr must be"),
    "lr-negative": (["--lr", "-0.01"], "lr must be"),
    "weight-decay-negative": (["--weight-decay", "-1e-4"], "weight_decay must be"),
    "momentum-one": (["--momentum", "1.0"], "momentum must be"),
    "momentum-nan": (["--momentum", "nan"], "momentum must be"),
    "k-nan": (["--k", "nan"], "k must be"),
    "k-zero": (["--k", "0"], "k must be"),
    "iterations-zero": (["--iterations", "0"], "iterations must be"),
    "labeled-bs-zero": (["--labeled-bs", "0"], "labeled_bs must be"),
    "unlabeled-bs-negative": (["--unlabeled-bs", "-1"], "unlabeled_bs must be"),
    "checkpoint-every-negative": (["--checkpoint-every", "-5"], "checkpoint_every must be"),
    "val-every-zero": (["--val-every", "0"], "val_every must be"),
    "dropout-one": (["--dropout", "1.0"], "dropout must be"),
    "lr-gamma-zero": (["--lr-gamma", "0"], "lr_gamma must be"),
    "lr-step-zero": (["--lr-step", "0"], "lr_step must be"),
    "lambda-max-nan": (["--lambda-max", "nan"], "lambda_max must be"),
    "rampup-period-zero": (["--rampup-period", "0"], "rampup_period must be"),
    "patch-not-16": (["--patch", "30", "32", "32"], "patch must be"),
    "n-filters-zero": (["--n-filters", "0"], "n_filters must be"),
    "seed-negative": (["--seed", "-1"], "seed must be"),
    "unlabeled-without-batch": (["--unlabeled-bs", "0", "--unlabeled", "2"], "never be drawn"),
    "device-bogus": (["--device", "bogus"], "is not a device; choose from"),
    "device-mps": (["--device", "mps"], "--device mps: dtml runs on the CPU or CUDA only"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TRAIN_OPTIONS))
def test_train_refuses_nonsense_options(kind: str, tmp_path: Path) -> None:
    extra, message = BAD_TRAIN_OPTIONS[kind]
    out = tmp_path / "run"
    r = _run("train", "--data", SAMPLE, "--out", out, *TINY, "--iterations", "2", *extra)
    assert message in _one_error(r, 2)
    assert not out.exists()


# ------------------------------------------------------------------------------- train: bad data


def _empty_labels(pair: tuple[Path, Path]) -> list[str | Path]:
    imgs, labs = pair
    for f in labs.iterdir():
        f.unlink()
    return ["--data", imgs, "--labels", labs]


def _unmatched_labels(pair: tuple[Path, Path]) -> list[str | Path]:
    imgs, labs = pair
    for f in labs.iterdir():
        f.rename(labs / f"label_{f.name}")
    return ["--data", imgs, "--labels", labs]


def _list_with_unknown_case(pair: tuple[Path, Path]) -> list[str | Path]:
    lst = pair[0].parent / "cases.txt"
    lst.write_text("SN4LF8SGBSRQUPTDSX78\nNOT_A_CASE\n")
    return ["--data", SAMPLE, "--case-list", lst]


BAD_DATA: dict[str, tuple[Callable[[tuple[Path, Path]], list[str | Path]] | list[str], str]] = {
    "labeled-more-than-data": (["--labeled", "5"], "asked for 5 labeled cases, but the data set has 3"),
    "unlabeled-more-than-left": (["--unlabeled", "5"], "asked for 5 unlabeled cases, but only 2"),
    "val-more-than-left": (["--val-cases", "3"], "asked for 3 validation cases, but only 2"),
    "val-leaves-no-unlabeled": (["--labeled", "2", "--val-cases", "1"], "2 labeled and 1 validation"),
    "recipe-full-on-3-cases": (["--recipe", "full", "--labeled", "80"], "asked for 80 labeled cases"),
    "labeled-bs-above-labeled": (["--labeled-bs", "2"], "labeled_bs=2 needs at least 2 labeled cases"),
    "empty-labels-folder": (_empty_labels, "holds no .nii/.nii.gz files"),
    "labels-match-no-image": (_unmatched_labels, "has the name of an image"),
    "case-list-unknown-case": (_list_with_unknown_case, "'NOT_A_CASE'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_train_data_errors_name_their_cause(kind: str, tmp_path: Path, folder_pair: tuple[Path, Path]) -> None:
    make, message = BAD_DATA[kind]
    args = make(folder_pair) if callable(make) else ["--data", SAMPLE, *make]
    out = tmp_path / "run"
    r = _run("train", "--out", out, *TINY, "--iterations", "2", *args)  # later options win
    error = _one_error(r, 2)
    assert message in error and "unlabeled_bs > 0 but" not in error
    assert not out.exists()


# ------------------------------------------------------------------- train: run folder and resume


def _corrupt_checkpoint(run: Path) -> None:
    f = run / "checkpoint" / "state.safetensors"
    f.write_bytes(f.read_bytes()[:200])


def _checkpoint_missing_key(run: Path) -> None:
    f = run / "checkpoint" / "state.safetensors"
    tensors = load_file(str(f))
    tensors.pop(next(k for k in tensors if k.startswith("model.")))
    save_file(tensors, str(f))


def _no_checkpoint(run: Path) -> None:
    shutil.rmtree(run / "checkpoint")


RUN_FOLDER: dict[str, tuple[list[str], Callable[[Path], None] | None, str]] = {
    "rerun-without-resume": (["--iterations", "4"], None, "continue it with --resume or replace it with --overwrite"),
    "resume-and-overwrite": (["--iterations", "4", "--resume", "--overwrite"], None, "pass only one"),
    "resume-not-beyond-checkpoint": (["--iterations", "2", "--resume"], None, "at iteration 2"),
    "resume-fewer-iterations": (["--iterations", "1", "--resume"], None, "leaves nothing to train"),
    "resume-changed-architecture": (["--iterations", "4", "--resume", "--n-filters", "8"], None,
                                    "n_filters 4 -> 8"),
    "resume-corrupt-checkpoint": (["--iterations", "4", "--resume"], _corrupt_checkpoint, "unreadable checkpoint"),
    "resume-missing-tensor": (["--iterations", "4", "--resume"], _checkpoint_missing_key, "do not fit"),
    "resume-without-checkpoint": (["--iterations", "4", "--resume"], _no_checkpoint, "no checkpoint to resume"),
}


@pytest.mark.parametrize("kind", sorted(RUN_FOLDER))
def test_run_folder_is_never_replaced_by_accident(kind: str, trained_run: Path, tmp_path: Path) -> None:
    extra, damage, message = RUN_FOLDER[kind]
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    if damage is not None:
        damage(run)
    before = _snapshot(run)
    r = _run("train", "--data", SAMPLE, "--out", run, *TINY, *extra)
    assert message in _one_error(r, 2)
    assert _snapshot(run) == before


def test_overwrite_replaces_the_whole_run(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    r = _run("train", "--data", SAMPLE, "--out", run, *TINY, "--iterations", "3", "--overwrite")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1, 2]  # the old log is gone, not appended to
    assert json.loads((run / "checkpoint" / "state.json").read_text())["iteration"] == 3


# ----------------------------------------------------------------------------- train: divergence


def test_diverging_run_exits_1_and_writes_no_bundle(tmp_path: Path) -> None:
    """lr 1e30 is finite (so accepted) but blows the weights up within two iterations."""
    out = tmp_path / "run"
    r = _run("train", "--data", SAMPLE, "--out", out, *TINY, "--iterations", "4", "--lr", "1e30")
    error = _one_error(r, 1)
    assert "training diverged: non-finite loss at iteration 1" in error and "total" in error
    assert "no checkpoint was written" in error
    assert not (out / "bundle").exists() and not (out / "checkpoint").exists()
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == rows[0]["loss"] and rows[1]["loss"] != rows[1]["loss"]  # finite, then NaN


def test_divergence_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN in one loss term at iteration 3 (between checkpoints at 2 and 4) stops the run before the
    checkpoint at 4 would replace the good one; the term is named."""
    from dtml_deploy.io.datasets import make_split, open_source
    from dtml_training import trainer as trainer_mod
    from dtml_training.divergence import TrainingDiverged
    from dtml_training.recipes import recipe

    real = trainer_mod.Objective.__call__

    def call(self, logits, sdm, batch, iteration):
        total, parts, weight = real(self, logits, sdm, batch, iteration)
        if iteration == 3:
            parts["dis"] = parts["dis"] * float("nan")
        return total, parts, weight

    monkeypatch.setattr(trainer_mod.Objective, "__call__", call)
    cfg = recipe("dtml", labeled=1, labeled_bs=1, n_filters=4, patch=(32, 32, 32), workers=0, iterations=6,
                 checkpoint_every=2)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"iteration 3 \(dis\).*checkpoint.*iteration 2\) is kept"):
        trainer_mod.Trainer(cfg, make_split(open_source(SAMPLE), 1, None), run, show_progress=False).run()
    assert json.loads((run / "checkpoint" / "state.json").read_text())["iteration"] == 2
    state = load_file(str(run / "checkpoint" / "state.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("model."))
    assert not (run / "bundle").exists()


def test_non_finite_weights_are_never_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An inf BatchNorm running variance leaves the training loss finite (training mode uses batch
    statistics), so only the weight check before writing can catch it."""
    from dtml_deploy.io.datasets import make_split, open_source
    from dtml_training import trainer as trainer_mod
    from dtml_training.divergence import TrainingDiverged
    from dtml_training.recipes import recipe

    real = trainer_mod.Trainer._step

    def step(self, st, batch, it, objective, scaler):
        out = real(self, st, batch, it, objective, scaler)
        if it == 0:
            bn = next(m for m in st.net.seg.modules() if isinstance(m, torch.nn.BatchNorm3d))
            bn.running_var[0] = float("inf")
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "_step", step)
    cfg = recipe("seg-only", labeled=1, labeled_bs=1, n_filters=4, patch=(32, 32, 32), workers=0, iterations=2,
                 checkpoint_every=0)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"non-finite weights at iteration 2 .*running_var"):
        trainer_mod.Trainer(cfg, make_split(open_source(SAMPLE), 1, 0), run, show_progress=False).run()
    assert not (run / "checkpoint").exists() and not (run / "bundle").exists()


# ----------------------------------------------------------------------------- bundles: segment


def _edit_config(bundle: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads((bundle / "config.json").read_text())
    edit(cfg)
    (bundle / "config.json").write_text(json.dumps(cfg))


def _rename_shard(bundle: Path, new_name: Callable[[Path], str]) -> None:
    cfg = json.loads((bundle / "config.json").read_text())
    old = next(iter(cfg["weights"]["files"]))
    name = new_name(bundle)
    cfg["weights"]["files"] = {name: cfg["weights"]["files"][old]}
    target = (bundle / name) if not Path(name).is_absolute() else Path(name)
    shutil.move(str(bundle / old), str(target))
    (bundle / "config.json").write_text(json.dumps(cfg))


def _symlinked_shard(bundle: Path) -> None:
    cfg = json.loads((bundle / "config.json").read_text())
    name = next(iter(cfg["weights"]["files"]))
    outside = bundle.parent / "elsewhere.safetensors"
    shutil.move(str(bundle / name), str(outside))
    (bundle / name).symlink_to(outside)


def _half_shards_declared_float32(bundle: Path) -> None:
    """fp16 shards (checksums updated) under a config that still says float32."""
    cfg = json.loads((bundle / "config.json").read_text())
    for name in cfg["weights"]["files"]:
        tensors = {k: v.half() for k, v in load_file(str(bundle / name)).items()}
        save_file(tensors, str(bundle / name), metadata={"format": "dtml-bundle"})
        cfg["weights"]["files"][name] = file_sha256(bundle / name)
    (bundle / "config.json").write_text(json.dumps(cfg))


def _nan_weight(bundle: Path) -> None:
    cfg = json.loads((bundle / "config.json").read_text())
    name = next(iter(cfg["weights"]["files"]))
    tensors = load_file(str(bundle / name))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(bundle / name), metadata={"format": "dtml-bundle"})
    cfg["weights"]["files"][name] = file_sha256(bundle / name)
    (bundle / "config.json").write_text(json.dumps(cfg))


def _set(*path_value):  # _set("model", "net", "norm", "bogus")
    *keys, last, value = path_value

    def edit(cfg: dict) -> None:
        d = cfg
        for k in keys:
            d = d[k]
        d[last] = value

    return lambda bundle: _edit_config(bundle, edit)


BAD_BUNDLES: dict[str, tuple[Callable[[Path], None], str]] = {
    "shard-outside-folder": (lambda b: _rename_shard(b, lambda b: "../outside.safetensors"), "bare"),
    "shard-absolute-path": (lambda b: _rename_shard(b, lambda b: str(b.parent / "abs.safetensors")), "bare"),
    "shard-in-subfolder": (lambda b: (b / "sub").mkdir() or _rename_shard(b, lambda b: "sub/w.safetensors"), "bare"),
    "shard-symlink-outside": (_symlinked_shard, "outside the bundle folder"),
    "shard-not-safetensors": (lambda b: _rename_shard(b, lambda b: "weights.bin"), "bare"),
    "intensity-mode-bogus": (_set("model", "intensity", "mode", "bogus"), "model.intensity.mode"),
    "norm-bogus": (_set("model", "net", "norm", "bogus"), "model.net.norm"),
    "n-filters-float": (_set("model", "net", "n_filters", 4.5), "model.net.n_filters"),
    "dropout-above-one": (_set("model", "net", "dropout", 1.5), "model.net.dropout"),
    "k-negative": (_set("model", "k", -3.0), "model.k"),
    "k-string": (_set("model", "k", "sharp"), "model.k"),
    "spacing-zero": (_set("model", "spacing", [0.0, 0.625, 0.625]), "model.spacing"),
    "spacing-two-values": (_set("model", "spacing", [0.625, 0.625]), "model.spacing"),
    "patch-not-16": (_set("model", "patch_size", [30, 32, 32]), "patch_size"),
    "patch-fractional": (_set("model", "patch_size", [32.5, 32, 32]), "model.patch_size"),
    "unknown-model-key": (_set("model", "colour", "red"), "unknown key"),
    "unknown-top-key": (_set("extra", 1), "unknown key"),
    "unknown-weights-key": (_set("weights", "compressed", True), "unknown key"),
    "dtype-unknown": (_set("weights", "dtype", "int8"), "weights.dtype"),
    "dtype-disagrees-with-shards": (_half_shards_declared_float32, "declares weights.dtype 'float32'"),
    "digest-not-hex": (lambda b: _edit_config(b, lambda c: c["weights"]["files"].update(
        {k: "xyz" for k in c["weights"]["files"]})), "SHA-256"),
    "format-version-string": (_set("format_version", "1"), "format_version"),
    "trained-unknown-network": (_set("training", {"trained": ["seg", "other"]}), "training.trained"),
    "nan-weights": (_nan_weight, "NaN or infinite"),
}


@pytest.mark.parametrize("kind", sorted(BAD_BUNDLES))
def test_segment_refuses_a_bad_bundle(kind: str, good_bundle: Path, tmp_path: Path) -> None:
    damage, message = BAD_BUNDLES[kind]
    bundle = tmp_path / "bundle"
    shutil.copytree(good_bundle, bundle)
    damage(bundle)
    scan = sorted((SAMPLE / "images").glob("*.nii.gz"))[0]
    out = tmp_path / "masks"
    r = _run("segment", scan, "-o", out, "--model", bundle, "--backend", "torch", "--device", "cpu", "--no-progress")
    assert message in _one_error(r, 2)
    assert not out.exists()


# ------------------------------------------------------------------------------ export, benchmark


def _trt_missing() -> bool:
    from dtml_deploy.backends.trt_backend import unavailable_reason

    return unavailable_reason() is not None


EXPORT_CASES: dict[str, tuple[list[str], str]] = {
    "opset-too-old": (["--opset", "5"], "--opset must be between 13"),
    "opset-too-new": (["--opset", "99"], "--opset must be between 13"),
    "real-case-missing": (["--real-case", "nowhere.nii.gz"], "no such file"),
    "trt-without-tensorrt": (["--trt"], "TensorRT"),
    "trt-bad-profile": (["--trt", "--min-batch", "0"], "min_batch"),
}


@pytest.mark.parametrize("kind", sorted(EXPORT_CASES))
def test_export_refuses_before_work_and_leaves_no_folder(kind: str, good_bundle: Path, tmp_path: Path) -> None:
    if kind == "trt-without-tensorrt" and not _trt_missing():
        pytest.skip("TensorRT runs here")
    extra, message = EXPORT_CASES[kind]
    out = tmp_path / "deep" / "exp"
    r = _run("export", "--model", good_bundle, "-o", out, *extra)
    assert message in _one_error(r, 2)
    assert not (tmp_path / "deep").exists()


def test_failed_export_removes_what_it_wrote_but_keeps_older_files(good_bundle: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 exports fine, fp16 then fails: the new fp32 file goes too, a file already there stays."""
    pytest.importorskip("onnxruntime")
    import dtml_export.pipeline as pipeline

    real = pipeline.export_verified_onnx

    def fail_fp16(bundle, out, precision, **kw):
        if precision == "fp16":
            raise pipeline.VerificationFailed(f"{out.name} failed verification: simulated")
        return real(bundle, out, precision, **kw)

    monkeypatch.setattr(pipeline, "export_verified_onnx", fail_fp16)
    out = tmp_path / "exp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = _run("export", "--model", good_bundle, "-o", out, "--precision", "fp32", "--precision", "fp16",
             "--no-verify")
    assert "simulated" in _one_error(r, 2)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


BENCH_CASES: dict[str, tuple[list[str], str]] = {
    "formats-unknown": (["--formats", "torch-fp99"], "choose from torch-fp32"),
    "formats-empty": (["--formats", ","], "names no row"),
    "formats-trt-without-tensorrt": (["--formats", "trt-fp16"], "nothing to benchmark on this machine"),
    "formats-fp16-on-cpu": (["--formats", "torch-fp16"], "torch-fp16 skipped (fp16 needs CUDA"),
    "repeats-zero": (["--repeats", "0"], "--repeats must be >= 1"),
    "batch-zero": (["--batch", "0"], "--batch values must be >= 1"),
    "min-dice-without-data": (["--min-dice", "0.9"], "--min-dice needs --data"),
}


@pytest.mark.parametrize("kind", sorted(BENCH_CASES))
def test_benchmark_refuses_requests_that_cannot_run(kind: str, good_bundle: Path, tmp_path: Path) -> None:
    if kind == "formats-trt-without-tensorrt" and not _trt_missing():
        pytest.skip("TensorRT runs here")
    extra, message = BENCH_CASES[kind]
    work, report = tmp_path / "work", tmp_path / "b.json"
    r = _run("benchmark", "--model", good_bundle, "--device", "cpu", "--no-progress", "-o", work,
             "--json", report, *extra)
    assert message in _one_error(r, 2)
    assert not work.exists() and not report.exists()


def test_benchmark_that_timed_nothing_exits_1(good_bundle: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from dtml_deploy.backends.torch_backend import TorchBackend

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated backend crash")

    monkeypatch.setattr(TorchBackend, "__init__", broken)
    report = tmp_path / "b.json"
    r = _run("benchmark", "--model", good_bundle, "--device", "cpu", "--no-progress", "--formats", "torch-fp32",
             "--repeats", "1", "--batch", "1", "--json", report)
    assert "no benchmark row ran: torch-fp32 failed: RuntimeError: simulated" in _one_error(r, 1)
    assert not report.exists()


def test_benchmark_json_into_a_folder_is_refused(good_bundle: Path, tmp_path: Path) -> None:
    r = _run("benchmark", "--model", good_bundle, "--device", "cpu", "--no-progress", "--json", tmp_path)
    assert "is a folder" in _one_error(r, 2)


# --------------------------------------------------------------- options a backend cannot honour


UNHONOURED = {  # ARTIFACT stands for a file of the given name in the test's folder
    "artifact-with-torch": (["--backend", "torch", "--artifact", "ARTIFACT:model-fp32.onnx"], "needs --backend onnx"),
    "compile-with-onnx": (["--backend", "onnx", "--artifact", "ARTIFACT:model-fp32.onnx", "--compile"], "--compile"),
    "graphs-with-onnx": (["--backend", "onnx", "--artifact", "ARTIFACT:model-fp32.onnx", "--cuda-graphs"],
                         "--cuda-graphs"),
    "artifact-unknown-suffix": (["--backend", "auto", "--artifact", "ARTIFACT:model.pt"], "not a known artifact"),
}


# evaluate has --artifact but none of segment's torch-only switches
@pytest.mark.parametrize("kind,command", [(k, c) for k in sorted(UNHONOURED) for c in ("segment", "evaluate")
                                          if c == "segment" or k.startswith("artifact")])
def test_options_a_backend_cannot_honour_are_refused(kind: str, command: str, good_bundle: Path,
                                                     tmp_path: Path) -> None:
    extra, message = UNHONOURED[kind]
    args = []
    for a in extra:
        if a.startswith("ARTIFACT:"):
            (tmp_path / a[9:]).write_bytes(b"never read: the request is refused first")
            a = str(tmp_path / a[9:])
        args.append(a)
    out = tmp_path / "masks"
    if command == "segment":
        scan = sorted((SAMPLE / "images").glob("*.nii.gz"))[0]
        r = _run("segment", scan, "-o", out, "--model", good_bundle, "--device", "cpu", "--no-progress", *args)
    else:
        r = _run("evaluate", "--model", good_bundle, "--data", SAMPLE, "--device", "cpu", "--no-progress",
                 "--json", out / "r.json", *args)
    assert message in _one_error(r, 2)
    assert not out.exists()


def test_save_uncertainty_needs_both_networks(tmp_path: Path) -> None:
    b = make_bundle()
    b.meta = {"training": {"trained": ["seg"]}}
    bundle = b.save(tmp_path / "bundle")
    scan = sorted((SAMPLE / "images").glob("*.nii.gz"))[0]
    r = _run("segment", scan, "-o", tmp_path / "m", "--model", bundle, "--backend", "torch", "--device", "cpu",
             "--no-progress", "--save-uncertainty")
    assert "--save-uncertainty needs both networks" in _one_error(r, 2)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------- the cached ONNX graph


def test_cached_onnx_is_checked_and_rebuilt(good_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    from dtml_export.pipeline import cached_onnx

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = Bundle.load(good_bundle)
    notes: list[str] = []
    path = cached_onnx(bundle, good_bundle, "fp32", notes.append)
    digest = path.with_name(path.name + ".sha256")
    assert digest.read_text().strip() == file_sha256(path) and len(notes) == 1 and "exporting" in notes[0]
    good = path.read_bytes()
    assert cached_onnx(bundle, good_bundle, "fp32", notes.append) == path and len(notes) == 1  # reused, silent

    path.write_bytes(good[: len(good) // 2])  # truncated: the digest no longer matches
    cached_onnx(bundle, good_bundle, "fp32", notes.append)
    assert notes[-1].startswith("note: the cached ONNX graph") and "does not match" in notes[-1]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest.read_text().strip()
    assert len(path.read_bytes()) == len(good)

    digest.unlink()  # written by a dtml that recorded no digest: not trusted
    cached_onnx(bundle, good_bundle, "fp32", notes.append)
    assert "has no recorded SHA-256" in notes[-1] and digest.is_file()


def test_corrupt_cached_onnx_does_not_break_segment(good_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    from dtml_export.pipeline import cached_onnx

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = cached_onnx(Bundle.load(good_bundle), good_bundle, "fp32", lambda _: None)
    path.write_bytes(b"garbage")
    scan = sorted((SAMPLE / "images").glob("*.nii.gz"))[0]
    r = _run("segment", scan, "-o", tmp_path / "m", "--model", good_bundle, "--backend", "onnx", "--device", "cpu",
             "--no-progress", "--overlap", "0.1")
    assert r.exit_code == 0, r.output
    assert "note: the cached ONNX graph" in r.stderr and "exporting it again" in r.stderr


# --------------------------------------------------------------------------------- unit: the cores


@pytest.mark.parametrize("field,value", [
    ("lr", float("nan")), ("lr", float("inf")), ("lr", -1.0), ("momentum", -0.1), ("momentum", 1.0),
    ("weight_decay", float("nan")), ("k", float("inf")), ("lr_gamma", 1.5), ("iterations", 0),
    ("labeled_bs", 0), ("unlabeled_bs", -1), ("checkpoint_every", -1), ("val_cases", -1), ("unlabeled", -3),
    ("workers", -2), ("dropout", float("nan")), ("val_every", 0), ("seed", 2**32), ("iterations", 2.5),
    ("patch", (32, 32)), ("intensity", "bogus"),
])
def test_train_config_names_the_bad_field(field: str, value: object) -> None:
    from dtml_training.recipes import recipe

    with pytest.raises(ValueError, match=rf"^{field} must be"):
        recipe("dtml", **{field: value})


def test_consistency_config_is_checked() -> None:
    from dtml_training.losses import ConsistencyConfig

    for kw, name in (({"lambda_max": float("nan")}, "lambda_max"), ({"rampup_period": 0}, "rampup_period"),
                     ({"rampup_length": -1.0}, "rampup_length")):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            ConsistencyConfig(**kw)


def test_labeled_only_recipes_record_no_unlabeled_cases() -> None:
    from dtml_training.recipes import recipe

    assert recipe("dtml", unlabeled_bs=0).unlabeled == 0  # recorded as used: none
    assert recipe("dtml").unlabeled is None


def test_bundle_validation_messages_name_the_file_and_field(good_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(good_bundle, bundle)
    _set("model", "intensity", "mode", "bogus")(bundle)
    with pytest.raises(BundleError, match=r"config\.json: model\.intensity\.mode must be one of"):
        Bundle.load(bundle)
    shutil.rmtree(bundle)
    shutil.copytree(good_bundle, bundle)
    _rename_shard(bundle, lambda b: "../outside.safetensors")
    with pytest.raises(BundleError, match=r"'\.\./outside\.safetensors' must be a bare"):
        Bundle.load(bundle)
    assert (tmp_path / "outside.safetensors").is_file()  # it exists: refused by name, not by absence


def test_single_network_bundle_segments_with_the_default_head(tmp_path: Path) -> None:
    """The default head (mean) of a seg-only bundle is its one head; asking for the other one is refused."""
    b = make_bundle()
    b.meta = {"training": {"trained": ["seg"]}}
    bundle = b.save(tmp_path / "bundle")
    scan = sorted((SAMPLE / "images").glob("*.nii.gz"))[0]
    cpu = ["--model", bundle, "--backend", "torch", "--device", "cpu", "--no-progress"]
    r = _run("segment", scan, "-o", tmp_path / "m", *cpu)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / scan.name).is_file()  # <case>.nii.gz, as for a two-network bundle
    r = _run("segment", scan, "-o", tmp_path / "n", *cpu, "--head", "sdm")
    assert "--head sdm needs the other network" in _one_error(r, 2)
