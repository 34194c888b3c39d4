"""What a bundle's config.json may say: every section and field checked, each failure naming the field.

A bundle is read from disk that anyone may have edited, so nothing in it is trusted: shard names must
be bare file names inside the bundle folder (no path separators, no `..`, no link leading out), the
declared weight dtype must be the shards' actual dtype, and unknown keys are refused rather than
silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dtml_deploy.checks import is_int
from dtml_deploy.errors import BundleError
from dtml_deploy.qc_reference import QCReference

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
META_KEYS = frozenset({"recipe", "data_fingerprint", "training", "qc"})  # what a bundle's `meta` may hold
TOP_KEYS = frozenset({"format", "format_version", "dtml_version", "model", "weights"}) | META_KEYS
WEIGHT_KEYS = frozenset({"dtype", "files", "n_tensors", "content_hash"})
SHARD_SUFFIX = ".safetensors"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NETWORKS = ("seg", "dis")


def _fail(cfg_path: Path, message: str) -> BundleError:
    return BundleError(f"{cfg_path}: {message}")


def check_top_level(config: dict[str, Any], cfg_path: Path) -> None:
    """Known keys only, each of the right type (the `model` and `weights` sections are checked apart)."""
    unknown = sorted(set(config) - TOP_KEYS)
    if unknown:
        raise _fail(cfg_path, f"unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    version = config.get("format_version")
    if not (is_int(version) and version >= 1):
        raise _fail(cfg_path, f"format_version must be an integer >= 1, got {version!r}")
    for key, kind in (("dtml_version", str), ("data_fingerprint", str), ("recipe", dict), ("training", dict)):
        if key in config and config[key] is not None and not isinstance(config[key], kind):
            raise _fail(cfg_path, f"{key} must be a {'string' if kind is str else 'JSON object'}, "
                                  f"got {type(config[key]).__name__}")
    if "qc" in config:  # absent: no QC (the run says so); present: a valid block, null and {} included
        check_qc(config["qc"], cfg_path)
    trained = (config.get("training") or {}).get("trained")
    if trained is not None and not (isinstance(trained, list) and trained
                                    and all(t in _NETWORKS for t in trained) and len(set(trained)) == len(trained)):
        raise _fail(cfg_path, f"training.trained must be a non-empty list of {list(_NETWORKS)}, got {trained!r}")


def check_qc(qc: Any, cfg_path: Path) -> None:
    """The calibrated QC reference (dtml_deploy/qc_reference.py): every field present and in range."""
    try:
        QCReference.from_dict(qc)
    except ValueError as e:
        raise _fail(cfg_path, str(e)) from None


def check_weights(weights: Any, cfg_path: Path) -> tuple[str, dict[str, str]]:
    """The `weights` section: (declared dtype, {shard name: sha256})."""
    if not isinstance(weights, dict):
        raise _fail(cfg_path, "weights must be a JSON object with dtype, files and n_tensors")
    unknown = sorted(set(weights) - WEIGHT_KEYS)
    if unknown:
        raise _fail(cfg_path, f"weights: unknown key(s) {unknown}; known: {sorted(WEIGHT_KEYS)}")
    dtype = weights.get("dtype", "float32")
    if dtype not in DTYPES:
        raise _fail(cfg_path, f"weights.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    n = weights.get("n_tensors")
    if n is not None and not (is_int(n) and n >= 1):
        raise _fail(cfg_path, f"weights.n_tensors must be an integer >= 1, got {n!r}")
    files = weights.get("files")
    if not isinstance(files, dict) or not files:
        raise _fail(cfg_path, "lists no weight files (weights.files must map shard names to SHA-256 digests)")
    for name, digest in files.items():
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise _fail(cfg_path, f"weights.files[{name!r}] must be a SHA-256 digest (64 hex digits), got {digest!r}")
    return dtype, files


def shard_path(bundle_dir: Path, name: str, cfg_path: Path) -> Path:
    """The file of shard `name`, which must be a bare `*.safetensors` name inside `bundle_dir` (a link
    whose target lies outside the folder is refused too)."""
    bare = (name and name == Path(name).name and "/" not in name and "\\" not in name
            and name not in (".", "..") and not name.startswith("."))
    if not bare or not name.endswith(SHARD_SUFFIX):
        raise _fail(cfg_path, f"weights.files: shard name {name!r} must be a bare *{SHARD_SUFFIX} file name "
                              "inside the bundle folder")
    path = bundle_dir / name
    if path.is_symlink() and path.resolve().parent != bundle_dir.resolve():
        raise _fail(cfg_path, f"weights.files: shard {name!r} is a link to {path.resolve()}, outside the bundle folder")
    return path


def check_dtypes(tensors: dict[str, torch.Tensor], declared: str, shard: Path) -> None:
    """Every floating tensor of a shard is stored in the dtype config.json declares."""
    want = DTYPES[declared]
    for name, t in tensors.items():
        if t.is_floating_point() and t.dtype != want:
            got = str(t.dtype).replace("torch.", "")
            raise BundleError(f"{shard}: tensor {name} is {got}, but config.json declares weights.dtype {declared!r}")
