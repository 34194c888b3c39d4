"""Files that belong to a case's outputs but are not volumes (a preview PNG), written in the same unit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from dtml_deploy.io.atomic import atomic_paths


@contextlib.contextmanager
def companion_files(files: Mapping[Path, bytes], undo: Sequence[Path] = ()) -> Iterator[None]:
    """Stage `files` beside their final names, run the block (which writes the case's volumes), then
    put them in place. If the block fails nothing of `files` appears; if putting them in place fails,
    the block's outputs (`undo`) are removed as well, so a case's files appear together or not at all."""
    if not files:
        yield
        return
    block_done = False
    try:
        with atomic_paths(list(files)) as tmps:
            for tmp, data in zip(tmps, files.values(), strict=True):
                tmp.write_bytes(data)
            yield
            block_done = True
    except BaseException:
        if block_done:
            for path in undo:
                Path(path).unlink(missing_ok=True)
        raise
