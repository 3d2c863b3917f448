"""sweep.py: sweeps of main_clip.py runs through submitit. Sweep files and presets (read from the
method registry), the debug executor (in this process) and the local executor (subprocesses) on
the demo data, re-launches that skip finished runs and resume killed ones to the numbers of a run
in one go, a task preempted by submitit's signal and requeued, torchrun-style runs of several
processes, the grid selection by val mAP (against a hand computation from the run folders) in
the summariser, and what the SLURM executor submits (a fake sbatch: no cluster here)."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
import torch

import config as config_module
import datasets
import engine
import main_clip
import methods
import rundir
import sweep
from reading import summarize

FAST = ("--train-mode", "linear_fixed_features")
GRID_2x2x2 = ("--axis", "method=an,EM", "--axis", "seed=0,1", "--axis", "head_lr=1e-2,1e-3")


def base(demo_root: Path, out: Path, *extra: str) -> list[str]:
    """main_clip.py flags of tiny frozen-feature runs on the demo data (about a second each in process)."""
    return ["-d", "pascal", "--data-root", str(demo_root), "--output-dir", str(out), "--tiny-models",
            "--num-workers", "0", "--epochs", "1", *FAST, *extra]


def run_sweep(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = sweep.cli(list(args))
    return code, capsys.readouterr().out


def hand_run(demo_root: Path, out: Path, *flags: str) -> dict:
    """The same run as main_clip.py runs it from these flags, in its default folder."""
    return main_clip.main(main_clip.get_args_parser().parse_args(base(demo_root, out, *flags)))


def summaries(out: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in sorted(out.glob("*/summary.json"))}


def record(out: Path, name: str, run: str) -> dict:
    return json.loads((out / f"sweep_{name}" / "tasks" / f"{run}.json").read_text())


# -- sweep files, presets, flags ---------------------------------------------------------------------

def test_a_sweep_file_expands_to_the_runs_main_clip_names_with_the_registrys_protocols(tmp_path):
    spec = {"name": "t", "base": ["--output-dir", str(tmp_path), "--data-root", "data"],
            "axes": {"-l": ["an", "VLPL"], "dataset": ["pascal", "coco"], "seed": [0, 8]},
            "cells": [{"where": {"method": "an", "dataset": "coco"}, "flags": ["--bsize", "16"]},
                      {"where": {"method": "VLPL"}, "flags": "--patience 2"}]}
    built = sweep.build_sweep(spec, ["--epochs", "3"])
    assert len(built.runs) == 8 and built.output_dir == tmp_path and built.columns == ["method", "dataset", "seed"]
    for run in built.runs:
        args = main_clip.get_args_parser().parse_args(run.argv)
        expected = config_module.resolve_config(args)
        assert run.name == expected["run_name"] == config_module.default_run_name(expected)  # a hand run's folder
        method, dataset = run.config["method"], run.config["dataset"]
        protocol = methods.get_method(method).defaults(dataset)
        assert run.config["lr"] == protocol["lr"] and run.config["epochs"] == 3
        assert run.config["bsize"] == (16 if (method, dataset) == ("an", "coco") else protocol["bsize"])
        assert run.config["patience"] == (2 if method == "EM_PL" else protocol["patience"])
    assert {run.config["method"] for run in built.runs} == {"an", "EM_PL"}
    # The same configuration twice is one run.
    twice = sweep.build_sweep({"base": ["--output-dir", str(tmp_path)], "axes": {"seed": [0, 0, 1]}})
    assert len(twice.runs) == 2 and "counted once" in twice.notes[0]


def test_presets_read_each_methods_protocol_from_the_registry(tmp_path):
    extra = ["--output-dir", str(tmp_path), "--data-root", "data"]
    assert {"vlpl", "large-loss", "protocols", "cole-grid", "aevlp"} <= set(sweep.presets())
    published = {name: [d for d in datasets.DATASETS if method.protocol_row(d) is not methods.NO_PROTOCOL]
                 for name, method in methods.REGISTRY.items()}
    everything = sweep.build_sweep(sweep.load_spec("protocols"), extra)
    assert sorted((r.config["method"], r.config["dataset"], r.config["seed"]) for r in everything.runs) == sorted(
        (m, d, s) for m, ds in published.items() for d in ds for s in (0, 1, 8))
    for run in everything.runs:   # nothing repeated in the preset: the registry's values
        protocol = methods.get_method(run.config["method"]).defaults(run.config["dataset"])
        assert all(run.config[key] == protocol[key] for key in ("lr", "bsize", "optimizer", "patience", "max_drop"))
    vlpl = sweep.build_sweep(sweep.load_spec("vlpl"), extra)
    assert len(vlpl.runs) == 5 * 4 * 3
    by_cell = {(r.config["method"], r.config["dataset"], r.config["seed"]): r.config for r in vlpl.runs}
    assert by_cell[("an", "coco", 1)]["bsize"] == 16 and by_cell[("an", "pascal", 1)]["bsize"] == 8
    assert by_cell[("EM_APL", "cub", 8)]["patience"] == 1 and by_cell[("EM_PL", "coco", 0)]["patience"] == 0
    assert by_cell[("LL-R", "pascal", 0)]["optimizer"] == methods.get_method("LL-R").defaults("pascal")["optimizer"]
    grid = sweep.build_sweep(sweep.load_spec("cole-grid"), extra)
    assert grid.select_by == "val" and grid.grid == ["lr", "bsize"]
    assert len(grid.runs) == sum(len(published[m]) for m in ("an", "an_ls", "wan", "epr", "role")) * 3 * 4 * 2
    assert {r.config["lr"] for r in grid.runs} == {1e-2, 1e-3, 1e-4, 1e-5}


def test_mistakes_in_a_sweep_are_one_line(tmp_path, capsys):
    for args, message in ((["--axis", "nope=1"], "'nope' is not a flag of main_clip.py"),
                          (["--axis", "run_name=x"], "a sweep names and resumes its runs itself"),
                          (["--axis", "method=an,nope"], "unknown method 'nope'"),
                          (["--axis", "seed=0", "--select-by", "val"], "select_by needs a grid")):
        capsys.readouterr()
        assert sweep.cli(["plan", *args, "--", "--output-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sweep.cli(["plan", "no-such-preset"]) == 2
    assert "neither a sweep file nor a preset" in capsys.readouterr().err


def test_local_slots_give_each_run_its_gpus():
    """--executor local: N runs at once on N GPUs (each its own, made visible to it alone), or
    one run of k processes per k GPUs; on CPUs one at a time unless --parallel says more."""
    assert sweep.local_slots([0, 1, 2, 3], 1, None) == [(0,), (1,), (2,), (3,)]
    assert sweep.local_slots([0, 1, 2, 3], 2, None) == [(0, 1), (2, 3)]
    assert sweep.local_slots([4, 5, 6, 7], 1, 2) == [(4,), (5,)]
    assert sweep.local_slots([], 1, None) == [()] and sweep.local_slots([], 1, 3) == [(), (), ()]
    with pytest.raises(sweep.SweepError, match="offers 1 GPU"):
        sweep.local_slots([0], 2, None)
    assert sweep.local_gpus("none") == [] and sweep.local_gpus("2,3") == [2, 3]


# -- the debug executor: in this process ---------------------------------------------------------------

def test_a_2x2x2_sweep_runs_relaunches_nothing_and_selects_the_best_val_point(demo_root, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "results"
    args = ("launch", "--executor", "debug", "--name", "grid", *GRID_2x2x2, "--select-by", "val",
            "--", *base(demo_root, out))
    code, text = run_sweep(capsys, *args)
    assert code == 0, text
    runs = summaries(out)
    assert len(runs) == 8 and "8 run(s) finished now, 0 failed" in text
    # Each run is the run main_clip.py makes of the same flags: same folder name, same numbers.
    single = hand_run(demo_root, tmp_path / "by-hand", "-l", "EM", "-s", "1", "--head-lr", "1e-3")
    name = next((tmp_path / "by-hand").iterdir()).name
    assert runs[name] == single

    # A re-launch runs nothing: every run is finished.
    stamps = {path: path.stat().st_mtime_ns for path in out.glob("pascal_*/*")}
    monkeypatch.setattr(main_clip, "main", lambda *a, **k: pytest.fail("a finished run ran again"))
    code, text = run_sweep(capsys, *args)
    assert code == 0 and "8 runs, 0 to run, 8 skipped" in text and "0 run(s) finished now" in text
    assert {path: path.stat().st_mtime_ns for path in out.glob("pascal_*/*")} == stamps

    code, text = run_sweep(capsys, "status", str(out / "sweep_grid"))
    assert code == 0 and text.startswith(f"sweep grid: 8 runs in {out}: 8 finished, 0 running, 0 failed, 0 pending")
    assert "head_lr" in text.splitlines()[2]

    # The selection against a hand computation from the run folders.
    by_group: dict[tuple, list[tuple[float, float, str]]] = {}
    for folder in sorted(p for p in out.iterdir() if (p / "summary.json").is_file()):
        config = json.loads((folder / "config.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
        by_group.setdefault((config["method"], config["dataset"], config["seed"]), []).append(
            (summary["best_val_map"], summary["best_test_map"], folder.name))
    selection = json.loads((out / "selection_grid.json").read_text())
    assert selection["grid"] == ["head_lr"] and selection["select_by"] == "val" and len(selection["groups"]) == 4
    for group in selection["groups"]:
        points = by_group[(group["method"], group["dataset"], group["seed"])]
        best_val = max(val for val, _, _ in points)
        assert group["val_map"] == best_val and group["complete"] and group["grid_points"] == 2
        assert (group["val_map"], group["test_map"], group["selected"]) in points
        assert group["settings"]["head_lr"] == json.loads((out / group["selected"] / "config.json").read_text())["head_lr"]

    # The summariser marks the selected runs and tabulates them per method (mean over seeds).
    report = summarize.summarize([out])
    for group in selection["groups"]:
        line = next(line for line in report.splitlines() if line.startswith(group["selected"]))
        assert "selected by val mAP in sweep grid" in line
    selected = report.split("Grid selection (sweep.py --select-by val)")[1]
    for method in ("an", "EM"):
        tests = [g["test_map"] for g in selection["groups"] if g["method"] == method]
        mean, spread = sum(tests) / 2, abs(tests[0] - tests[1]) / 2 ** 0.5
        assert f"{method}  " in selected and f"{mean:.2f} ± {spread:.2f} (2)" in selected


def test_a_killed_run_is_resumed_by_the_relaunch_to_the_numbers_of_a_run_in_one_go(demo_root, tmp_path, capsys,
                                                                                   monkeypatch):
    args = ("--executor", "debug", "--name", "cut", "--axis", "seed=0,1")
    flags = ("-l", "EM", "--epochs", "2", "--head-lr", "1e-2")
    out = tmp_path / "results"
    run_epoch = engine.Trainer.run_epoch

    def killed(trainer, epoch, stage):   # Ctrl-C in seed 1's second epoch
        if epoch == 2 and trainer.config["seed"] == 1:
            raise KeyboardInterrupt
        run_epoch(trainer, epoch, stage)
    with monkeypatch.context() as patch:
        patch.setattr(engine.Trainer, "run_epoch", killed)
        code, _ = run_sweep(capsys, "launch", *args, "--", *base(demo_root, out, *flags))
    assert code == 130
    cut = next(p for p in out.iterdir() if "seed1" in p.name)
    assert rundir.is_started(cut) and not (cut / "summary.json").exists()
    assert torch.load(cut / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    code, text = run_sweep(capsys, "status", str(out / "sweep_cut"))
    assert "1 finished, 0 running, 1 failed, 0 pending" in text
    assert f"{cut.name}: interrupted (Ctrl-C, cancelled or killed); a launch resumes it" in text

    code, text = run_sweep(capsys, "launch", *args, "--", *base(demo_root, out, *flags))
    assert code == 0 and "2 runs, 1 to run, 1 skipped" in text and f"finished {cut.name}" in text
    assert json.loads((cut / "config.json").read_text())["resume"] is True
    assert record(out, "cut", cut.name)["resumed"] is True

    whole = tmp_path / "whole"
    assert run_sweep(capsys, "launch", *args, "--", *base(demo_root, whole, *flags))[0] == 0
    assert summaries(out) == summaries(whole)
    metrics = [[{k: v for k, v in json.loads(line).items() if "time" not in k} for line in
                (folder / cut.name / "metrics.jsonl").read_text().splitlines()] for folder in (out, whole)]
    assert metrics[0] == metrics[1] and len(metrics[0]) >= 4


# -- SLURM: what submitit would submit (a fake sbatch records it) -----------------------------------------

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """srun and sbatch on PATH: submitit's SLURM executor takes this for a login node; sbatch keeps
    each script it is given and answers with job 4242."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "sbatch-scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {scripts}/script_$(ls {scripts} | wc -l).sh\n'
                                    f'echo "Submitted batch job 4242"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def test_the_slurm_executor_submits_one_array_task_per_run_with_the_options(demo_root, tmp_path, capsys,
                                                                            fake_slurm, monkeypatch):
    out = tmp_path / "results"
    options = ("--executor", "slurm", "--partition", "gpu", "--account", "proj", "--time", "600", "--qos", "high",
               "--gpus-per-run", "2", "--cpus-per-task", "10", "--mem-gb", "64", "--array-parallelism", "3",
               "--setup", "module load cuda", "--slurm-additional", "exclude=node7")
    args = ("launch", "--name", "cluster", "--axis", "method=an,EM", "--axis", "seed=0,1", *options,
            "--", *base(demo_root, out, "--head-lr", "1e-2"))
    code, text = run_sweep(capsys, *args[:1], "--dry-run", *args[1:])
    assert code == 0 and "#SBATCH --array=0-3%3" in text and not list(fake_slurm.iterdir())

    code, text = run_sweep(capsys, *args)
    assert code == 0 and "submitted 4 run(s) to SLURM: job 4242 (an array)" in text
    [script] = [path.read_text() for path in fake_slurm.iterdir()]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --time=600",
                 "#SBATCH --array=0-3%3", "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --mem=64GB", "#SBATCH --nodes=1", "#SBATCH --exclude=node7",
                 "#SBATCH --job-name=sweep-cluster", "#SBATCH --signal=USR2@90", "module load cuda"):
        assert line in script.splitlines(), line
    assert f"{sys.executable} -u -m submitit.core._submit {out / 'sweep_cluster' / 'jobs'}" in script
    built = sweep.build_sweep(sweep.load_spec(str(out / "sweep_cluster")))
    executor = sweep.slurm_executor(built, sweep.get_args_parser().parse_args(["launch", *options]))
    assert {"partition": "gpu", "account": "proj", "time": 600, "gpus_per_node": 2, "ntasks_per_node": 2,
            "array_parallelism": 3}.items() <= executor._executor.parameters.items()

    # Each array task's pickle is RunTask on its run's flags; run one here as its SLURM task would.
    jobs = out / "sweep_cluster" / "jobs"
    tasks = [submitit.helpers.DelayedSubmission.load(jobs / f"4242_{i}_submitted.pkl") for i in range(4)]
    assert [task.args[1] for task in tasks] == [run.name for run in built.runs]
    for task, run in zip(tasks, built.runs):
        assert isinstance(task.function, sweep.RunTask) and task.args[0] == run.argv + ["--gpu=0"]
    assert tasks[0].result()["outcome"] == "finished"
    code, text = run_sweep(capsys, "status", str(out / "sweep_cluster"))
    assert "1 finished, 0 running, 0 failed, 3 pending" in text and "queued as job 4242_1" in text
    # Preemption: submitit's hook gives the same task again, which resumes the started run.
    again = sweep.RunTask().checkpoint(*tasks[1].args)
    assert isinstance(again.function, sweep.RunTask) and again.args == tasks[1].args
    assert record(out, "cluster", built.runs[1].name)["state"] == "requeued"


