"""The bundle format: safetensors shards + config.json, verified at load, never a pickle."""

from __future__ import annotations

import json

import pytest
import torch

from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import BundleError
from tests.conftest import make_bundle


def test_round_trip_keeps_weights_and_meta(tmp_path):
    b = make_bundle()
    b.meta = {"recipe": {"recipe": "dtml"}, "data_fingerprint": "abc"}
    b.save(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b")
    assert loaded.model == b.model
    assert loaded.meta["data_fingerprint"] == "abc"
    for k, v in b.state.items():
        assert torch.equal(loaded.state[k], v), k
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.build()(x)[0], b.build()(x)[0])
    assert loaded.content_hash == b.content_hash


def test_full_size_bundle_is_sharded_under_15_mb(tmp_path):
    b = make_bundle(n_filters=16, patch=(112, 112, 80))
    b.save(tmp_path / "b")
    files = sorted(p for p in (tmp_path / "b").iterdir())
    shards = [p for p in files if p.suffix == ".safetensors"]
    assert len(shards) >= 3  # 2 x 9.45 M fp32 parameters = 75.6 MB
    assert all(p.stat().st_size <= 15_000_000 for p in shards)
    assert {p.suffix for p in files} == {".json", ".safetensors"}  # nothing pickled
    b.save(tmp_path / "h", dtype="float16")
    half = Bundle.load(tmp_path / "h")
    assert len(list((tmp_path / "h").glob("*.safetensors"))) == 3  # 37.8 MB of fp16
    w = "seg.block_five.conv.0.weight"
    assert torch.allclose(half.state[w], b.state[w], rtol=1e-3, atol=1e-6)


def test_corrupt_shard_is_named(tmp_path):
    path = make_bundle().save(tmp_path / "b")
    shard = next(path.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=shard.name + ".*checksum"):
        Bundle.load(path)


def test_missing_and_wrong_parts(tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        Bundle.load(tmp_path / "nope")
    path = make_bundle().save(tmp_path / "b")
    cfg = json.loads((path / "config.json").read_text())
    next(path.glob("*.safetensors")).unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(path)
    path = make_bundle().save(tmp_path / "c")
    (path / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"config\.json: not valid JSON"):
        Bundle.load(path)
    (path / "config.json").write_text(json.dumps({**cfg, "format": "something-else"}))
    with pytest.raises(BundleError, match="not a dtml bundle"):
        Bundle.load(path)
    bad = {**cfg, "model": {**cfg["model"], "net": {**cfg["model"]["net"], "n_filters": 8}}}
    (path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="do not match the configured architecture"):
        Bundle.load(path)


def test_save_is_atomic_and_replaces(tmp_path):
    a, b = make_bundle(seed=1), make_bundle(seed=2)
    a.save(tmp_path / "b")
    b.save(tmp_path / "b")
    assert Bundle.load(tmp_path / "b").content_hash == b.content_hash
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folders left behind
