"""DDP training on the CPU: 2 processes on gloo, launched for real by torchrun.

W ranks with per-rank batch B must train the model one process trains with batch W * B (same samples,
same patches, same dropout masks, the Dice pooled over the global batch); only rank 0 writes; `--resume`
continues. The networks use group norm: torch's SyncBatchNorm refuses CPU tensors, so under DDP on the CPU
BatchNorm normalises per rank and is not exact (README, training section).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dtml_deploy.bundle import Bundle
from dtml_deploy.errors import DataError
from dtml_deploy.io.datasets import make_split, open_source
from dtml_deploy.nets.dual import DualTaskNet
from dtml_deploy.ranks import Ranks
from dtml_training.config import TrainConfig
from dtml_training.data.sampler import TwoStreamSampler, check_batch_composition, rank_rows
from dtml_training.distributed import GlobalBatchDropout3d, use_global_batch_layers
from dtml_training.recipes import recipe
from dtml_training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
N, K = 4, 2  # iterations of the runs; the interrupted run stops at K and is resumed to N
# Per-rank batch 1 labeled + 1 unlabeled on 2 ranks = the one-process batch 2 + 2. k = 10 rather than the
# recipe's 1500: sigmoid(-1500 d) amplifies fp32 rounding so much that one process alone moves its weights
# by 3e-4 between 1 and 2 threads in 4 iterations; at k = 10 rounding stays near 1e-7.
SETTINGS = dict(labeled=2, iterations=N, n_filters=4, patch=(32, 32, 32), norm="group", k=10.0, workers=0,
                checkpoint_every=0)
# Two ranks (1 thread each) sum gradients and losses in another order than one process: the weights agree
# to fp32 rounding, measured 1.7e-6 max abs after 4 iterations, the same as one process run with 1 and
# with 2 threads differs by; a DDP run that leaves out one piece of the global objective misses by far
# more (measured: per-rank Dice 1.5e-3, per-rank dropout masks 1.3e-2).
TOL = 1e-4


def _cli_args(out: Path, sample_root: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(sample_root), "--out", str(out), "--labeled", "2", "--labeled-bs", "1",
            "--unlabeled-bs", "1", "--n-filters", "4", "--patch", "32", "32", "32", "--norm", "group",
            "--k", "10", "--workers", "0", "--checkpoint-every", "0", "--no-progress", *extra]


# Installed in every process of a launch (torchrun's agent and both ranks) through PYTHONPATH: records
# each write under the run folders (open for writing, mkdir, rename, remove, chmod), by rank.
AUDIT = textwrap.dedent('''
    import atexit, json, os, sys
    ROOT = os.path.realpath(os.environ["DTML_AUDIT_ROOT"]) + os.sep
    WHO = os.environ.get("RANK", "launcher")
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate", "os.chmod",
              "os.link", "os.symlink", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    seen = []

    def under(p):
        if not isinstance(p, (str, bytes, os.PathLike)):
            return None
        p = os.path.realpath(os.fsdecode(p))
        return p if p.startswith(ROOT) else None

    def hook(event, args):
        if event == "open" and isinstance(args[2], int) and args[2] & WRITE and under(args[0]):
            seen.append([event, under(args[0])])
        elif event in EVENTS:
            hits = [under(a) for a in args if under(a)]
            if hits:
                seen.append([event, *hits])

    sys.addaudithook(hook)
    atexit.register(lambda: open(os.path.join(os.environ["DTML_AUDIT_DIR"], f"{WHO}-{os.getpid()}.json"),
                                 "w").write(json.dumps(seen)))
''')


def _torchrun(args: list[str], audit: Path, root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(audit), str(REPO)]), "DTML_AUDIT_DIR": str(audit),
           "DTML_AUDIT_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "dtml_deploy", *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_root):
    """Three torchrun launches: a 2-rank run to N; a 2-rank run to K, then resumed to N. Each process's
    writes under the run folders are recorded."""
    base = tmp_path_factory.mktemp("ddp")
    audit, root = base / "audit", base / "runs"
    audit.mkdir()
    root.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    full, part = root / "full", root / "part"
    outs = [_torchrun(_cli_args(full, sample_root, "--iterations", str(N)), audit, root),
            _torchrun(_cli_args(part, sample_root, "--iterations", str(K)), audit, root),
            _torchrun(_cli_args(part, sample_root, "--iterations", str(N), "--resume"), audit, root)]
    writes: dict[str, list] = {}
    for f in audit.glob("*.json"):
        writes.setdefault(f.name.split("-")[0], []).extend(json.loads(f.read_text()))
    return {"full": full, "part": part, "writes": writes, "stdout": [o.stdout for o in outs]}


def _state(run: Path) -> dict[str, torch.Tensor]:
    return Bundle.load(run / "bundle").state


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def test_two_ranks_train_the_one_process_model_of_the_global_batch(runs, sample_root, tmp_path):
    cfg = recipe("dtml", labeled_bs=2, unlabeled_bs=2, **SETTINGS)
    Trainer(cfg, make_split(open_source(sample_root), 2, None), tmp_path / "one", show_progress=False).run()
    one, two = _state(tmp_path / "one"), _state(runs["full"])
    assert one.keys() == two.keys()
    diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert diff <= TOL, f"max abs weight difference {diff:.3g} > {TOL}"
    torch.manual_seed(cfg.seed)  # the initial weights, as the trainer builds them
    init = DualTaskNet(cfg.model_config().net, k=cfg.k).state_dict()
    moved = max((one[k].float() - init[k].float()).abs().max().item() for k in one)
    assert moved > 100 * TOL  # the comparison can fail: training moved the weights far more than TOL
    meta = Bundle.load(runs["full"] / "bundle").meta
    assert meta["training"]["world_size"] == 2 and meta["recipe"]["labeled_bs"] == 1


def test_only_rank_zero_writes(runs):
    writes = runs["writes"]
    assert set(writes) <= {"0", "1", "launcher"}
    assert writes.get("1", []) == [], f"rank 1 wrote: {writes['1'][:5]}"
    assert writes.get("launcher", []) == []
    written = {Path(p).relative_to(runs["full"].parent).parts[:2] for _, *ps in writes["0"] for p in ps}
    for run in ("full", "part"):
        for name in ("checkpoint", "bundle", "train_log.jsonl"):
            assert any(w[:1] == (run,) and w[1:2] and w[1].startswith(name) for w in written), (run, name)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        assert ("full", "tensorboard") in written
    # one log row per iteration: no rank other than 0 appended to the log
    assert [r["iteration"] for r in _log(runs["full"]) if "loss" in r] == list(range(N))
    assert [out.count("bundle:") for out in runs["stdout"]] == [1, 1, 1]  # one report per launch: rank 0's


def test_resume_under_ddp_continues(runs):
    resumed, full = _state(runs["part"]), _state(runs["full"])
    assert resumed.keys() == full.keys()
    for k in full:  # every rank restores rank 0's weights, momenta and RNG state: nothing to lose
        assert torch.equal(resumed[k], full[k]), k
    assert Bundle.load(runs["part"] / "bundle").meta["training"]["start_iteration"] == K
    assert [r["iteration"] for r in _log(runs["part"]) if "loss" in r] == list(range(N))


# --- the parts, without processes --------------------------------------------------------------------

@pytest.mark.parametrize("world,l_bs,u_bs", [(1, 2, 2), (2, 1, 1), (3, 2, 1), (4, 1, 3)])
def test_ranks_take_distinct_slices_of_the_global_batch(world, l_bs, u_bs):
    n_l, n_u = 13, 7
    ranks = [TwoStreamSampler(n_l, n_u, l_bs, u_bs, seed=5, start=0, stop=30, rank=r, world_size=world)
             for r in range(world)]
    one = TwoStreamSampler(n_l, n_u, l_bs * world, u_bs * world, seed=5, start=0, stop=30)
    for t in range(30):
        per_rank = [s.batch(t) for s in ranks]
        assert all(len(b) == l_bs + u_bs for b in per_rank)
        assert all(i < n_l for b in per_rank for i, _ in b[:l_bs])  # labeled first, then unlabeled
        assert all(i >= n_l for b in per_rank for i, _ in b[l_bs:])
        keys = [k for b in per_rank for k in b]
        assert len(set(keys)) == len(keys)  # no (case, augmentation) drawn twice in an iteration
        labeled = [i for b in per_rank for i, _ in b[:l_bs]]
        assert len(set(labeled)) == len(labeled)  # different labeled cases on different ranks
        # the union is the one-process batch of W x the per-rank sizes, rank order in each stream
        glob = one.batch(t)
        assert [k for b in per_rank for k in b[:l_bs]] + [k for b in per_rank for k in b[l_bs:]] == glob
        assert [[glob[i] for i in rank_rows(r, world, l_bs, u_bs)] for r in range(world)] == per_rank
    resumed = TwoStreamSampler(n_l, n_u, l_bs, u_bs, seed=5, start=12, stop=30, rank=world - 1, world_size=world)
    assert list(resumed) == [ranks[-1].batch(t) for t in range(12, 30)]


def test_too_few_labeled_cases_for_all_ranks_is_refused(sample_root):
    with pytest.raises(ValueError, match="labeled_bs=4"):
        TwoStreamSampler(3, 5, 2, 1, seed=0, start=0, stop=1, rank=0, world_size=2)
    split = make_split(open_source(sample_root), 1, None)
    cfg: TrainConfig = recipe("dtml", labeled=1, labeled_bs=1, **{k: v for k, v in SETTINGS.items() if k != "labeled"})
    check_batch_composition(split, cfg, 1)
    with pytest.raises(DataError, match="labeled_bs=1 on each of 2 ranks needs at least 2 labeled cases"):
        check_batch_composition(split, cfg, 2)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_batch_dropout_draws_the_one_process_masks(world):
    l_bs, u_bs, p = 2, 1, 0.5
    x = torch.randn(world * (l_bs + u_bs), 8, 2, 2, 2)
    torch.manual_seed(7)
    expected = F.dropout3d(x, p, training=True)
    after = torch.get_rng_state()
    for r in range(world):
        rows = rank_rows(r, world, l_bs, u_bs)
        torch.manual_seed(7)
        got = GlobalBatchDropout3d(p, rows, len(x))(x[rows])
        assert torch.equal(got, expected[rows])
        assert torch.equal(torch.get_rng_state(), after)  # every rank's generator stays in step
    assert np.unique(expected[:, :, 0, 0, 0].numpy() == 0).size == 2  # some channels dropped, some kept
    assert torch.equal(GlobalBatchDropout3d(p, [0], 2).eval()(x[:1]), x[:1])  # identity in eval mode


def test_global_batch_layers_keep_parameters_and_state_keys():
    """The swap keeps the very parameters the optimisers hold and the checkpoint/bundle keys; BatchNorm
    becomes SyncBatchNorm only on CUDA (converted here without running it: torch refuses it on the CPU)."""
    cfg = recipe("dtml", **{**SETTINGS, "norm": "batch"})
    for device, sync in ((torch.device("cpu"), False), (torch.device("cuda", 0), True)):
        net = DualTaskNet(cfg.model_config().net, k=cfg.k)
        params, keys = list(net.parameters()), list(net.state_dict())
        out = use_global_batch_layers(net, Ranks(rank=1, world_size=2), device, 2, 1)
        assert out is net and list(net.parameters()) == params and list(net.state_dict()) == keys
        drops = [m for m in net.modules() if isinstance(m, GlobalBatchDropout3d)]
        assert len(drops) == 2 and all(d.rows == [2, 3, 5] and d.global_size == 6 for d in drops)
        assert not any(isinstance(m, torch.nn.Dropout3d) for m in net.modules())
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules()) == sync
    single = DualTaskNet(cfg.model_config().net, k=cfg.k)
    use_global_batch_layers(single, Ranks(), torch.device("cuda", 0), 2, 1)
    assert not any(isinstance(m, (GlobalBatchDropout3d, torch.nn.SyncBatchNorm)) for m in single.modules())
