"""Training: data layouts, the label firewall, augmentation, sampler, bad input, and the trainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import DataError
from dtml_deploy.io.datasets import LabeledCase, UnlabeledCase, make_split, open_source
from dtml_training.data import cache as cache_mod
from dtml_training.data.augment import random_patch
from dtml_training.data.cache import load_training_volumes
from dtml_training.data.sampler import TwoStreamSampler
from dtml_training.recipes import RECIPES, recipe
from dtml_training.trainer import Trainer

TINY = dict(n_filters=4, patch=(32, 32, 32), workers=0, checkpoint_every=0)


def tiny(name: str = "dtml", **kw) -> object:
    base = {"labeled": 1, "labeled_bs": 1, "unlabeled_bs": 0 if name in ("seg-only", "sdm-only", "full",
                                                                         "dtml-labeled-only") else 2}
    return recipe(name, **{**base, **TINY, **kw})


def copy_sample(sample_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(sample_root, dst)
    return dst


# --- layouts and the split ---------------------------------------------------------------------------

def test_la2018_layout_and_paper_split(la2018):
    src = open_source(la2018)
    assert src.layout == "la2018" and len(src.case_ids) == 80
    split = make_split(src, 16, None)
    assert [c.case_id for c in split.labeled] == src.splits["labeled_16"]
    assert [c.case_id for c in split.unlabeled] == src.splits["unlabeled_16"]
    split8 = make_split(src, 8, None, n_val=4)
    assert len(split8.labeled) == 8 and len(split8.unlabeled) == 68 and len(split8.validation) == 4
    assert not {c.case_id for c in split8.validation} & {c.case_id for c in split8.unlabeled}


def test_h5_and_folder_layouts_read_the_same_arrays(sample_root, tmp_path):
    ids = json.loads((sample_root / "splits.json").read_text())["train"]
    h5root, imgs, labs = tmp_path / "h5", tmp_path / "imgs", tmp_path / "labs"
    imgs.mkdir()
    labs.mkdir()
    for cid in ids:
        img = nib.load(str(sample_root / "images" / f"{cid}.nii.gz")).get_fdata(dtype=np.float32)
        lab = np.asarray(nib.load(str(sample_root / "labels" / f"{cid}.nii.gz")).dataobj)
        (h5root / cid).mkdir(parents=True)
        with h5py.File(h5root / cid / "mri_norm2.h5", "w") as f:
            f["image"], f["label"] = img, lab
        shutil.copy(sample_root / "images" / f"{cid}.nii.gz", imgs)
        shutil.copy(sample_root / "labels" / f"{cid}.nii.gz", labs)
    (h5root / "train.list").write_text("\n".join(ids) + "\n")
    caches = []
    for src in (open_source(sample_root), open_source(h5root), open_source(imgs, labels_dir=labs)):
        assert list(src.case_ids) == ids or sorted(src.case_ids) == sorted(ids)
        split = make_split(src, 1, None, labeled_ids=[ids[0]])
        caches.append(load_training_volumes(split))
    for other in caches[1:]:
        for a, b in zip(caches[0].images, other.images):
            assert np.array_equal(a, b)
        assert np.array_equal(caches[0].labels[0], other.labels[0])


def test_unlabeled_cases_cannot_reach_their_labels(sample_root):
    split = make_split(open_source(sample_root), 1, None)
    assert all(isinstance(c, UnlabeledCase) and not hasattr(c, "label") for c in split.unlabeled)
    assert all(isinstance(c, LabeledCase) for c in split.labeled)


def test_semi_supervised_run_never_reads_unlabeled_labels(sample_root, tmp_path, monkeypatch):
    data = copy_sample(sample_root, tmp_path)
    split_ids = json.loads((data / "splits.json").read_text())
    for cid in split_ids["unlabeled_1"]:  # remove the labels training must not read
        (data / "labels" / f"{cid}.nii.gz").unlink()
    read = []
    real = cache_mod.read_ref
    monkeypatch.setattr(cache_mod, "read_ref", lambda ref, **kw: read.append(ref.path.name) or real(ref, **kw))
    cfg = tiny(iterations=3)
    split = make_split(open_source(data), 1, None)
    result = Trainer(cfg, split, tmp_path / "run", show_progress=False).run()
    assert result.bundle is not None
    label_reads = [n for n in read if n.replace(".nii.gz", "") in split_ids["unlabeled_1"]]
    assert len(label_reads) == 2  # each unlabeled case: its image once, never its label
    assert read.count(f"{split_ids['labeled_1'][0]}.nii.gz") == 2  # labeled: image + label


# --- augmentation and sampling -----------------------------------------------------------------------

def test_random_patch_keeps_image_and_label_aligned():
    """Every voxel value is unique, so each patch reveals its crop, rotation and flip: undoing them must
    give a crop of the volume, the label must have moved with the image, and across seeds every distinct
    rot90 x flip transform must occur."""
    img = np.arange(60 * 50 * 40, dtype=np.float32).reshape(60, 50, 40)
    lab = (img % 7 == 0).astype(np.uint8)
    seen = set()
    for seed in range(80):
        pi, pl = random_patch([img, lab], (32, 24, 16), np.random.default_rng(seed))
        assert pi.shape == (32, 24, 16) and pl.shape == (32, 24, 16)
        assert np.array_equal(pl, (pi % 7 == 0).astype(np.uint8))  # same crop, rotation and flip
        found = []
        for k in range(4):
            for axis in (0, 1):
                block = np.rot90(np.flip(pi, axis=axis), -k, axes=(0, 1))  # undo flip, then rotation
                x, y, z = np.unravel_index(int(block[0, 0, 0]), img.shape)
                sl = tuple(slice(c, c + n) for c, n in zip((x, y, z), block.shape))
                if all(s.stop <= n for s, n in zip(sl, img.shape)) and np.array_equal(block, img[sl]):
                    found.append((k, axis))
        # rot90(k) then flip(0) is rot90(k + 2) then flip(1): every patch has exactly two readings
        assert len(found) == 2 and {k for k, _ in found} in ({0, 2}, {1, 3}), found
        seen.add(frozenset(found))
    assert len(seen) == 4  # all four mirror images of the crop (the released code always flips)


def test_random_patch_pads_small_volumes():
    img = np.ones((20, 30, 10), np.float32)
    (p,) = random_patch([img], (32, 32, 16), np.random.default_rng(0))
    assert p.shape == (32, 32, 16) and p.min() == 0.0 and p.max() == 1.0


def test_sampler_two_streams_and_purity():
    s = TwoStreamSampler(16, 64, 2, 2, seed=1337, start=0, stop=100)
    batches = list(s)
    assert all(len(b) == 4 and b[0][0] < 16 and b[1][0] < 16 and b[2][0] >= 16 and b[3][0] >= 16 for b in batches)
    first_pass = sorted(i for b in batches[:8] for i, _ in b[:2])
    assert first_pass == list(range(16))  # every labeled case once per pass
    assert [i for b in batches[:8] for i, _ in b[:2]] != [i for b in batches[8:16] for i, _ in b[:2]]  # reshuffled
    unl = [i for b in batches[:32] for i, _ in b[2:]]
    assert sorted(unl) == list(range(16, 80))  # unlabeled cycle through all 64
    resumed = list(TwoStreamSampler(16, 64, 2, 2, seed=1337, start=50, stop=100))
    assert resumed == batches[50:]  # a pure function of (seed, iteration)
    assert list(TwoStreamSampler(16, 64, 2, 2, seed=1, start=0, stop=5)) != batches[:5]


# --- bad input ---------------------------------------------------------------------------------------

def _write(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


@pytest.mark.parametrize("problem,match", [
    ("shape", "label shape"), ("nonbinary", "not binary"), ("nan", "NaN or infinite"),
    ("constant", "constant image"), ("missing_label", "no such file"),
])
def test_bad_training_data_fails_before_training(sample_root, tmp_path, problem, match):
    data = copy_sample(sample_root, tmp_path)
    cid = json.loads((data / "splits.json").read_text())["labeled_1"][0]
    img_p, lab_p = data / "images" / f"{cid}.nii.gz", data / "labels" / f"{cid}.nii.gz"
    img = nib.load(str(img_p)).get_fdata(dtype=np.float32)
    lab = np.asarray(nib.load(str(lab_p)).dataobj).astype(np.uint8)
    if problem == "shape":
        _write(lab_p, lab[:-1])
    elif problem == "nonbinary":
        _write(lab_p, lab * 255)
    elif problem == "nan":
        img[3, 3, 3] = np.nan
        _write(img_p, img)
    elif problem == "constant":
        _write(img_p, np.full_like(img, 2.0))
    else:
        lab_p.unlink()
    split = make_split(open_source(data), 1, None)
    with pytest.raises(DataError, match=match):
        load_training_volumes(split)


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="unrecognised layout"):
        open_source(tmp_path / "empty")
    (tmp_path / "e2" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no cases"):
        open_source(tmp_path / "e2")


def test_empty_labeled_list_is_refused(sample_root):
    with pytest.raises(DataError, match="labeled list is empty"):
        make_split(open_source(sample_root), 0, None, labeled_ids=[])
    with pytest.raises(ValueError, match="labeled"):
        recipe("dtml", labeled=0)


def test_recipes_cover_the_papers_rows():
    assert set(RECIPES) == {"dtml", "dtml-dis", "dtml-dis-mask", "dtml-labeled-only", "seg-only", "sdm-only", "full"}
    assert recipe("dtml").supervision == "mask" and recipe("dtml").consistency
    assert recipe("dtml-dis-mask").supervision == "dis+mask"
    assert recipe("seg-only").train_dis is False and recipe("sdm-only").train_seg is False
    assert recipe("full").labeled == 80 and recipe("dtml", labeled=8).labeled == 8
    assert recipe("dtml", lr=0.02, iterations=10).lr == 0.02


# --- the trainer -------------------------------------------------------------------------------------

def _weights(bundle_dir: Path) -> dict[str, torch.Tensor]:
    return Bundle.load(bundle_dir).state


@pytest.mark.slow
def test_tiny_real_training_loss_falls(sample_root, tmp_path):
    cfg = tiny("dtml-labeled-only", labeled=2, labeled_bs=2, iterations=60, lr=0.05, seed=3)
    split = make_split(open_source(sample_root), 2, None)
    Trainer(cfg, split, tmp_path / "run", show_progress=False).run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 60 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])


def test_resume_is_bit_for_bit(sample_root, tmp_path):
    split = make_split(open_source(sample_root), 1, None)
    cfg = tiny(iterations=12, checkpoint_every=0)
    Trainer(cfg, split, tmp_path / "a", show_progress=False).run()
    first = Trainer(cfg, split, tmp_path / "b", show_progress=False, stop_at=6).run()
    assert first.interrupted and first.iterations == 6 and first.bundle is None
    second = Trainer(cfg, split, tmp_path / "b", resume=True, show_progress=False).run()
    assert second.iterations == 12 and not second.interrupted
    wa, wb = _weights(tmp_path / "a" / "bundle"), _weights(tmp_path / "b" / "bundle")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == list(range(12))


def test_cpu_training_keeps_freed_host_memory(sample_root, tmp_path, monkeypatch):
    import dtml_training.trainer as trainer_mod

    calls = []
    monkeypatch.setattr(trainer_mod, "keep_freed_host_memory", lambda: calls.append(1) or True)
    Trainer(tiny(iterations=1), make_split(open_source(sample_root), 1, None), tmp_path / "m",
            show_progress=False).run()
    assert calls == [1]  # the CPU run asked glibc to keep freed memory (tests/dtml_deploy/test_host_memory.py: effect)


def test_resume_refuses_a_changed_recipe(sample_root, tmp_path):
    split = make_split(open_source(sample_root), 1, None)
    Trainer(tiny(iterations=2), split, tmp_path / "r", show_progress=False).run()
    from dtml_deploy.errors import DtmlError

    with pytest.raises(DtmlError, match="different configuration"):
        Trainer(tiny(iterations=4, lr=0.5), split, tmp_path / "r", resume=True, show_progress=False).run()


def test_distributed_world_size_one_on_gloo(sample_root, tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    split = make_split(open_source(sample_root), 1, None)
    result = Trainer(tiny(iterations=2), split, tmp_path / "ddp", show_progress=False).run()
    assert result.summary["world_size"] == 1 and result.bundle is not None
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("name", ["seg-only", "sdm-only", "dtml-dis-mask"])
def test_other_recipes_train(sample_root, tmp_path, name):
    cfg = tiny(name, iterations=2)
    split = make_split(open_source(sample_root), cfg.labeled, cfg.unlabeled)
    result = Trainer(cfg, split, tmp_path / name, show_progress=False).run()
    trained = Bundle.load(result.bundle).meta["training"]["trained"]
    assert trained == {"seg-only": ["seg"], "sdm-only": ["dis"], "dtml-dis-mask": ["seg", "dis"]}[name]
    # the weights say the same: one more iteration moves every trained network and no other
    longer = Trainer(tiny(name, iterations=3), split, tmp_path / f"{name}-3", show_progress=False).run()
    a, b = Bundle.load(result.bundle).state, Bundle.load(longer.bundle).state
    for net in ("seg", "dis"):
        moved = any(not torch.equal(a[k], b[k]) for k in a if k.startswith(f"{net}."))
        assert moved == (net in trained), net


@pytest.mark.slow
def test_train_cli_short_real_run(la2018, tmp_path):
    """A short `dtml train` run (30 iterations, n_filters 4, patch 48 48 32) on the real data set."""
    from typer.testing import CliRunner

    from dtml_deploy.cli import app

    out = tmp_path / "x"
    r = CliRunner().invoke(app, ["train", "--recipe", "dtml", "--data", str(la2018), "--out", str(out),
                                 "--iterations", "30", "--n-filters", "4", "--patch", "48", "48", "32",
                                 "--no-progress", "--val-cases", "2", "--val-every", "30"])
    assert r.exit_code == 0, r.output
    b = Bundle.load(out / "bundle")
    assert b.meta["training"]["iterations"] == 30 and b.model.patch_size == (48, 48, 32)
    assert b.meta["recipe"]["recipe"] == "dtml" and len(b.meta["data_fingerprint"]) == 16
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert next(r for r in rows if r.get("event") == "validation")["iteration"] == 30


_SIGTERM_RUN = """
import json, signal, sys
from pathlib import Path
from dtml_deploy.io.datasets import make_split, open_source
from dtml_training import trainer as trainer_mod
from dtml_training.recipes import recipe

root, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = dict(labeled=1, labeled_bs=1, unlabeled_bs=2, n_filters=4, patch=(32, 32, 32), workers=0, checkpoint_every=0,
           iterations=10)
real = trainer_mod.Objective.__call__

def call(self, logits, sdm, batch, iteration):
    if iteration == 2:
        signal.raise_signal(signal.SIGTERM)
    return real(self, logits, sdm, batch, iteration)

split = make_split(open_source(root), 1, None)
before = signal.getsignal(signal.SIGTERM)
trainer_mod.Objective.__call__ = call
first = trainer_mod.Trainer(recipe("dtml", **cfg), split, out, show_progress=False).run()
restored = signal.getsignal(signal.SIGTERM) is before
trainer_mod.Objective.__call__ = real
again = trainer_mod.Trainer(recipe("dtml", **cfg), split, out, resume=True, show_progress=False).run()
print(json.dumps({"interrupted": first.interrupted, "iterations": first.iterations,
                  "bundle": first.bundle is not None, "restored": restored,
                  "resumed": again.iterations, "resumed_bundle": again.bundle is not None}))
"""


def test_sigterm_checkpoints_and_stops(sample_root, tmp_path):
    """A SIGTERM mid-run finishes the current iteration, writes a checkpoint and reports the stop; a resume
    completes the run. In its own process, so that what earlier tests loaded cannot matter (OpenVINO once
    left a freed alternate signal stack behind: dtml_deploy/backends/signal_stack.py)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _SIGTERM_RUN, str(sample_root), str(tmp_path / "sig")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got == {"interrupted": True, "iterations": 3, "bundle": False, "restored": True, "resumed": 10,
                   "resumed_bundle": True}


def test_train_cli_overrides_reach_the_config(sample_root, tmp_path):
    from typer.testing import CliRunner

    from dtml_deploy.cli import app

    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["train", "--data", str(sample_root), "--out", str(out), "--labeled", "1",
                                 "--labeled-bs", "1", "--iterations", "2", "--n-filters", "4", "--patch", "32", "32",
                                 "32", "--momentum", "0.8", "--weight-decay", "0.001", "--lr-gamma", "0.5",
                                 "--dropout", "0.2", "--schedule", "paper", "--lambda-max", "0.3",
                                 "--rampup-period", "10", "--no-progress"])
    assert r.exit_code == 0, r.output
    rec = Bundle.load(out / "bundle").meta["recipe"]
    assert rec["momentum"] == 0.8 and rec["weight_decay"] == 0.001 and rec["lr_gamma"] == 0.5
    assert rec["dropout"] == 0.2 and rec["consistency_cfg"] == {"schedule": "paper", "lambda_max": 0.3,
                                                                 "rampup_period": 10, "rampup_length": 40.0}
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(out)])
    assert r.exit_code == 2 and "does not exist" in r.stderr
