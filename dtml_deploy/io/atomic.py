"""Atomic writes: an output appears whole under its final name or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create owner-only entries; give the final output the usual umask permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_paths(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield temporary file paths beside `paths`; if the block succeeds, rename each onto its path.

    All files appear under their final names or none does: a rename that fails (say, the target is a
    directory) removes the ones this call already put in place. Temporary names keep the final suffixes
    (nibabel picks the format from them).
    """
    paths = [Path(p) for p in paths]
    tmps: list[Path] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes) or ".tmp",
                                       dir=path.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield list(tmps)
        placed: list[Path] = []
        try:
            for tmp, path in zip(tmps, paths, strict=True):
                if tmp.exists():
                    _public(tmp, directory=False)
                try:
                    os.replace(tmp, path)
                except OSError as e:  # name the output, not the hidden temporary file
                    raise OSError(e.errno, e.strerror, str(path)) from e
                placed.append(path)
        except BaseException:
            for done in placed:
                done.unlink(missing_ok=True)
            raise
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """`atomic_paths` for one file."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


def atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; swap it into place when the block succeeds.

    An existing directory at `path` is replaced only after the new one is complete, so a crash
    leaves either the old content or the new one, never a mixture.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _public(tmp, directory=True)
        for f in tmp.rglob("*"):
            _public(f, directory=f.is_dir())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
