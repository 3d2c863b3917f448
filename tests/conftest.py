"""Fixtures shared by the test files: offline runs, the demo data (built once per session), a
tiny teacher, and command lines for tiny runs on the demo data."""
from __future__ import annotations

import os
from pathlib import Path

# Under pytest-xdist (-n 2: one worker per core) each worker, and every process it starts, computes
# on one thread: two workers of two threads each would fight over the cores. Set before torch
# starts its thread pool; a test that compares a subprocess's numbers with its own sees the same
# thread count on both sides.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import engine
import main_clip
import teacher as teacher_module

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items):
    """A test that runs the pipeline on the demo data (its fixture ``demo_root``) is slow: the
    unit subset, ``-m "not slow"``, is every other test."""
    for item in items:
        if "demo_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test runs offline with empty download caches: nothing can reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo chain (synthetic VOC layout, formatted, observed labels, tiny-teacher text
    features) under a session folder. Runs keep their embedding caches in it (keyed by everything
    they depend on, so runs share them safely)."""
    root = tmp_path_factory.mktemp("demo-data")
    main_clip.run_demo_data(root)
    return root


@pytest.fixture(scope="session")
def tiny_teacher() -> teacher_module.Teacher:
    return teacher_module.build_teacher(tiny=True)


def demo_argv(demo_root: Path, out: Path, *extra: str) -> list[str]:
    """A tiny 2-epoch run on the demo data, its run folders under ``out``."""
    return ["-d", "pascal", "--data-root", str(demo_root), "--output-dir", str(out), "--tiny-models",
            "--num-workers", "0", "--epochs", "2", "--lr", "1e-3", "--bsize", "16", *extra]


def demo_args(demo_root: Path, out: Path, *extra: str):
    return main_clip.get_args_parser().parse_args(demo_argv(demo_root, out, *extra))


def run_once_and_resumed(demo_root: Path, out: Path, monkeypatch, *flags: str,
                         resume_flags: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The 2-epoch demo run with ``flags`` in one go (run folder ``once``) and the same run stopped
    by Ctrl-C before its second epoch, then resumed (``split``, with ``resume_flags`` added); their
    summaries. Methods whose schedules run over the stage's epochs need this split (a run of
    --epochs 1 has another schedule)."""
    once = main_clip.main(demo_args(demo_root, out, *flags, "--run-name", "once"))
    run_epoch = engine.Trainer.run_epoch

    def stop_before_epoch_two(trainer, epoch, stage):
        if epoch == 2:
            raise KeyboardInterrupt
        run_epoch(trainer, epoch, stage)
    with monkeypatch.context() as patch:
        patch.setattr(engine.Trainer, "run_epoch", stop_before_epoch_two)
        with pytest.raises(KeyboardInterrupt):
            main_clip.main(demo_args(demo_root, out, *flags, "--run-name", "split"))
    assert torch.load(out / "split" / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    resumed = main_clip.main(demo_args(demo_root, out, *flags, "--run-name", "split", "--resume", *resume_flags))
    return once, resumed
