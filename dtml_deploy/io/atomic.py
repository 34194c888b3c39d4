"""Atomic writes: an output appears whole under its final name or not at all.

A set of outputs (a case's mask, maps, preview and SEG) is one unit: written to temporaries beside the
final names, then, under a lock on each folder, put in place together. Files the new set replaces, and
`remove`d files from an older set, are first moved aside and deleted only once every new file is in
place; if anything fails they are moved back, so a failed run leaves the previous outputs as they were.
The folder lock (flock on the folder itself, so nothing is left behind, even after a kill) makes the
"does the target exist?" check and the renames one step for concurrent dtml runs: with `exclusive`,
a file that another run put there meanwhile is refused, never replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from dtml_deploy.errors import InputError

Removals = Sequence[Path] | Callable[[], Sequence[Path]]


def path_key(path: Path | str) -> str:
    """One spelling per file: absolute, symlinks resolved (what two names must share to be the same file)."""
    return os.path.realpath(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _public(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create owner-only entries; give the final output the usual umask permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def folder_locks(folders: Sequence[Path]) -> Iterator[None]:
    """Hold an exclusive flock on each folder (in sorted order, so two runs cannot deadlock). The kernel
    drops the lock when the process ends, however it ends: no lock file is left behind."""
    with contextlib.ExitStack() as stack:
        for folder in sorted({Path(f).resolve() for f in folders}):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield


def _aside(path: Path, moved: list[tuple[Path, Path]]) -> None:
    """Move an existing file out of the way (same folder, hidden name), remembering where it belongs."""
    if not (path.exists() or path.is_symlink()) or path.is_dir():
        return
    fd, backup = tempfile.mkstemp(prefix=f".{path.name}.old-", dir=path.parent)
    os.close(fd)
    os.replace(path, backup)
    moved.append((Path(backup), path))


def _commit(tmps: Sequence[Path], paths: Sequence[Path], remove: Removals, exclusive: bool) -> None:
    """Put `tmps` in place as `paths` and drop `remove`, all or nothing (see the module docstring)."""
    moved: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    with folder_locks([p.parent for p in paths]):
        remove = [Path(p) for p in (remove() if callable(remove) else remove)]
        if any(path_key(p.parent) not in {path_key(q.parent) for q in paths} for p in remove):
            raise ValueError("atomic_paths removes files only from the folders it writes into")
        if exclusive:
            for path in paths:
                if path.exists():
                    raise InputError(f"{path}: was written by another run while this one worked; not replaced "
                                     "(use --overwrite to replace it)")
        try:
            for path in [*paths, *remove]:
                _aside(path, moved)
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
            for backup, path in reversed(moved):
                os.replace(backup, path)
            raise
    for backup, _ in moved:
        backup.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_paths(paths: Sequence[Path], exclusive: bool = False, remove: Removals = ()) -> Iterator[list[Path]]:
    """Yield temporary file paths beside `paths`; if the block succeeds, put each in place as its path.

    All files appear under their final names or none does, and the files they replace (and `remove`)
    go only once all are in place. `exclusive` refuses (InputError) a target that exists at that moment;
    `remove` may be a function, then asked under the folder lock (what an older run left at that moment).
    Temporary names keep the final suffixes (nibabel picks the format from them).
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
        _commit(tmps, paths, remove, exclusive)
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
