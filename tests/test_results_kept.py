"""A folder that holds a run's results is never emptied or retrained over, and a refused
--resume writes nothing: each check runs again under the folder's lock, before any write."""
from __future__ import annotations

import re
import shutil

import pytest

import main_clip
from conftest import demo_argv

FAST = ("-l", "an", "--train-mode", "linear_fixed_features", "--head-lr", "1e-2", "--epochs", "1")


def contents(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def cli(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main_clip.cli(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture()
def finished(demo_root, tmp_path, capsys):
    argv = demo_argv(demo_root, tmp_path, *FAST, "--run-name", "r")
    assert cli(argv, capsys)[0] == 0
    return argv, tmp_path / "r"


@pytest.mark.parametrize("resume", [False, True])
def test_a_finished_run_without_its_last_pt_keeps_its_results(finished, capsys, resume):
    argv, run_dir = finished
    (run_dir / "last.pt").unlink()
    before = contents(run_dir)
    code, err = cli(argv + (["--resume"] if resume else []), capsys)
    assert code == 2 and len(err) == 1
    assert f"run folder {run_dir} holds a run's results (best.pt, summary.json, metrics.jsonl)" in err[0]
    assert contents(run_dir) == before


def test_a_run_that_finished_while_another_prepared_is_not_trained_over(demo_root, tmp_path, capsys, monkeypatch):
    argv = demo_argv(demo_root, tmp_path, *FAST, "--run-name", "r")
    real_setup = main_clip.setup

    def setup_while_the_twin_command_finishes(config, *args):
        # The same command, started at the same moment, passes the first check too and finishes
        # while this one is still setting up.
        monkeypatch.setattr(main_clip, "setup", real_setup)
        assert main_clip.cli(argv) == 0
        return real_setup(config, *args)
    monkeypatch.setattr(main_clip, "setup", setup_while_the_twin_command_finishes)
    code, err = cli(argv, capsys)
    assert code == 2 and err[-1] == (f"error: run folder {tmp_path / 'r'} already exists: pass --resume to continue "
                                     f"it or choose another --run-name")
    assert (tmp_path / "r" / "log.txt").read_text().count("Best epoch test score") == 1


def test_a_refused_resume_writes_nothing(finished, capsys):
    argv, run_dir = finished
    last = run_dir / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    before = contents(run_dir)
    code, err = cli(["--output-dir", str(run_dir.parent), "--run-name", "r", "--resume", "--epochs", "3"], capsys)
    assert code == 2 and len(err) == 1 and str(last) in err[0]
    assert contents(run_dir) == before  # config.json still says --epochs 1


def test_a_last_pt_of_another_run_is_refused_before_any_write(demo_root, finished, capsys):
    argv, run_dir = finished
    assert cli(demo_argv(demo_root, run_dir.parent, *FAST, "--run-name", "other", "--seed", "3"), capsys)[0] == 0
    shutil.copyfile(run_dir.parent / "other" / "last.pt", run_dir / "last.pt")
    before = contents(run_dir)
    code, err = cli(["--output-dir", str(run_dir.parent), "--run-name", "r", "--resume", "--epochs", "2"], capsys)
    assert code == 2 and len(err) == 1
    assert f"{run_dir / 'last.pt'} was written by another run" in err[0] and "seed: 3 -> 0" in err[0]
    assert contents(run_dir) == before


def test_an_output_folder_without_room_for_the_checkpoints_is_one_line_before_training(demo_root, tmp_path, capsys,
                                                                                      monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    import engine

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 2**21, 2**21))
    epochs = []
    monkeypatch.setattr(engine.Trainer, "run_epoch", lambda self, epoch, stage: epochs.append(epoch))
    code, err = cli(demo_argv(demo_root, tmp_path, "-l", "an", "--run-name", "r"), capsys)
    assert code == 2 and len(err) == 1 and epochs == []
    assert err[0].startswith(f"error: {tmp_path / 'r'} has 2.1 MB free") and "needed for last.pt and best.pt" in err[0]
    assert not (tmp_path / "r" / "last.pt").exists()


def test_a_checkpoint_that_cannot_be_written_is_one_line_with_the_resume_command(finished, capsys, monkeypatch):
    import errno

    import fileio

    argv, run_dir = finished
    before = contents(run_dir)

    def disk_full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fileio, "atomic_torch_save", disk_full)
    import checkpoint
    monkeypatch.setattr(checkpoint, "atomic_torch_save", disk_full)
    code, err = cli(["--output-dir", str(run_dir.parent), "--run-name", "r", "--resume", "--epochs", "2"], capsys)
    err = [line for line in err if line.startswith("error:")]  # the rest is the epoch's progress bars
    assert code == 2 and len(err) == 1
    assert re.match(rf"error: cannot write {re.escape(str(run_dir))}/(best|last)\.pt \(No space left on device\)", err[0])
    assert err[0].endswith(f"continue with: python main_clip.py --output-dir {run_dir.parent} --run-name r --resume")
    assert (run_dir / "last.pt").read_bytes() == before["last.pt"]
