"""`dtml` for torchrun tests, with one rank made to fail on one case: DTML_TEST_FAULT=<rank>:<die|hang>:<case>.

`die` ends the process at once (as an out-of-memory kill would), `hang` blocks forever (as a stuck
device would). Launched as `torchrun tests/cli/torchrun_faults.py segment ...`; not a test module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dtml_deploy.segment import Segmenter, case_name

_rank, _how, _case = os.environ["DTML_TEST_FAULT"].split(":", 2)

if os.environ.get("RANK") == _rank:
    _original = Segmenter.segment_file

    def _faulty(self: Segmenter, path: Path, out: Path, *args: object, **kwargs: object) -> object:
        if case_name(Path(path)) == _case:
            if _how == "die":
                os._exit(7)
            time.sleep(3600)
        return _original(self, path, out, *args, **kwargs)  # type: ignore[arg-type]

    Segmenter.segment_file = _faulty  # type: ignore[method-assign]

if __name__ == "__main__":
    from dtml_deploy.cli import app
    from dtml_deploy.launch import run_rank

    run_rank(lambda: app(prog_name="dtml"))
