"""Run folders under faults: interruptions (real signals, in a subprocess), unstarted runs,
resume as configured, the folder lock, damaged checkpoints, bad names and flags, leftovers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import checkpoint
import engine
import main_clip
import rundir
from conftest import REPO_ROOT, demo_argv
from reading import summarize

FAST = ("-l", "an", "--train-mode", "linear_fixed_features", "--head-lr", "1e-2")


def run_with_signal(argv: list[str], patch: str) -> subprocess.CompletedProcess:
    """``main_clip.cli(argv)`` in a fresh process whose ``patch`` (Python run before it) may send
    the process a real SIGINT at a chosen point."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        import engine, main_clip
        {patch}
        sys.exit(main_clip.cli({argv!r}))
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main_clip.cli(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_ctrl_c_in_the_teacher_pass_prints_the_resume_command_and_resume_finishes(demo_root, tmp_path):
    argv = demo_argv(demo_root, tmp_path, "-l", "EM_PL", "--run-name", "r")
    done = run_with_signal(argv, """
        def interrupted(self):
            os.kill(os.getpid(), signal.SIGINT)
        engine.Trainer.make_pseudo_labels = interrupted
    """)
    assert done.returncode == 130, done.stderr[-2000:]
    last_line = done.stderr.strip().splitlines()[-1]
    command = f"python main_clip.py --output-dir {tmp_path} --run-name r --resume"
    assert last_line.startswith("interrupted; ") and last_line.endswith(command)
    assert rundir.is_started(tmp_path / "r")
    summary = main_clip.main(main_clip.get_args_parser().parse_args(command.split()[2:]))
    assert summary["epochs_run"] == 2 and summary["best_test_map"] > 0


def test_a_run_that_died_before_its_first_checkpoint_runs_again(demo_root, tmp_path, capsys):
    argv = demo_argv(demo_root, tmp_path, *FAST, "--run-name", "r")
    done = run_with_signal(argv, """
        def interrupted(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)
        engine.Trainer.__init__ = interrupted
    """)
    assert done.returncode == 130 and "no epoch finished; start again with" in done.stderr
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.json"]
    (tmp_path / "r" / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    code, err = cli(argv, capsys)  # the same command
    assert code == 0 and rundir.is_started(tmp_path / "r")
    assert not (tmp_path / "r" / ".last.pt.x1y2.tmp").exists()
    assert "removed what an unfinished run left: .last.pt.x1y2.tmp, config.json" in (tmp_path / "r" / "log.txt").read_text()
    # --resume on such a folder starts it cleanly too.
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text((tmp_path / "r" / "config.json").read_text())
    summary = main_clip.main(main_clip.get_args_parser().parse_args(
        ["--output-dir", str(tmp_path), "--run-name", "s", "--resume", "--data-root", str(demo_root)]))
    assert summary["epochs_run"] == 2
    assert "stopped before its first checkpoint; starting it from the beginning" in (tmp_path / "s" / "log.txt").read_text()


def test_ctrl_c_mid_run_resumes_to_the_same_numbers(demo_root, tmp_path):
    straight = main_clip.main(main_clip.get_args_parser().parse_args(
        demo_argv(demo_root, tmp_path, *FAST, "--epochs", "3", "--run-name", "straight")))
    argv = demo_argv(demo_root, tmp_path, *FAST, "--epochs", "3", "--run-name", "cut")
    done = run_with_signal(argv, """
        run_epoch = engine.Trainer.run_epoch
        def interrupted(self, epoch, stage):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGINT)
            run_epoch(self, epoch, stage)
        engine.Trainer.run_epoch = interrupted
    """)
    assert done.returncode == 130 and "holds the last finished epoch; continue with" in done.stderr
    assert "interrupted during epoch 2" in (tmp_path / "cut" / "log.txt").read_text()
    resumed = main_clip.main(main_clip.get_args_parser().parse_args(
        ["--output-dir", str(tmp_path), "--run-name", "cut", "--resume"]))
    assert resumed == straight


def test_a_second_run_into_a_locked_folder_gets_one_line(demo_root, tmp_path, capsys):
    argv = demo_argv(demo_root, tmp_path, *FAST, "--run-name", "r", "--epochs", "1")
    assert cli(argv, capsys)[0] == 0
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    with rundir.RunFolderLock(tmp_path / "r"):  # another run holds it
        code, err = cli(["--output-dir", str(tmp_path), "--run-name", "r", "--resume", "--epochs", "2"], capsys)
    assert code == 2 and len(err) == 1 and err[0] == (f"error: run folder {tmp_path / 'r'} is in use by another run; "
                                                       f"wait for it to finish or choose another --run-name")
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics


def test_damaged_checkpoints_are_refused_with_one_line(demo_root, tmp_path, capsys):
    argv = demo_argv(demo_root, tmp_path, *FAST, "--run-name", "r", "--epochs", "1")
    assert cli(argv, capsys)[0] == 0
    last = tmp_path / "r" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"]["head.weight"][0, 0] += 1.0  # bytes changed inside, the zip still whole
    torch.save(state, last)
    resume = ["--output-dir", str(tmp_path), "--run-name", "r", "--resume", "--epochs", "2"]
    code, err = cli(resume, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {last}: damaged")
    last.write_bytes(last.read_bytes()[:1000])
    code, err = cli(resume, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {last}: cannot read the checkpoint")
    with pytest.raises(main_clip.RunError, match="no checksum"):
        torch.save({"model": {}}, tmp_path / "plain.pt")
        checkpoint.load_checkpoint(tmp_path / "plain.pt")


@pytest.mark.parametrize("flags,message", [
    (["--run-name", "../escape"], "--run-name '../escape': give a plain folder name"),
    (["--run-name", "/tmp/abs"], "--run-name '/tmp/abs': give a plain folder name"),
    (["-th", "0"], "-th/--threshold must be in (0, 1]"),
    (["-th", "1.5"], "-th/--threshold must be in (0, 1]"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["-l", "EM", "--alpha", "-0.1"], "--alpha must be >= 0.0"),
    (["-l", "EM_PL", "--beta-neg", "-1"], "--beta-neg must be >= 0.0"),
])
def test_bad_names_and_flags_are_one_line_before_any_work(demo_root, tmp_path, capsys, flags, message):
    code, err = cli(demo_argv(demo_root, tmp_path / "out", *flags), capsys)
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists() and not Path("/tmp/abs").exists()


def test_an_output_dir_that_is_a_file_and_an_unreadable_config(demo_root, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, err = cli(demo_argv(demo_root, tmp_path / "file"), capsys)
    assert code == 2 and err == [f"error: --output-dir {tmp_path / 'file'} is a file, not a folder"]
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "config.json").write_text("{not json")
    code, err = cli(["--output-dir", str(tmp_path / "runs"), "--run-name", "r", "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "config.json: cannot read a run configuration" in err[0]


def test_a_cut_metrics_log_is_reported_on_resume(demo_root, tmp_path, capsys):
    assert cli(demo_argv(demo_root, tmp_path, *FAST, "--run-name", "r"), capsys)[0] == 0
    metrics = tmp_path / "r" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    assert cli(["--output-dir", str(tmp_path), "--run-name", "r", "--resume", "--epochs", "3"], capsys)[0] == 0
    assert "metrics.jsonl has 1 of the" in (tmp_path / "r" / "log.txt").read_text()


def write_run(folder: Path, seed: int, test_map, name: str) -> None:
    run = folder / name
    run.mkdir(parents=True)
    config = {"dataset": "pascal", "model": "resnet50", "loss": "EM", "seed": seed, "lr": 1e-5}
    (run / "config.json").write_text(json.dumps(config))
    (run / "summary.json").write_text(json.dumps({**config, "best_epoch": 1, "best_val_map": 50.0,
                                                  "best_test_map": test_map}).replace('"NAN"', "NaN"))


def test_the_summariser_counts_a_seed_once_and_survives_nan(tmp_path):
    write_run(tmp_path, 0, 60.0, "a")
    write_run(tmp_path, 0, 70.0, "a_rerun")   # the same seed again
    write_run(tmp_path, 1, 62.0, "b")
    write_run(tmp_path, 8, "NAN", "c")        # NaN written as JSON's NaN
    rows = summarize.read_runs([tmp_path])
    methods, datasets, cells = summarize.paper_cells(rows)
    assert [row["run"] for row in cells[(methods[0], "pascal")]] == ["a", "b"]
    text = summarize.summarize([tmp_path])
    assert "61.00 ± 1.41 (2)" in text
    assert "same configuration and seed as a: left out of the means over seeds" in text
    assert "best_test_map that is not a finite number (nan)" in text


def test_deterministic_kernels_on_request_and_as_a_resume_change(demo_root, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    real_fit = engine.Trainer.fit

    def fit(trainer):
        seen.append((trainer.config["deterministic"], torch.are_deterministic_algorithms_enabled(),
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real_fit(trainer)
    monkeypatch.setattr(engine.Trainer, "fit", fit)
    try:
        main_clip.main(main_clip.get_args_parser().parse_args(demo_argv(demo_root, tmp_path, *FAST, "--epochs", "1",
                                                                        "--run-name", "plain")))
        resumed = main_clip.main(main_clip.get_args_parser().parse_args(
            ["--output-dir", str(tmp_path), "--run-name", "plain", "--resume", "--epochs", "2", "--deterministic"]))
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [(False, False, None), (True, True, ":4096:8")]
    assert resumed["epochs_run"] == 2
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["deterministic"] is True
    assert "resume with deterministic False -> True" in (tmp_path / "plain" / "log.txt").read_text()
