"""PyTorch backend: CPU or CUDA, fp32/fp16/bf16, BN folded, channels_last_3d, optional compile
and CUDA graphs."""

from __future__ import annotations

import torch
from torch import nn

from dtml_deploy.backends.base import Backend, BackendOptions
from dtml_deploy.backends.host_memory import keep_freed_host_memory
from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import BackendUnavailable
from dtml_deploy.nets.dual import DualTaskNet, sdm_to_mask
from dtml_deploy.nets.fold import fold_batchnorm, fuse_conv_relu

_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX, from /proc/cpuinfo on Linux),
    so `--precision bf16` pays (about 2x fp32 on a Zen 4, benchmarks/results/dtml_benchmark_cpu.json)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_precision_note(backend_name: str, device: torch.device, precision: str, chosen: bool) -> str | None:
    """A console line about bf16 on this CPU: a tip where it computes bf16 natively and fp32 was the
    default, a warning where bf16 was chosen but is emulated (one window took 330 s in bf16 against 3.6 s
    in fp32 on a 2-core EPYC without AVX512-BF16, one thread each)."""
    if backend_name != "torch" or device.type != "cpu":
        return None
    native = cpu_has_native_bf16()
    if native and not chosen:
        return ("  tip: this CPU computes bf16 natively; --precision bf16 is about 2x faster (masks agreed with fp32 "
                "at Dice 0.9994 on the shipped model); fp32 stays the faithful default")
    if precision == "bf16" and not native:
        return ("  warning: this CPU has no native bf16 (AVX512-BF16 or AMX): --precision bf16 is emulated and "
                "about 90x slower than fp32 here; use --precision fp32")
    return None


class InferencePair(nn.Module):
    """Runs only the networks the requested channels need; sigmoid/tanh in fp32 on the head output."""

    def __init__(self, net: DualTaskNet, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.outputs = outputs
        self.k = net.k
        self.seg = net.seg if "p_seg" in outputs else None
        self.dis = net.dis if ("p_dis" in outputs or "sdm" in outputs) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps: dict[str, torch.Tensor] = {}
        if self.seg is not None:
            maps["p_seg"] = torch.sigmoid(self.seg(x).float())
        if self.dis is not None:
            sdm = torch.tanh(self.dis(x).float())
            maps["sdm"] = sdm
            maps["p_dis"] = sdm_to_mask(sdm, self.k)
        return torch.cat([maps[o] for o in self.outputs], dim=1)


class TorchBackend(Backend):
    name = "torch"

    @staticmethod
    def is_available() -> bool:
        return True

    def __init__(self, bundle: Bundle, options: BackendOptions, outputs: tuple[str, ...]) -> None:
        super().__init__(bundle, options, outputs)
        options = self.options  # resolved (device-dependent defaults made concrete)
        if self.device.type == "cpu" and options.precision == "fp16":
            raise BackendUnavailable("fp16 is not supported on the CPU; use --precision fp32 or bf16")
        if options.cuda_graphs and self.device.type != "cuda":
            raise BackendUnavailable("CUDA graphs need --device cuda")
        # Process-wide: stops every CPU forward from re-faulting ~1 GB of fresh pages (host_memory.py).
        self._host_memory_kept = (self.device.type == "cpu" and options.keep_host_memory
                                  and keep_freed_host_memory())
        if self.device.type == "cuda" and not torch.backends.cudnn.deterministic:
            # cuDNN's default heuristics pick slow kernels for these 3D convolutions; autotuning once per
            # shape pays back within one volume. PyTorch offers this switch only process-wide, so a
            # process that asked for determinism (`dtml train --deterministic` validating) keeps it.
            torch.backends.cudnn.benchmark = True
        net = bundle.build()
        if options.fold_bn:
            net = fold_batchnorm(net)
        if options.cudnn_fusion:
            if self.device.type != "cuda":
                raise BackendUnavailable("cuDNN conv+ReLU fusion needs --device cuda")
            net = fuse_conv_relu(net)
        self._dtype = _DTYPE[options.precision]
        self._memory_format = torch.channels_last_3d if options.channels_last else torch.contiguous_format
        model = InferencePair(net, self.outputs).to(self.device, self._dtype).eval()
        model = model.to(memory_format=self._memory_format)
        if options.compile:
            model = torch.compile(model, dynamic=False)
        self._model = model
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: torch.Tensor | None = None
        self._static_out: torch.Tensor | None = None

    @property
    def input_dtype(self) -> torch.dtype:
        return self._dtype

    def _prepare(self, windows: torch.Tensor) -> torch.Tensor:
        return windows.to(self.device, self._dtype).contiguous(memory_format=self._memory_format)

    @torch.inference_mode()
    def predict(self, windows: torch.Tensor) -> torch.Tensor:
        x = self._prepare(windows)
        if not self.options.cuda_graphs:
            return self._model(x)
        if self._graph is None or self._static_in is None or self._static_in.shape != x.shape:
            self._capture(x)
        assert self._static_in is not None and self._static_out is not None and self._graph is not None
        self._static_in.copy_(x)
        self._graph.replay()
        return self._static_out

    def _capture(self, x: torch.Tensor) -> None:
        self._static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._model(self._static_in)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_out = self._model(self._static_in)

    def describe(self) -> str:
        extras = [s for s, on in (("channels_last_3d", self.options.channels_last),
                                  ("BN folded", self.options.fold_bn), ("compiled", self.options.compile),
                                  ("cuDNN conv+ReLU", self.options.cudnn_fusion),
                                  ("CUDA graphs", self.options.cuda_graphs),
                                  ("host memory kept", self._host_memory_kept)) if on]
        return f"torch on {self.device} ({self.options.precision}, batch {self.options.batch}, {', '.join(extras)})"
