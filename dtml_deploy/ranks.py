"""Cases shared among the processes of a torchrun launch (`torchrun ... -m dtml_deploy segment|evaluate`).

Rank 0 splits the cases into shards balanced by voxel count (longest first, each to the least loaded
rank; ties to the lower rank, so the split is deterministic) and posts the plan. Every rank works its
shard on its own device and posts each case's result, as soon as it is done, to torch.distributed's
key-value store (the TCPStore that torchrun's agent hosts): no process group and no collective is
needed, so one slow case never blocks a collective, and rank 0 sees results (and prints them) as they
come. Rank 0 gathers every result; the caller writes the one report.

Failures. A failing case is a result like any other (the caller turns errors into failed cases). A
rank that dies makes torchrun stop the others with SIGTERM: every rank turns it into `JobStopped`, so
the case in progress leaves no partial outputs and rank 0 still writes its report (the unfinished
cases marked failed). A rank that hangs (no window finished for `ShardSettings.stall_timeout_s`) is
named by rank 0, which then ends the job the same way; the other ranks watch rank 0 likewise.
Without torchrun (no WORLD_SIZE), `run_cases` is a plain loop: the command behaves as it always has.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from dtml_deploy.errors import DtmlError
from dtml_deploy.launch import mark_job_stopped

MAX_TIMEOUT_S = 30 * 24 * 3600.0  # a month: longer is a typo, not a plan
Result = dict[str, Any]  # JSON-able: it travels through the store
Beat = Callable[[], None]  # called by long work (each finished window batch) as a sign of life


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch (all zero/one without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def running(self, what: str) -> str:
        """' with WHAT' for one process, ' on N ranks (rank 0: WHAT)' under torchrun: for console lines."""
        return f" on {self.world_size} ranks (rank 0: {what})" if self.distributed else f" with {what}"

    @classmethod
    def from_env(cls) -> Ranks:
        """Read torchrun's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; absent: one process."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            world = int(os.environ["WORLD_SIZE"])
            rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        except ValueError:
            raise DtmlError("WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers "
                            "(launch with torchrun)") from None
        if world < 1 or not 0 <= rank < world or not 0 <= local < local_world:
            raise DtmlError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: not a valid launch "
                            "(launch with torchrun)")
        return cls(rank, world, local, local_world)


@dataclass(frozen=True)
class ShardSettings:
    """How ranks wait for each other."""

    # No finished window from a rank for this long ends the job: the largest case WorkLimits allows
    # (4096 windows) is far below this on any device, and a window batch is a sign of life.
    stall_timeout_s: float = 1800.0
    poll_s: float = 0.5  # how often rank 0 looks for results and every rank sends a sign of life

    def __post_init__(self) -> None:
        # the store's waits take a timedelta: NaN or infinity would fail there, mid-launch
        if not (math.isfinite(self.stall_timeout_s) and 1.0 <= self.stall_timeout_s <= MAX_TIMEOUT_S):
            raise ValueError(f"--rank-timeout must be between 1 and {MAX_TIMEOUT_S:.0f} seconds, got "
                             f"{self.stall_timeout_s}")
        if not (math.isfinite(self.poll_s) and 0.0 < self.poll_s <= self.stall_timeout_s):
            raise ValueError(f"poll_s must be positive and at most the stall timeout, got {self.poll_s}")


class JobStopped(BaseException):
    """SIGTERM (torchrun stopping the job): not an Exception, so no per-case handler swallows it."""


class RankLost(DtmlError):
    """Another rank stopped answering."""


def _lost(message: str) -> RankLost:
    """RankLost, and this rank's exit marked as the end of the job: under dtml-torchrun it must exit
    non-zero so that torchrun stops the rank that hangs (dtml_deploy/launch.py)."""
    mark_job_stopped()
    return RankLost(message)


