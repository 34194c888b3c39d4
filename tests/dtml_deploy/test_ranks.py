"""dtml_deploy/ranks.py without torchrun: the split of cases, the devices, the launch variables, the plain
loop; and io/extent.py, the weights the split balances. (2-process runs: tests/cli/test_torchrun.py.)"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from dtml_deploy.errors import DtmlError
from dtml_deploy.io.extent import voxel_estimate
from dtml_deploy.ranks import Beat, Ranks, ShardSettings, balanced_shards, rank_device, run_cases


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_cover_every_case_once_and_balance_the_voxels(world: int, rng: np.random.Generator) -> None:
    sizes = [int(s) for s in rng.integers(10_000, 60_000_000, size=37)]
    shards = balanced_shards(sizes, world)
    assert len(shards) == world
    assert sorted(itertools.chain(*shards)) == list(range(len(sizes)))
    assert all(s == sorted(s) for s in shards)  # each rank works in input order
    loads = [sum(sizes[i] for i in s) for s in shards]
    # longest-first greedy: no rank carries more than the even share plus the largest single case
    assert max(loads) <= sum(sizes) / world + max(sizes)
    assert balanced_shards(sizes, world) == shards  # deterministic


def test_shards_follow_the_voxels_not_the_count() -> None:
    # one large scan against six small ones: the large one alone on a rank, the small ones on the other
    assert balanced_shards([10, 10, 60, 10, 10, 10, 10], 2) == [[2], [0, 1, 3, 4, 5, 6]]
    # equal sizes alternate, ties going to the lower rank; more ranks than cases leaves ranks idle
    assert balanced_shards([5, 5, 5], 2) == [[0, 2], [1]]
    assert balanced_shards([7], 3) == [[0], [], []]
    assert balanced_shards([], 2) == [[], []]


def test_ranks_from_the_launch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert Ranks.from_env() == Ranks() and not Ranks().distributed and Ranks().is_main
    env = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = Ranks.from_env()
    got = (r.rank, r.world_size, r.local_rank, r.local_world_size, r.distributed, r.is_main)
    assert got == (5, 8, 1, 4, True, False)
    for bad in ({"RANK": "8"}, {"RANK": "x"}, {"LOCAL_RANK": "4"}, {"WORLD_SIZE": "0"}):
        with monkeypatch.context() as m:
            for k, v in bad.items():
                m.setenv(k, v)
            with pytest.raises(DtmlError, match="torchrun"):
                Ranks.from_env()


def test_rank_devices() -> None:
    two = Ranks(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert rank_device("cuda:1", Ranks()) == "cuda:1"  # one process: as given
    assert rank_device("cpu", two) == "cpu"
    import torch

    if not torch.cuda.is_available():
        assert rank_device("auto", two) == "cpu"
    # two ranks on a node cannot both take the one device named: each takes cuda:LOCAL_RANK
    with pytest.raises(DtmlError, match="cuda:LOCAL_RANK"):
        rank_device("cuda:0", two)


def test_one_process_runs_the_plain_loop_in_order() -> None:
    seen: list[int] = []
    beats: list[int] = []

    def work(i: int, beat: Beat) -> dict:
        beat()
        beats.append(i)
        return {"i": i, "square": i * i}

    def weight(i: int) -> int:
        raise AssertionError("one process splits nothing: no header is read")

    out = run_cases(["a", "b", "c"], weight, work, lambda i, r: seen.append(r["i"]), Ranks())
    assert out is not None and out.stopped is None and out.ranks == 1
    assert [r["square"] for r in out.results] == [0, 1, 4] and seen == [0, 1, 2] == beats  # type: ignore[index]


def test_voxel_estimates_read_headers(sample_root: Path, tmp_path: Path) -> None:
    scan = next((sample_root / "images").glob("*.nii.gz"))
    assert voxel_estimate(scan) == 80 * 72 * 56
    import h5py

    with h5py.File(tmp_path / "case.h5", "w") as f:
        f["image"] = np.zeros((30, 20, 10), np.float32)
    assert voxel_estimate(tmp_path / "case.h5", "image") == 6000
    sitk = pytest.importorskip("SimpleITK")
    sitk.WriteImage(sitk.Image(11, 12, 13, sitk.sitkInt16), str(tmp_path / "case.nrrd"))
    assert voxel_estimate(tmp_path / "case.nrrd") == 11 * 12 * 13
    # unreadable headers weigh their bytes (16-bit voxels), a DICOM folder its slices, a missing file 1
    (tmp_path / "broken.nii.gz").write_bytes(b"x" * 4000)
    assert voxel_estimate(tmp_path / "broken.nii.gz") == 2000
    series = tmp_path / "series"
    series.mkdir()
    for i in range(3):
        (series / f"{i}.dcm").write_bytes(b"y" * 1000)
    assert voxel_estimate(series) == 1500
    assert voxel_estimate(tmp_path / "missing.nii.gz") == 1


@pytest.mark.parametrize("timeout", [0.0, 0.5, -1.0, float("nan"), float("inf"), 1e12])
def test_rank_timeouts_that_cannot_be_waited_for_are_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="--rank-timeout must be between 1 and"):
        ShardSettings(stall_timeout_s=timeout)
    assert ShardSettings(stall_timeout_s=1.0).stall_timeout_s == 1.0
