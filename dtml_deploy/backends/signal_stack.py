"""Keep a thread's alternate signal stack valid across OpenVINO's CPU plugin.

OpenVINO's CPU plugin (2026.4) points the calling thread's alternate signal stack (`sigaltstack`) at a buffer of
its own when it compiles a model and puts back the stack it found when that model is released. Two compiled
models released in the order they were made (the engine's full batch and its short last batch) leave the
thread on the first model's buffer, which is freed with it. CPython installs its signal handlers with
SA_ONSTACK, so the next SIGTERM or SIGINT the thread received made the kernel fail to push the handler's frame
and the process died of SIGSEGV instead of running the handler (a training run stopped with SIGTERM after an
OpenVINO model had run in the same process; Ctrl-C after `dtml export --openvino`).
Every compile and release of an OpenVINO model in dtml runs inside `kept_signal_stack()`, which gives the
thread back its own alternate stack afterwards (tests/dtml_deploy/test_signal_stack.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
from collections.abc import Iterator


class SignalStack(ctypes.Structure):
    """`stack_t` of <signal.h> (Linux)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@functools.cache
def _sigaltstack() -> object | None:
    """libc's `sigaltstack`, or None where it is not reachable (not Linux)."""
    if platform.system() != "Linux":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sigaltstack
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.POINTER(SignalStack), ctypes.POINTER(SignalStack)]
    fn.restype = ctypes.c_int
    return fn


def current_signal_stack() -> SignalStack | None:
    """The calling thread's alternate signal stack (None where it cannot be read)."""
    fn = _sigaltstack()
    if fn is None:
        return None
    old = SignalStack()
    return old if fn(None, ctypes.byref(old)) == 0 else None  # type: ignore[operator]


@contextlib.contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Run the block, then give the calling thread back the alternate signal stack it had before."""
    before = current_signal_stack()
    try:
        yield
    finally:
        fn = _sigaltstack()
        if before is not None and fn is not None:
            before.ss_flags &= ~1  # SS_ONSTACK is a state that can be read, not set
            fn(ctypes.byref(before), None)  # type: ignore[operator]