def balanced_shards(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of `sizes` per rank: largest first, each to the least loaded rank (lowest on ties);
    each shard in input order. Deterministic: the same sizes give the same split everywhere."""
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        shards[r].append(i)
        loads[r] += max(1, int(sizes[i]))
    return [sorted(s) for s in shards]


def rank_device(device: str, ranks: Ranks) -> str:
    """The device of this rank: `cuda:LOCAL_RANK` when the run is on CUDA and distributed; else `device`."""
    if not ranks.distributed or not device.startswith(("cuda", "auto")):
        return device
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if ":" in device and ranks.local_world_size > 1:
        raise DtmlError(f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda")
    if ":" in device:
        return device
    n = torch.cuda.device_count()
    if ranks.local_rank >= n:
        raise DtmlError(f"LOCAL_RANK {ranks.local_rank} but torch sees {n} CUDA device(s) on this node; "
                        f"start at most {n} processes per node (--nproc-per-node)")
    return f"cuda:{ranks.local_rank}"


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """While inside, SIGTERM raises `JobStopped` (atomic writes then clean up after themselves)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise JobStopped(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class Outcome:
    """What rank 0 gathered: one result per case (None where the job stopped first) and why it stopped."""

    results: list[Result | None]
    stopped: str | None = None
    ranks: int = 1


class _Board:
    """The store keys of one job: the plan, results, counts of posted results, signs of life."""

    def __init__(self, ranks: Ranks, settings: ShardSettings, job: str) -> None:
        import torch.distributed as dist

        self.ranks, self.settings = ranks, settings
        timeout = timedelta(seconds=settings.stall_timeout_s)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))  # torchrun's store (or rank 0's)
        self.store = dist.PrefixStore(f"dtml/{job}/", store)
        self._last_beat = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= self.settings.poll_s:
            self._last_beat = now
            self.store.add(f"beat/{self.ranks.rank}", 1)

    def post_plan(self, shards: list[list[int]], digest: str) -> None:
        self.store.set("plan", json.dumps({"shards": shards, "digest": digest}))

    def read_plan(self, digest: str) -> list[list[int]]:
        import torch.distributed as dist

        try:
            self.store.wait(["plan"], timedelta(seconds=self.settings.stall_timeout_s))
        except (RuntimeError, dist.DistStoreError) as e:  # rank 0 never got as far as the plan
            raise _lost(f"rank {self.ranks.rank}: no plan from rank 0 ({str(e).splitlines()[0]})") from None
        plan = json.loads(self.store.get("plan"))
        if plan["digest"] != digest:
            raise DtmlError(f"rank {self.ranks.rank} sees other inputs than rank 0 (is the input folder the same "
                            "on every node?)")
        return plan["shards"]

    def post(self, index: int, result: Result) -> None:
        self.store.set(f"result/{index}", json.dumps(result))
        self.store.add(f"count/{self.ranks.rank}", 1)

    def count(self, rank: int) -> int:
        return int(self.store.add(f"count/{rank}", 0))

    def beats(self, rank: int) -> int:
        return int(self.store.add(f"beat/{rank}", 0))

    def wait_left(self, others: Sequence[int]) -> None:
        """Give the other ranks a moment to see that rank 0 has everything: exiting first (say with code 1
        for a failed case) would make torchrun stop them with SIGTERM."""
        with suppress(Exception):  # a rank that is already gone does not hold up the report
            self.store.wait([f"left/{r}" for r in others], timedelta(seconds=max(5.0, 10 * self.settings.poll_s)))

    def fetch(self, index: int) -> Result:
        return json.loads(self.store.get(f"result/{index}"))


class _Watch:
    """Signs of life of other ranks, as seen by this one: a rank whose count of finished cases and
    window batches has not moved for `stall_timeout_s` is lost."""

    def __init__(self, board: _Board, ranks: Sequence[int]) -> None:
        self.board = board
        now = time.monotonic()
        self.seen = {r: (-1, -1, now) for r in ranks}

    def check(self, rank: int, doing: str) -> None:
        count, beats = self.board.count(rank), self.board.beats(rank)
        last = self.seen[rank]
        now = time.monotonic()
        if (count, beats) != last[:2]:
            self.seen[rank] = (count, beats, now)
        elif now - last[2] > self.board.settings.stall_timeout_s:
            raise _lost(f"rank {rank} showed no progress for {now - last[2]:.0f} s ({doing}); stopping the "
                           "job (--rank-timeout sets how long a rank may be silent)")


