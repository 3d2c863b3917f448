"""torchrun: two CPU processes with gloo on the demo data, against single-process evaluation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import engine
import config as config_module
import main_clip
import metrics
import models
import methods
from distributed import Distributed
from labels import LabelState

REPO = Path(__file__).resolve().parents[1]


def torchrun(demo_root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_clip.py",
               "-d", "pascal", "--data-root", str(demo_root), "--output-dir", str(out), "--tiny-models",
               "--num-workers", "0", "--lr", "1e-3", "--bsize", "16", *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def single_process_map(run_dir: Path, demo_root: Path, split: str) -> float:
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model = models.build_model("resnet50", 20, tiny=True)
    model.load_state_dict(best["model"])
    bench = datasets.load_benchmark(demo_root, "pascal")
    data = getattr(bench, split)
    dataset = datasets.MultiLabelDataset([bench.image_dir / p for p in data.images], data.labels_obs, data.labels,
                                         models.TINY_INPUT_SIZE, train=False)
    scores, indices = engine.predict(model, engine.make_loader(dataset, 16, 0), "cpu", split)
    return metrics.compute_metrics(scores, data.labels[indices])["map"]


@pytest.fixture(scope="module")
def two_epoch_run(demo_root, tmp_path_factory) -> Path:
    """The 2-epoch demo run under torchrun with 2 processes, alone in its output folder (two tests read it)."""
    out = tmp_path_factory.mktemp("torchrun")
    torchrun(demo_root, out, "--epochs", "2", "--run-name", "ddp")
    return out / "ddp"


def test_two_processes_write_one_run_that_single_process_evaluation_confirms(demo_root, two_epoch_run):
    run_dir = two_epoch_run
    assert [p.name for p in run_dir.parent.iterdir()] == ["ddp"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.json", "last.pt", "log.txt",
                                                         "metrics.jsonl", "summary.json"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["best_val_map"] == pytest.approx(single_process_map(run_dir, demo_root, "val"), abs=1e-6)
    assert summary["best_test_map"] == pytest.approx(single_process_map(run_dir, demo_root, "test"), abs=1e-6)
    sizes = {"train": 128, "val": 32, "test": 60}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["num_examples"] == sizes[r["phase"]] for r in records)
    assert (run_dir / "log.txt").read_text().count("Best epoch test score") == 1


def test_resume_under_torchrun(demo_root, tmp_path, two_epoch_run):
    torchrun(demo_root, tmp_path, "--epochs", "1", "--run-name", "ddp")
    torchrun(demo_root, tmp_path, "--epochs", "2", "--run-name", "ddp", "--resume")
    once, split = (json.loads((folder / "ddp" / "summary.json").read_text()) for folder in (two_epoch_run.parent, tmp_path))
    assert split == once


def test_sampler_shards_cover_the_permutation_with_the_same_flips():
    def draw(rank, world):
        sampler = datasets.AugmentationSampler(11, torch.Generator().manual_seed(3), rank=rank, world_size=world)
        return list(sampler)
    whole = draw(0, 1)
    shards = [draw(r, 3) for r in range(3)]
    assert all(len(shard) == 4 for shard in shards)  # 11 items padded to 12
    merged = [item for group in zip(*shards) for item in group]
    assert merged[:11] == whole and merged[11] == whole[0]


def test_gather_rows_drops_padding_and_sorts():
    indices, rows = Distributed().gather_rows(np.array([3, 1, 0, 2, 3]), np.arange(5)[:, None] * 1.0)
    assert indices.tolist() == [0, 1, 2, 3] and rows[:, 0].tolist() == [2.0, 1.0, 3.0, 0.0]


def test_aevlp_pseudo_labels_of_every_row_reach_every_rank(demo_root, tmp_path):
    """DAMP's pseudo-labels of a row depend on its cached views, its drawn flips and its observed
    labels, not on the model, and the sampler draws each item's flips whatever the number of
    processes: two processes, each making half of them, end with the one-process matrix."""
    flags = ("-l", "AEVLP", "--grid-size", "2", "--damp-threshold", "0.05", "--epochs", "1")
    torchrun(demo_root, tmp_path, *flags, "--run-name", "two")
    main_clip.main(main_clip.get_args_parser().parse_args(
        ["-d", "pascal", "--data-root", str(demo_root), "--output-dir", str(tmp_path), "--tiny-models",
         "--num-workers", "0", "--lr", "1e-3", "--bsize", "16", *flags, "--run-name", "one"]))
    kept = [torch.load(tmp_path / name / "last.pt", map_location="cpu", weights_only=True)["pseudo_labels"]["kept"]
            for name in ("one", "two")]
    assert kept[0].sum() > 0 and torch.equal(kept[0], kept[1])
    reports = [json.loads((tmp_path / name / "summary.json").read_text())["pseudo_labels"] for name in ("one", "two")]
    assert reports[0] == reports[1]


def test_sync_bn_converts_every_batchnorm_and_keeps_the_checkpoint_layout():
    model = models.build_model("resnet50", 20, tiny=True)
    assert Distributed().sync_batchnorm(model) is model   # one process: nothing to synchronise
    plain = {name: value.clone() for name, value in model.state_dict().items()}
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    synced = Distributed(rank=0, world_size=2).sync_batchnorm(model)
    assert batchnorms > 0 and sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == batchnorms
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    state = synced.state_dict()
    assert state.keys() == plain.keys() and all(torch.equal(state[k], plain[k]) for k in plain)
    fresh = models.build_model("resnet50", 20, tiny=True)
    fresh.load_state_dict(state)      # evaluate.py / predict.py rebuild the plain model from best.pt
    x = torch.randn(2, 3, 64, 64)
    model.eval(), synced.eval(), fresh.eval()
    assert torch.equal(synced(x), fresh(x))   # in eval mode SyncBatchNorm uses the running statistics


def test_sync_bn_under_torchrun_on_cpus_is_one_line_before_any_work(demo_root, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_clip.py",
               "-d", "pascal", "--data-root", str(demo_root), "--output-dir", str(tmp_path), "--tiny-models",
               "--num-workers", "0", "--bsize", "16", "--sync-bn", "--run-name", "sbn"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode != 0 and errors and all("--sync-bn" in line and "CUDA" in line for line in errors)
    assert not (tmp_path / "sbn").exists()


REGULARISED = ("epr", "GR")


def regularised_loss(name: str, logits: torch.Tensor, observed: torch.Tensor, global_batch) -> torch.Tensor:
    config = config_module.resolve_config(main_clip.get_args_parser().parse_args(["-l", name, "--tiny-models"]))
    labels = LabelState(observed, observed.clamp(min=0))
    method = methods.get_method(name).from_config(config, labels, stage_epochs=8)
    inputs = methods.LossInputs(logits, torch.sigmoid(logits), torch.arange(len(logits)), observed, None,
                                observed.clamp(min=0), global_batch)
    return method.loss(inputs, 3)


def share_gradients(rank: int, world_size: int, init_file: str, features, observed, out_dir: str) -> None:
    """One torchrun-like process: DDP over a linear head, its contiguous share of the batch."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        share = slice(rank * len(features) // world_size, (rank + 1) * len(features) // world_size)
        dist = Distributed(rank=rank, world_size=world_size)
        for name in REGULARISED:
            torch.manual_seed(0)
            head = torch.nn.Linear(features.shape[1], observed.shape[1]).double()
            net = torch.nn.parallel.DistributedDataParallel(head)
            regularised_loss(name, net(features[share]), observed[share], dist.global_batch).backward()
            torch.save(head.weight.grad, Path(out_dir) / f"{name}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # a subprocess or a whole pipeline
def test_a_batch_regulariser_under_torchrun_has_the_one_process_gradient(tmp_path):
    """EPR's and GR's (so AEVLP's) expected-positive regulariser, a squared mean over the batch, is
    taken over the whole batch across processes: two DDP processes, each with half of the batch,
    end with the gradient one process has over the whole batch (a mean over processes of each
    half's regulariser would not)."""
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    observed = torch.zeros(8, 5, dtype=torch.float64)
    observed[torch.arange(8), torch.randint(5, (8,), generator=generator)] = 1.0
    torch.multiprocessing.spawn(share_gradients, args=(2, str(tmp_path / "init"), features, observed, str(tmp_path)),
                                nprocs=2, join=True)
    for name in REGULARISED:
        def gradient(loss_of):
            torch.manual_seed(0)
            head = torch.nn.Linear(6, 5).double()
            loss_of(head).backward()
            return head.weight.grad
        whole = gradient(lambda head: regularised_loss(name, head(features), observed, lambda rows: rows))
        halves = gradient(lambda head: sum(regularised_loss(name, head(features[part]), observed[part],
                                                            lambda rows: rows) for part in (slice(0, 4), slice(4, 8))) / 2)
        for rank in range(2):
            torch.testing.assert_close(torch.load(tmp_path / f"{name}-{rank}.pt"), whole, rtol=1e-12, atol=1e-15)
        assert not torch.allclose(halves, whole, rtol=1e-6, atol=0)
