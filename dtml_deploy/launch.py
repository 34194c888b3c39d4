"""`dtml-torchrun` (= `python -m dtml_deploy.launch`): torchrun for dtml, ending with dtml's lines and exit code.

torchrun reads any non-zero exit of a rank as a crash: `dtml segment` exiting 1 (some cases failed) or 2 (all
failed, or the run was refused) ends in torchrun's 30-line ChildFailedError report with a traceback, and
torchrun itself exits 1 whatever the code was. torchrun has no way to pass a rank's code on, so this
launcher runs torchrun's own agent (torch.distributed.run, same arguments) with one addition: every rank
writes its exit code into a folder the launcher made (DTML_EXIT_DIR) and exits 0, so the agent sees a clean
job; the launcher then exits with rank 0's code. A rank that really dies (killed, out of memory, a crash
before it could write its code) is still a failure for the agent: the launcher names it in one line and
exits with rank 0's recorded code, or 1 when rank 0 has none.

    dtml-torchrun --nproc-per-node 8 segment archive/ -o masks/        # = torchrun ... -m dtml_deploy segment ...

Several nodes: each node's launcher exits with the codes of its own ranks, so the node running rank 0
carries dtml's code (the others exit 0 unless a rank of theirs died).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

EXIT_DIR_ENV = "DTML_EXIT_DIR"
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun's agent in every rank it starts
LAUNCHER = "dtml-torchrun"


def _code(exit_code: Any) -> int:
    """SystemExit's code as a process exit status (None: 0; a message: 1, as Python does)."""
    return exit_code if isinstance(exit_code, int) else 0 if exit_code is None else 1


def run_rank(main: Callable[[], object]) -> NoReturn:
    """Run dtml's command line as one rank. Under this launcher the exit code goes to DTML_EXIT_DIR and the
    process exits 0; under plain torchrun rank 0 adds one line on how to keep dtml's code; otherwise (no
    torchrun) nothing changes."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = _code(e.code)
    folder, rank = _exit_dir(), os.environ.get("RANK")
    if folder is not None and rank is not None:
        tmp = folder / f".rank-{rank}"
        tmp.write_text(str(code))
        tmp.replace(folder / f"rank-{rank}")
        # a rank that gave up on another (which may hang) ends the job the way torchrun knows: non-zero
        sys.exit(code if code and (folder / f"stopped-{rank}").exists() else 0)
    if code and rank == "0" and TORCHRUN_ENV in os.environ:
        print(f"note: torchrun reports dtml's exit code {code} as a crash (its report follows) and exits 1; "
              f"`{LAUNCHER}` takes the same arguments and ends with dtml's code", file=sys.stderr, flush=True)
    sys.exit(code)


def _exit_dir() -> Path | None:
    d = os.environ.get(EXIT_DIR_ENV)
    return Path(d) if d and Path(d).is_dir() else None


def mark_job_stopped() -> None:
    """Note that this rank ends the job early (another rank was lost): its exit will be non-zero."""
    folder, rank = _exit_dir(), os.environ.get("RANK")
    if folder is not None and rank is not None:
        (folder / f"stopped-{rank}").touch()


def recorded_codes(exit_dir: Path) -> dict[int, int]:
    """{rank: exit code} of the ranks on this node that finished through `run_rank`."""
    codes = {}
    for p in exit_dir.glob("rank-*"):
        try:
            codes[int(p.name.split("-", 1)[1])] = int(p.read_text())
        except ValueError:
            continue  # not ours
    return codes


def exit_status(codes: Mapping[int, int], failed: Mapping[int, str]) -> int:
    """The launcher's exit code: rank 0's when it recorded one (at least 1 when a rank died), else the
    worst code of this node's ranks; 1 for a death with no code to tell."""
    code = codes[0] if 0 in codes else max(codes.values(), default=0)
    return max(code, 1) if failed else code


def failure_lines(failures: Mapping[int, Any], codes: Mapping[int, int]) -> dict[int, str]:
    """One `error:` line per rank the agent saw fail without a recorded code ({rank: line})."""
    lines = {}
    for rank, f in sorted(failures.items()):
        if rank in codes:
            continue
        how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"
        lines[rank] = (f"error: rank {rank} {how} on {socket.gethostname()} before it finished (pid {f.pid}); "
                       "its own output is above")
    return lines


def _dtml_args(argv: list[str]) -> Any:
    """torchrun's parsed arguments, running dtml: `segment ...` means `-m dtml_deploy segment ...`; an
    explicit `-m dtml_deploy` or a Python script (a test's wrapper of dtml) is kept."""
    from torch.distributed.run import parse_args

    args = parse_args(argv)
    if not args.module and not args.no_python and not args.training_script.endswith(".py"):
        args.training_script_args = [args.training_script, *args.training_script_args]
        args.training_script, args.module = "dtml_deploy", True
    return args


def _quiet_process_chatter() -> None:
    """The agent's log lines about its worker processes ('Sending process 123 closing signal SIGTERM',
    'failed (exitcode: 7) local_rank: 1', with torch's source paths) say what `failure_lines` says in
    dtml's words; only this launcher's process is affected."""
    import logging

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic.multiprocessing"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> NoReturn:
    """Launch dtml under torchrun's agent and exit with dtml's code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    args = _dtml_args(sys.argv[1:] if argv is None else argv)
    _quiet_process_chatter()
    failures: Mapping[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dtml-exit-") as d:
        os.environ[EXIT_DIR_ENV] = d  # the agent passes its environment on to every rank
        try:
            run(args)
        except ChildFailedError as e:
            failures = e.failures
        except Exception as e:  # the agent itself failed (rendezvous, bad arguments): one line, no traceback
            first = str(e).splitlines()[0] if str(e) else ""
            print(f"error: torchrun could not run the job: {type(e).__name__}{': ' + first if first else ''}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        codes = recorded_codes(Path(d))
    lines = failure_lines(failures, codes)
    for line in lines.values():
        print(line, file=sys.stderr, flush=True)
    sys.exit(exit_status(codes, lines))


if __name__ == "__main__":
    main()
