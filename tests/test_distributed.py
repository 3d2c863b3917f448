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
import main_clip
import metrics
import models
from distributed import Distributed

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


def test_two_processes_write_one_run_that_single_process_evaluation_confirms(demo_root, tmp_path):
    torchrun(demo_root, tmp_path, "--epochs", "2", "--run-name", "ddp")
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    run_dir = tmp_path / "ddp"
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


def test_resume_under_torchrun(demo_root, tmp_path):
    torchrun(demo_root, tmp_path, "--epochs", "2", "--run-name", "once")
    torchrun(demo_root, tmp_path, "--epochs", "1", "--run-name", "split")
    torchrun(demo_root, tmp_path, "--epochs", "2", "--run-name", "split", "--resume")
    once, split = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("once", "split"))
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
