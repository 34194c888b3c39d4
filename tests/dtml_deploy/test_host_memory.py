"""The CPU backend's glibc setting: freed activations are reused instead of re-faulted from the kernel."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from dtml_deploy.backends.base import BackendOptions, create_backend
from tests.conftest import make_bundle

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the setting is glibc-only (a no-op elsewhere)")

# Allocates, fills and frees a 64 MiB tensor (the size of one full-resolution V-Net activation) five
# times a round and counts the minor page faults of a round, before and after the setting.
_SCRIPT = """
import resource, torch
from dtml_deploy.backends.host_memory import keep_freed_host_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        t = torch.empty(16 << 20)
        t.fill_(1.0)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
default = faults()
ok = keep_freed_host_memory()
kept = sorted(faults() for _ in range(7))  # the heap grows during the first rounds, then serves them all
print(ok, default, kept[3])
"""


@glibc
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True).stdout
    ok, default, kept = out.split()
    pages = 5 * (64 << 20) // 4096
    assert ok == "True"
    assert int(default) > 0.9 * pages  # glibc's defaults: every 64 MiB block is mapped afresh
    assert int(kept) < 0.02 * pages  # kept (median round): the same pages serve every allocation


@glibc
def test_cpu_torch_backend_applies_it_unless_told_not_to():
    bundle = make_bundle()
    on = create_backend("torch", bundle, BackendOptions(device="cpu", batch=1))
    off = create_backend("torch", bundle, BackendOptions(device="cpu", batch=1, keep_host_memory=False))
    assert "host memory kept" in on.describe()
    assert "host memory kept" not in off.describe()