# -- the local executor: subprocesses ------------------------------------------------------------------

def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_local_runs_in_subprocesses_and_a_preempted_task_is_requeued_and_resumed(demo_root, tmp_path, capsys):
    """Two runs at once, each a subprocess of submitit's local executor; one is sent submitit's
    preemption signal mid-run: its task records the requeue, the local executor starts it again
    and it resumes from last.pt. Both end with the numbers of the same runs made in this process
    in one go."""
    out = tmp_path / "results"
    flags = base(demo_root, out, "--epochs", "8", "--head-lr", "1e-2")
    args = ["launch", "--name", "pre", "--parallel", "2", "--axis", "method=an,EM", "--", *flags]
    outcome = {}
    launcher = threading.Thread(target=lambda: outcome.update(code=sweep.cli(args)), daemon=True)
    launcher.start()
    built = sweep.build_sweep({"name": "pre", "axes": {"method": ["an", "EM"]}}, flags)
    target = built.runs[0].name
    records = out / "sweep_pre" / "tasks"
    wait_for(lambda: (records / f"{target}.json").is_file(), 180, "the task to start")
    task_pid = record(out, "pre", target)["pid"]
    metrics = out / target / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 180, "its first epoch")
    assert not (out / target / "summary.json").exists(), "the run ended before the signal: give it more epochs"
    os.kill(task_pid, submitit.JobEnvironment._usr_sig())
    launcher.join(timeout=300)
    output = capsys.readouterr().out
    assert not launcher.is_alive() and outcome.get("code") == 0, output[-3000:]
    assert "2 run(s) finished now, 0 failed" in output and task_pid != os.getpid()
    requeued = record(out, "pre", target)
    assert requeued["state"] == "finished" and requeued["requeues"] == 1 and requeued["resumed"] is True
    assert requeued["executor"] == "local" and requeued["pid"] not in (task_pid, os.getpid())
    assert json.loads((out / target / "config.json").read_text())["resume"] is True
    assert "resumed from" in (out / target / "log.txt").read_text()

    in_process = tmp_path / "in-process"
    for method in ("an", "EM"):
        main_clip.main(main_clip.get_args_parser().parse_args(
            base(demo_root, in_process, "--epochs", "8", "--head-lr", "1e-2", "-l", method)))
    assert summaries(out) == summaries(in_process)


def test_a_run_given_two_gpus_runs_as_two_torchrun_style_processes(demo_root, tmp_path, capsys):
    """--gpus-per-run 2: the local executor starts two tasks, submitit's TorchDistributedEnvironment
    makes them one torchrun-style run (gloo on CPUs); the global batch is the one-process run's."""
    out = tmp_path / "results"
    code, text = run_sweep(capsys, "launch", "--name", "two", "--gpus-per-run", "2", "--gpus", "none",
                           "--axis", "method=an", "--", *base(demo_root, out, "--head-lr", "1e-2"))
    assert code == 0, text
    [(name, summary)] = summaries(out).items()
    assert summary["world_size"] == 2 and record(out, "two", name)["tasks"] == 2
    single = hand_run(demo_root, tmp_path / "one", "-l", "an", "--head-lr", "1e-2")
    assert summary["best_val_map"] == pytest.approx(single["best_val_map"], abs=1e-4)
