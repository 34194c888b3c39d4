"""A signal after OpenVINO has compiled and released a model still reaches its Python handler.

OpenVINO's CPU plugin left the thread's alternate signal stack pointing at unmapped memory, and the next
SIGTERM killed the process with SIGSEGV (dtml_deploy/backends/signal_stack.py). Run in a fresh process so the
outcome does not depend on what earlier tests loaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed")
pytest.importorskip("onnx", reason="the onnx extra is not installed")

REPO = Path(__file__).resolve().parents[2]

_RUN = """
import faulthandler, gc, signal, sys
from pathlib import Path
import torch
faulthandler.enable()  # gives the main thread an alternate signal stack, as pytest and many services do
from dtml_deploy.backends.base import BackendOptions
from dtml_deploy.backends.openvino_backend import OpenVinoBackend
from dtml_deploy.backends.signal_stack import current_signal_stack
from dtml_deploy.bundle import Bundle
from dtml_export.onnx_export import export_onnx
from dtml_export.openvino_export import convert_onnx, save_ir
from tests.conftest import SAMPLE, centred_bundle_dir

folder = Path(sys.argv[1])
bundle = Bundle.load(centred_bundle_dir(SAMPLE, folder))
xml = save_ir(convert_onnx(export_onnx(bundle, folder / "m.onnx")), bundle, folder / "m.xml", "fp32", 17)
before = current_signal_stack().ss_sp
backend = OpenVinoBackend(bundle, BackendOptions(device="cpu", batch=2, artifact=xml), ("p_seg",))
for batch in (2, 1):  # a full batch and a short last one: two compiled models, released in creation order
    backend.predict(torch.zeros(batch, 1, 32, 32, 32))
del backend
gc.collect()
after = current_signal_stack().ss_sp
heard = []
signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))
signal.raise_signal(signal.SIGTERM)
print(before == after, heard == [signal.SIGTERM])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="sigaltstack is checked on Linux")
def test_sigterm_after_openvino_reaches_the_python_handler(tmp_path):
    run = subprocess.run([sys.executable, "-c", _RUN, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-1500:]}"
    assert run.stdout.split()[-2:] == ["True", "True"], run.stdout
