"""`dtml` for the concurrent-run tests, with a rendezvous placed by DTML_TEST_MEET=<where>:<folder>.

`infer`: each process, about to segment, drops a file in <folder> and waits until two are there, so both
runs have passed their "does the output exist?" check before either writes. `commit`: the process drops
its file once its outputs are written to temporaries, just before they are put in place, and sleeps (the
test then stops it with SIGTERM). Launched as `python tests/cli/concurrent_runs.py segment ...`; not a
test module.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dtml_deploy.io import volume
from dtml_deploy.segment import Segmenter

_where, _folder = os.environ["DTML_TEST_MEET"].split(":", 1)
_meet = Path(_folder)


def _arrive_and_wait(n: int) -> None:
    (_meet / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(_meet.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.05)


if _where == "infer":
    _segment_array = Segmenter.segment_array

    def _meeting(self: Segmenter, *args: Any, **kwargs: Any) -> Any:
        _arrive_and_wait(2)
        return _segment_array(self, *args, **kwargs)

    Segmenter.segment_array = _meeting  # type: ignore[method-assign]
elif _where == "commit":
    _atomic_paths = volume.atomic_paths

    @contextlib.contextmanager
    def _stalled(*args: Any, **kwargs: Any) -> Iterator[list[Path]]:
        with _atomic_paths(*args, **kwargs) as tmps:
            yield tmps
            _arrive_and_wait(1)
            time.sleep(120)

    volume.atomic_paths = _stalled  # type: ignore[assignment]

if __name__ == "__main__":
    from dtml_deploy.cli import app

    app(prog_name="dtml")
