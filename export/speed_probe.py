"""Time the CPU-runnable models of an export folder beside torch, on this machine: the folder's `speed.json`.

Each row runs one forward of `batch` windows (dtml's CPU batch) through its real backend, both networks as
`dtml segment` runs them, after one untimed warm-up forward (compilation, allocation); a row's time is its
fastest of `rounds` forwards, since on a shared machine the slower ones measure the neighbours. Rows run one
after another and each runtime is released before the next is made: all four held at once (interleaved
rounds) peaked at 5.7 GB for the shipped pair at batch 4. The windows' values do not change the time of these
dense convolutions, so real windows are used when the export has them and seeded noise otherwise.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dtml_deploy.backends.base import BackendOptions, create_backend, default_batch
from dtml_deploy.backends.torch_backend import cpu_has_native_bf16
from dtml_deploy.bundle import Bundle
from dtml_deploy.speed_record import SpeedRecord, Timing, host_id, weights_digest
from dtml_export.formats import FORMATS, format_for_path, missing_packages

CPU_PRECISIONS = {"onnx": ("fp32",), "openvino": ("fp32", "int8")}  # what the CPU runs of each format
ROUNDS = 3


def probe_rows(folder: Path) -> list[tuple[str, str, Path | None]]:
    """(backend, precision, file) for torch and every CPU-runnable model in `folder` whose runtime is here."""
    rows: list[tuple[str, str, Path | None]] = [("torch", "fp32", None)]
    if cpu_has_native_bf16():  # emulated bf16 runs ~90x slower than fp32: never worth timing
        rows.append(("torch", "bf16", None))
    for name, precisions in CPU_PRECISIONS.items():
        for p in precisions:
            path = Path(folder) / FORMATS[name].filename(p)
            if path.is_file() and not missing_packages(FORMATS[name], run=True):
                rows.append((FORMATS[name].backend, p, path))
    return rows


def probe_windows(bundle: Bundle, batch: int, real: Sequence[np.ndarray] = ()) -> torch.Tensor:
    """`batch` windows [batch, 1, *patch]: the first real ones given, then seeded noise."""
    patch = bundle.model.patch_size
    rng = np.random.default_rng(0)
    ws = [np.asarray(w, np.float32).reshape(1, *patch) for w in list(real)[:batch]]
    ws += [rng.standard_normal((1, *patch), dtype=np.float32) for _ in range(batch - len(ws))]
    return torch.from_numpy(np.stack(ws))


def measure_folder(bundle: Bundle, folder: Path, real: Sequence[np.ndarray] = (), rounds: int = ROUNDS,
                   batch: int | None = None) -> SpeedRecord:
    """Milliseconds per window of every row of `probe_rows(folder)` on this machine's CPU."""
    batch = batch or default_batch(torch.device("cpu"))
    x = probe_windows(bundle, batch, real)
    rows = []
    for backend, precision, path in probe_rows(folder):
        options = BackendOptions(device="cpu", precision=precision if backend == "torch" else "fp32",
                                 batch=batch, artifact=path).resolved(backend)
        runner = create_backend(backend, bundle, options)
        runner.predict(x)  # warm-up: compilation and first allocation are not the steady state
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            runner.predict(x)
            best = min(best, time.perf_counter() - t)
        del runner  # one runtime's buffers at a time (all four together peaked at 5.7 GB for the shipped pair)
        rows.append(Timing(backend, precision, path.name if path else "", round(1000 * best / batch, 1),
                           weights_digest(path) if path else ""))
    return SpeedRecord(host=host_id(), batch=batch, rows=tuple(rows), runtimes=_versions(rows))


def _versions(rows: Sequence[Timing]) -> dict[str, str]:
    out = {"torch": torch.__version__}
    for r in rows:
        if r.artifact:
            for pkg in format_for_path(Path(r.artifact)).run_packages:
                try:
                    out[pkg] = importlib.metadata.version(pkg)
                except importlib.metadata.PackageNotFoundError:
                    continue
    return out
