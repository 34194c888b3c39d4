"""The model bundle: a directory with `config.json` and safetensors weight shards (no pickle).

Layout::

    bundle/
      config.json                        # format, ModelConfig, recipe, data fingerprint, training summary
      weights-00001-of-00003.safetensors # tensors `seg.*` (M_s) and `dis.*` (M_d), each file <= 15 MB

`config.json` lists every shard with its SHA-256, so a truncated or edited file is caught at load
and named in the error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dtml_deploy.bundle_schema import DTYPES, META_KEYS, check_dtypes, check_top_level, check_weights, shard_path
from dtml_deploy.checks import is_int
from dtml_deploy.config import ModelConfig
from dtml_deploy.errors import BundleError
from dtml_deploy.io.atomic import atomic_dir
from dtml_deploy.io.digest import file_sha256
from dtml_deploy.nets.dual import DualTaskNet
from dtml_deploy.version import __version__

FORMAT = "dtml-bundle"
FORMAT_VERSION = 1
MAX_SHARD_BYTES = 15_000_000
_DTYPES = DTYPES


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in key order; 64 KB headroom per file for the safetensors header."""
    budget = max_bytes - 65_536
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if nbytes > budget:
            raise BundleError(f"tensor {name} ({nbytes} bytes) is larger than a shard ({max_bytes} bytes)")
        if size + nbytes > budget and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


@dataclass
class Bundle:
    """A trained pair with everything needed to run it."""

    model: ModelConfig
    state: dict[str, torch.Tensor]  # keys 'seg.<...>' and 'dis.<...>', float32
    meta: dict[str, Any] = field(default_factory=dict)  # recipe, data_fingerprint, training

    @classmethod
    def from_net(cls, net: DualTaskNet, model: ModelConfig, **meta: Any) -> Bundle:
        state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in net.state_dict().items()}
        return cls(model=model, state=state, meta=dict(meta))

    def build(self, device: str | torch.device = "cpu") -> DualTaskNet:
        """A `DualTaskNet` in eval mode with these weights (fp32)."""
        net = DualTaskNet(self.model.net, k=self.model.k)
        try:
            net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in self.state.items()})
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise BundleError(f"weights do not match the configured architecture: "
                              f"{' '.join(first[:3])[:300]}") from None
        return net.eval().to(device)

    @property
    def content_hash(self) -> str:
        """SHA-256 over the model config and the weights (independent of sharding and file names)."""
        h = hashlib.sha256(json.dumps(self.model.to_dict(), sort_keys=True).encode())
        for name in sorted(self.state):
            t = self.state[name].detach().cpu().float().contiguous()
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: Path, dtype: str = "float32", max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
        """Write the bundle atomically; floating weights stored as `dtype` (float32/float16/bfloat16)."""
        if dtype not in _DTYPES:
            raise BundleError(f"unknown weight dtype {dtype!r}; choose from {sorted(_DTYPES)}")
        unknown = sorted(set(self.meta) - META_KEYS)
        if unknown:  # `load` would refuse them: never write a bundle that cannot be read back
            raise BundleError(f"bundle metadata keys {unknown} are not part of the format ({sorted(META_KEYS)})")
        tensors = {k: (v.to(_DTYPES[dtype]) if v.is_floating_point() else v).contiguous()
                   for k, v in self.state.items()}
        shards = _shards(tensors, max_shard_bytes)
        stored = Bundle(self.model, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
        path = Path(path)
        with atomic_dir(path) as tmp:
            files: dict[str, str] = {}
            for i, shard in enumerate(shards, 1):
                name = f"weights-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": FORMAT})
                files[name] = file_sha256(tmp / name)
            config = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "dtml_version": __version__,
                "model": self.model.to_dict(),
                "weights": {"dtype": dtype, "files": files, "n_tensors": len(tensors),
                            "content_hash": stored.content_hash},
                **self.meta,
            }
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Bundle:
        """Load and verify a bundle directory; every failure names the bad part."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path}: not a bundle directory (expected config.json + *.safetensors)")
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise BundleError(f"{path}: config.json is missing")
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{cfg_path}: not valid JSON ({e})") from None
        except OSError as e:
            raise BundleError(f"{cfg_path}: cannot be read ({e.strerror})") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise BundleError(f"{cfg_path}: not a dtml bundle (format is {config.get('format')!r})"
                              if isinstance(config, dict) else f"{cfg_path}: not a dtml bundle")
        if is_int(config.get("format_version")) and config["format_version"] > FORMAT_VERSION:
            raise BundleError(f"{cfg_path}: bundle format {config['format_version']} is newer than this "
                              f"dtml understands ({FORMAT_VERSION}); upgrade dtml")
        check_top_level(config, cfg_path)
        try:
            model = ModelConfig.from_dict(config.get("model"))  # type: ignore[arg-type]
        except (TypeError, ValueError) as e:
            raise BundleError(f"{cfg_path}: {e}") from None
        weights = config.get("weights")
        dtype, files = check_weights(weights, cfg_path)
        state: dict[str, torch.Tensor] = {}
        for name, digest in files.items():
            f = shard_path(path, name, cfg_path)
            if not f.is_file():
                raise BundleError(f"{f}: weight shard is missing")
            if file_sha256(f) != digest:
                raise BundleError(f"{f}: checksum mismatch (file is corrupt or was modified)")
            try:
                tensors = load_file(str(f))
            except (SafetensorError, OSError, ValueError) as e:
                raise BundleError(f"{f}: unreadable safetensors file ({e})") from None
            check_dtypes(tensors, dtype, f)
            again = sorted(set(tensors) & set(state))
            if again:
                raise BundleError(f"{f}: tensor {again[0]} is also in another shard")
            state.update(tensors)
        if len(state) != weights.get("n_tensors", len(state)):  # type: ignore[union-attr]
            raise BundleError(f"{path}: expected {weights['n_tensors']} tensors, found {len(state)}")
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # a diverged run's weights: every mask would be empty or full
            raise BundleError(f"{path}: tensor {bad[0]} holds NaN or infinite weights; the bundle is unusable")
        meta = {k: v for k, v in config.items()
                if k not in {"format", "format_version", "dtml_version", "model", "weights"}}
        bundle = cls(model=model, state=state, meta=meta)
        bundle.build()  # fail now, with the bundle named, if the weights don't fit the architecture
        return bundle
