"""Windows of concurrent jobs share the device's batches.

Each running job drives its own sliding-window engine in its own thread; their engines call
`SharedBackend.predict`, which hands the windows to one device thread (`WindowBatcher`) that owns the
real backend. That thread takes whatever windows are waiting, from any job, up to the backend's batch,
runs them as one forward (padded to the backend's fixed batch, so compiled backends and CUDA graphs see
one shape) and hands each job its own rows back. A small scan with one window no longer runs a forward of
one window: eight of them run as one batch of eight.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field, replace

import torch

from dtml_deploy.backends.base import Backend


@dataclass
class _Request:
    windows: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    out: torch.Tensor | None = None
    error: BaseException | None = None


@dataclass
class BatchStats:
    """What the device thread has run (read by /metrics)."""

    windows: int = 0  # windows asked for by jobs (padding excluded)
    forwards: int = 0  # backend.predict calls
    device_seconds: float = 0.0
    last_windows_per_second: float = 0.0


class WindowBatcher:
    """One thread owns `backend`; `predict` may be called from any thread and blocks for its rows."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.stats = BatchStats()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dtml-device", daemon=True)
        self._thread.start()

    def predict(self, windows: torch.Tensor) -> torch.Tensor:
        req = _Request(windows)
        with self._lock:  # nothing is queued behind the stop marker (see close)
            if self._closed or not self._thread.is_alive():
                raise RuntimeError("the device thread has stopped (the server is shutting down)")
            self._queue.put(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.out  # type: ignore[return-value]

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the device thread once the windows already queued have run; later calls of `predict` raise,
        so a job still running ends at its next batch instead of running on into the interpreter's exit."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, n = [first], first.windows.shape[0]
            while n < self.backend.options.batch:  # whatever other jobs have waiting, up to one batch
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this group
                    break
                group.append(nxt)
                n += nxt.windows.shape[0]
            self._run(group)

    def _run(self, group: list[_Request]) -> None:
        try:
            t = time.perf_counter()
            out = self._forward(torch.cat([r.windows for r in group]))
            seconds = time.perf_counter() - t
            rows = 0
            for r in group:
                k = r.windows.shape[0]
                r.out = out[rows:rows + k]
                rows += k
            s = self.stats
            s.windows += rows
            s.device_seconds += seconds
            s.last_windows_per_second = rows / max(seconds, 1e-9)
        except BaseException as e:  # every job of the group learns why (out of memory, a backend error)
            for r in group:
                r.error = e
        finally:
            for r in group:
                r.done.set()

    def _forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Run `windows` in fixed-size batches; the result is a new tensor (a backend may reuse its output
        buffer on the next call, and the jobs read their rows after it)."""
        batch, outs = self.backend.options.batch, []
        for b0 in range(0, windows.shape[0], batch):
            chunk = windows[b0:b0 + batch]
            k = chunk.shape[0]
            if k < batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(batch - k, *chunk.shape[1:])])
            outs.append(self.backend.predict(chunk)[:k].clone())
            self.stats.forwards += 1
        out = torch.cat(outs)
        if out.device.type == "cuda":  # so device seconds and windows per second are true
            torch.cuda.synchronize(out.device)
        return out


class SharedBackend(Backend):
    """What each job's engine sees: the real backend's outputs and options, its windows run by the batcher."""

    def __init__(self, batcher: WindowBatcher) -> None:  # no Backend.__init__: nothing of its own to load
        inner = batcher.backend
        self.batcher = batcher
        self.name = inner.name  # type: ignore[misc]
        self.bundle, self.outputs, self.device = inner.bundle, inner.outputs, inner.device
        self.options = replace(inner.options)

    @property
    def input_dtype(self) -> torch.dtype:
        return self.batcher.backend.input_dtype

    def predict(self, windows: torch.Tensor) -> torch.Tensor:
        return self.batcher.predict(windows)

    def describe(self) -> str:
        return f"{self.batcher.backend.describe()}; windows of concurrent jobs share batches"
