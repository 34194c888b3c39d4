"""A bounded queue of jobs and the worker threads that run them.

`--workers` threads each run one job at a time (their windows meet in the device thread, batching.py);
at most `--queue` jobs wait beyond them, and a full queue is refused (`QueueFull`, the service answers
503 with Retry-After) instead of growing. `drain` is the SIGTERM path: no new jobs, queued ones failed with
the reason, running ones given `drain_s` to finish and failed with the reason after that.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable

from dtml_deploy.errors import DtmlError
from dtml_deploy.serve.store import Job, JobStore

STOPPING = "the server is shutting down (SIGTERM) and is not taking jobs"


class QueueFull(DtmlError):
    """No room for another job; `retry_after` is the suggested wait in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobQueue:
    """Runs `work(job)` for each submitted job on `workers` threads; `work` fills in the job's outcome."""

    def __init__(self, store: JobStore, work: Callable[[Job], None], workers: int, capacity: int,
                 on_finish: Callable[[Job], None] = lambda job: None) -> None:
        self.store, self.work, self.on_finish = store, work, on_finish
        self.capacity = capacity
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._running: dict[str, Job] = {}
        self._closed = False  # no new jobs
        self._abandoned = False  # drain timed out: results arriving now are not written
        self._durations: list[float] = []
        self._threads = [threading.Thread(target=self._loop, name=f"dtml-job-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def accepting(self) -> bool:
        return not self._closed

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the mean recent job time times the jobs ahead per worker."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        ahead = (self.depth + self.running) / max(len(self._threads), 1)
        return int(min(max(math.ceil(mean * ahead), 1), 600))

    def submit(self, job: Job) -> None:
        """Queue a saved job, or raise QueueFull (the job is then deleted: it never existed for the client)."""
        with self._lock:
            if self._closed:
                self.store.delete(job.id)
                raise QueueFull(STOPPING, 30)
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.store.delete(job.id)
                raise QueueFull(f"the queue is full ({self.capacity} jobs waiting); retry later",
                                self.retry_after()) from None

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if self._closed:  # taken off the queue just as the drain began
                    self._fail(job, "the server shut down (SIGTERM) before the job started; submit it again")
                    continue
                job.status, job.started = "running", time.time()
                self._running[job.id] = job
                self.store.save(job)
            try:
                self.work(job)
            except Exception as e:  # work() reports its own failures; this is a bug, kept to one line
                job.status, job.error = "failed", f"internal error: {type(e).__name__}: {str(e)[:200]}"
            job.finished = time.time()
            with self._lock:
                self._running.pop(job.id, None)
                if self._abandoned:
                    continue
                self.store.save(job)
                self._durations = [*self._durations[-49:], job.finished - job.started]  # type: ignore[operator]
            self.on_finish(job)

    def drain(self, timeout_s: float) -> None:
        """Stop taking jobs; fail those still queued; wait up to `timeout_s` for the running ones, then fail
        them with the reason. Returns once every job has a final state on disk."""
        with self._lock:
            if self._closed:  # drained already (SIGTERM, then the server's own stop)
                return
            self._closed = True
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._fail(job, "the server shut down (SIGTERM) before the job started; submit it again")
        deadline = time.monotonic() + timeout_s
        while self._running and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            self._abandoned = True
            for job in list(self._running.values()):
                self._fail(job, f"the server shut down (SIGTERM) and the job did not finish within "
                                f"{timeout_s:g} s; submit it again")
            self._running.clear()
        for _ in self._threads:
            self._queue.put(None)

    def join(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` in all for the worker threads to end (after `drain`)."""
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.0))

    def _fail(self, job: Job, reason: str) -> None:
        job.status, job.error, job.finished = "failed", reason, time.time()
        self.store.save(job)
        self.on_finish(job)