def run_cases(names: Sequence[str], weight: Callable[[int], int], work: Callable[[int, Beat], Result],
              on_result: Callable[[int, Result], None], ranks: Ranks, settings: ShardSettings = ShardSettings(),
              job: str = "cases") -> Outcome | None:
    """Run `work(i, beat)` for every case i (results JSON-able) across the ranks; rank 0 calls
    `on_result(i, result)` for every case as it arrives and returns the `Outcome`; other ranks return
    None once rank 0 has everything. Without torchrun: a plain loop in order. `names` (one per case, the
    same on every rank) check that all ranks see the same inputs and name a lost rank's case; `weight(i)`
    (the case's voxels) is asked on rank 0 only, to split the cases."""
    n = len(names)
    if not ranks.distributed:
        results: list[Result | None] = []
        for i in range(n):
            results.append(work(i, _no_beat))
            on_result(i, results[-1])  # type: ignore[arg-type]
        return Outcome(results)
    board = _Board(ranks, settings, job)
    digest = hashlib.sha256(json.dumps([n, list(names)]).encode()).hexdigest()
    with sigterm_stops():
        if ranks.is_main:
            shards = balanced_shards([weight(i) for i in range(n)], ranks.world_size)
            board.post_plan(shards, digest)
            return _main(board, shards, work, on_result, list(names))
        board.beat()  # alive, before waiting for the plan
        shards = board.read_plan(digest)
        for i in shards[ranks.rank]:
            board.post(i, work(i, board.beat))
        watch = _Watch(board, [0])
        while not board.store.check(["collected"]):  # rank 0 may still be working its own shard
            watch.check(0, "rank 0 did not gather the results")
            board.beat()
            time.sleep(settings.poll_s)
        board.store.set(f"left/{ranks.rank}", "1")
        return None


def _no_beat() -> None:
    return None


def _main(board: _Board, shards: list[list[int]], work: Callable[[int, Beat], Result],
          on_result: Callable[[int, Result], None], names: list[str]) -> Outcome:
    """Rank 0: work its shard while gathering the others' results; then wait for the rest."""
    results: list[Result | None] = [None] * len(names)
    others = list(range(1, len(shards)))
    gathered = {r: 0 for r in others}
    watch = _Watch(board, others)
    last_poll = [0.0]

    def gather(force: bool = False, check: bool = True) -> None:
        now = time.monotonic()
        if not force and now - last_poll[0] < board.settings.poll_s:
            return
        last_poll[0] = now
        for r in others:
            for i in shards[r][gathered[r]:board.count(r)]:
                results[i] = board.fetch(i)
                on_result(i, results[i])  # type: ignore[arg-type]
                gathered[r] += 1
            if check and gathered[r] < len(shards[r]):
                watch.check(r, f"on {names[shards[r][gathered[r]]]}")

    def beat() -> None:
        board.beat()
        gather()

    stopped = None
    try:
        for i in shards[0]:
            results[i] = work(i, beat)
            on_result(i, results[i])  # type: ignore[arg-type]
            gather(force=True)
        while any(gathered[r] < len(shards[r]) for r in others):
            time.sleep(board.settings.poll_s)
            board.beat()
            gather(force=True)
        board.store.set("collected", "1")
        board.wait_left(others)
    except RankLost as e:
        stopped = str(e)
    except JobStopped as e:
        stopped = f"the job was stopped ({e}: another rank ended; see torchrun's report)"
    if stopped is not None:
        with suppress(Exception):  # what the others finished before the end still counts (and stays written)
            gather(force=True, check=False)
    return Outcome(results, stopped, len(shards))
