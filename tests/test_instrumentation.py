"""RunLogger run files and the summariser, on small runs built in tmp_path."""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main_clip
import metrics
import rundir
from instrumentation import RunLogger
from reading import summarize

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 5
PHASE_LINE = re.compile(r"^\[(train|val|test)\] time: \d+\.\d{2} min, loss: (\d+\.\d{3}|n/a), "
                        r"map_clean: \d+\.\d{3}, map_observed: \d+\.\d{3}$")


def phase_data(rng, num_examples: int):
    clean = (rng.random((num_examples, NUM_CLASSES)) < 0.4).astype(np.float32)
    observed = np.where(clean == 1, rng.choice([0.0, 1.0], size=clean.shape), 0.0).astype(np.float32)
    scores = np.clip(0.5 * clean + 0.7 * rng.random(clean.shape), 0, 1).astype(np.float32)
    return scores, clean, observed


def run_phase(logger: RunLogger, phase: str, epoch: int, rng, num_examples: int = 20, batch: int = 6,
              loss: bool = True, as_tensors: bool = False) -> dict:
    scores, clean, observed = phase_data(rng, num_examples)
    logger.begin_phase(phase, epoch, num_examples, NUM_CLASSES)
    order = rng.permutation(num_examples)  # batches arrive in any order (shuffled loader)
    for start in range(0, num_examples, batch):
        idx = order[start:start + batch]
        args = (idx, scores[idx], clean[idx], observed[idx])
        if as_tensors:
            args = (torch.from_numpy(idx), torch.from_numpy(scores[idx]).to(torch.bfloat16).float(),
                    torch.from_numpy(clean[idx]), torch.from_numpy(observed[idx]))
        logger.record_batch(*args, loss=0.5 + 0.1 * start if loss else None)
    return logger.end_phase()


def make_run(root: Path, name: str, seed: int, lr: float = 1e-5, epochs: int = 3, loss: str = "EM_PL",
             **settings) -> dict:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"dataset": "pascal", "model": "resnet50", "method": loss, "seed": seed, "lr": lr, "alpha": 0.2,
              "bsize": 8, "epochs": epochs, "run_name": name, "output_dir": str(root), "resume": False,
              "num_workers": 2, **settings}
    with open(run_dir / "config.json", "w") as handle:
        json.dump(config, handle)
    rng = np.random.default_rng(seed * 100 + int(lr * 1e6))
    logger = RunLogger(run_dir, echo=False)
    for epoch in range(1, epochs + 1):
        run_phase(logger, "train", epoch, rng)
        val = run_phase(logger, "val", epoch, rng, loss=False)
        if logger.update_best(epoch, val["clean"]["map"]):
            logger.set_best_test(run_phase(logger, "test", epoch, rng, loss=False))
    summary = logger.finish(config, extra={"pseudo_labels": {"precision": 0.8, "recall": 0.5}})
    logger.close()
    return summary


def test_run_files(tmp_path):
    summary = make_run(tmp_path, "run_a", seed=0)
    run_dir = tmp_path / "run_a"
    log_lines = (run_dir / "log.txt").read_text().splitlines()
    phase_lines = [line for line in log_lines if line.startswith("[")]
    assert phase_lines and all(PHASE_LINE.match(line) for line in phase_lines), phase_lines
    assert all("loss: n/a" in line for line in phase_lines if not line.startswith("[train]"))
    assert log_lines[-3:] == [f"Best epoch: {summary['best_epoch']}",
                              f"Best epoch validation score: {summary['best_val_map']:.3f}",
                              f"Best epoch test score: {summary['best_test_map']:.3f}"]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len(phase_lines)
    metric_keys = {"map", *(f"{m}_{k}" for m in ("prec_at", "rec_at", "top") for k in (1, 3, 5))}
    for record in records:
        assert {"epoch", "phase", "time_min", "loss", "clean", "observed", "ap_clean"} <= set(record)
        assert set(record["clean"]) == set(record["observed"]) == metric_keys
        assert len(record["ap_clean"]) == NUM_CLASSES
        assert np.mean(record["ap_clean"]) == pytest.approx(record["clean"]["map"])
    vals = [r for r in records if r["phase"] == "val"]
    best = max(vals, key=lambda r: r["clean"]["map"])  # max() keeps the first of equal values
    test = [r for r in records if r["phase"] == "test" and r["epoch"] == best["epoch"]]

    stored = json.loads((run_dir / "summary.json").read_text())
    assert stored == summary
    assert stored["dataset"] == "pascal" and stored["model"] == "resnet50" and stored["method"] == "EM_PL"
    assert stored["seed"] == 0 and stored["epochs_run"] == 3
    assert stored["best_epoch"] == best["epoch"] and stored["best_val_map"] == best["clean"]["map"]
    assert stored["best_test_map"] == test[-1]["clean"]["map"]
    assert stored["test_ap_per_class"] == test[-1]["ap_clean"]
    assert stored["pseudo_labels"] == {"precision": 0.8, "recall": 0.5}


def test_end_phase_metrics_equal_metrics_module(tmp_path):
    rng = np.random.default_rng(3)
    scores, clean, observed = phase_data(rng, 30)
    logger = RunLogger(tmp_path, echo=False)
    logger.begin_phase("val", 1, 30, NUM_CLASSES)
    for idx in np.array_split(np.arange(30)[::-1], 4):
        logger.record_batch(torch.from_numpy(idx.copy()), torch.from_numpy(scores[idx]),
                            torch.from_numpy(clean[idx]), torch.from_numpy(observed[idx]))
    record = logger.end_phase()
    assert record["clean"] == metrics.compute_metrics(scores, clean)
    assert record["observed"] == metrics.compute_metrics(scores, observed)
    assert record["loss"] is None and record["num_examples"] == 30
    np.testing.assert_allclose(logger.last_ap_clean, metrics.average_precision_per_class(scores, clean))


def test_loss_is_mean_over_examples(tmp_path):
    logger = RunLogger(tmp_path, echo=False)
    logger.begin_phase("train", 1, 3, 2)
    logger.record_batch([0, 1], np.full((2, 2), 0.5), np.ones((2, 2)), np.ones((2, 2)), loss=1.0)
    logger.record_batch(torch.tensor([2]), torch.full((1, 2), 0.5), torch.ones(1, 2), torch.ones(1, 2),
                        loss=torch.tensor(4.0))
    assert logger.end_phase()["loss"] == pytest.approx(2.0)


def test_echo_prints_to_console(tmp_path, capsys):
    logger = RunLogger(tmp_path, echo=True)
    logger.log("hello")
    assert capsys.readouterr().out == "hello\n"
    logger.close()
    assert (tmp_path / "log.txt").read_text() == "hello\n"


def test_update_best_is_strict(tmp_path):
    logger = RunLogger(tmp_path, echo=False)
    assert logger.update_best(1, 50.0)
    assert not logger.update_best(2, 50.0)
    assert not logger.update_best(3, float("nan"))
    assert logger.update_best(4, 50.5)
    assert (logger.best_epoch, logger.best_val_map) == (4, 50.5)


def test_set_best_test_checks_epoch(tmp_path):
    logger = RunLogger(tmp_path, echo=False)
    logger.update_best(2, 10.0)
    with pytest.raises(ValueError, match="best epoch 2"):
        logger.set_best_test({"phase": "test", "epoch": 1, "clean": {"map": 1.0}, "ap_clean": []})


def test_bad_calls_raise(tmp_path):
    logger = RunLogger(tmp_path, echo=False)
    with pytest.raises(ValueError, match="phase must be one of"):
        logger.begin_phase("eval", 1, 4, 2)
    with pytest.raises(RuntimeError, match="outside a phase"):
        logger.record_batch([0], np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)))
    logger.begin_phase("val", 1, 4, 2)
    with pytest.raises(ValueError, match="scores has shape"):
        logger.record_batch([0, 1], np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="indices must lie"):
        logger.record_batch([3, 4], np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(RuntimeError, match="has not ended"):
        logger.begin_phase("test", 1, 4, 2)


def test_incomplete_phase_scores_recorded_examples_and_says_so(tmp_path):
    logger = RunLogger(tmp_path, echo=False)
    logger.begin_phase("train", 1, 4, 2)
    logger.record_batch([0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]), np.eye(2), np.eye(2), loss=1.0)
    record = logger.end_phase()
    assert record["num_examples"] == 2 and record["clean"]["map"] == 100.0
    assert "2 of 4 examples recorded" in (tmp_path / "log.txt").read_text()


def test_resume_restores_best_and_cuts_metrics_after_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    logger = RunLogger(tmp_path, echo=False)
    run_phase(logger, "train", 1, rng)
    logger.update_best(1, run_phase(logger, "val", 1, rng)["clean"]["map"])
    state = json.loads(json.dumps(logger.state_dict()))  # plain JSON types, as a checkpoint keeps them
    run_phase(logger, "train", 2, rng)  # crash after this phase, before the next checkpoint
    logger.close()

    resumed = RunLogger(tmp_path, resume=True, echo=False)
    resumed.load_state_dict(state)
    assert resumed.best_epoch == 1 and resumed.epochs_run == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in records] == [("train", 1), ("val", 1)]
    run_phase(resumed, "train", 2, rng)
    resumed.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    log = (tmp_path / "log.txt").read_text()
    assert log.count("[train]") == 3 and "cut back" in log  # log.txt was appended, not replaced


def test_resume_drops_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "pha')
    logger = RunLogger(tmp_path, resume=True, echo=False)
    run_phase(logger, "val", 2, np.random.default_rng(0))
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in records] == [1, 2] and records[1]["phase"] == "val"


def test_fresh_run_replaces_old_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"old": 1}\n')
    RunLogger(tmp_path, echo=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_summarize_rows_groups_and_problems(tmp_path):
    results = tmp_path / "results"
    runs = {name: make_run(results, name, seed=seed, lr=lr)
            for name, seed, lr in [("a_s0", 0, 1e-5), ("a_s1", 1, 1e-5), ("a_s8", 8, 1e-5), ("b_s0", 0, 1e-4)]}
    (results / "broken").mkdir()
    (results / "broken" / "config.json").write_text(json.dumps({"dataset": "coco", "seed": 3}))
    (results / "broken" / "summary.json").write_text('{"best_epoch": 2, "best_val')
    (results / "unfinished").mkdir()
    (results / "unfinished" / "config.json").write_text(json.dumps({"dataset": "coco", "loss": "EM", "seed": 1}))
    (results / "listy").mkdir()
    (results / "listy" / "summary.json").write_text("[1, 2]")
    (results / "notes").mkdir()  # not a run dir: skipped when scanning the parent

    text = summarize.summarize([results, tmp_path / "missing"])
    lines = text.splitlines()
    for name, summary in runs.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert f"{summary['best_val_map']:.2f}" in row and f"{summary['best_test_map']:.2f}" in row
        assert f" {summary['best_epoch']} " in row and "pascal" in row and "resnet50" in row
    broken = next(line for line in lines if line.startswith("broken "))
    assert "summary.json unreadable" in broken and "coco" in broken
    assert "no summary.json" in next(line for line in lines if line.startswith("unfinished "))
    assert "no such directory" in next(line for line in lines if "missing" in line)
    listy = next(line for line in lines if line.startswith("listy "))
    assert "summary.json is not a JSON object" in listy and "no config.json" in listy
    assert not any(line.startswith("notes") for line in lines)

    group_line = next(line for line in lines if "lr=1e-05" in line)
    vals = [runs[n]["best_val_map"] for n in ("a_s0", "a_s1", "a_s8")]
    tests = [runs[n]["best_test_map"] for n in ("a_s0", "a_s1", "a_s8")]
    assert "pascal resnet50 EM_PL" in group_line and " 3 " in group_line and "0,1,8" in group_line
    assert f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" in group_line
    assert f"{statistics.mean(tests):.2f} ± {statistics.stdev(tests):.2f}" in group_line
    assert statistics.stdev(vals) == pytest.approx(np.std(vals, ddof=1))
    assert not any("lr=0.0001" in line for line in lines)  # a single run is no seed group


def test_summarize_single_run_dir_and_cli(tmp_path):
    make_run(tmp_path, "only", seed=2, epochs=2)
    text = summarize.summarize([tmp_path / "only"])
    assert "only" in text and "differing only in seed" not in text
    result = subprocess.run([sys.executable, "instrumentation.py", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == summarize.summarize([tmp_path])
    assert result.stdout.splitlines()[0].split()[:4] == ["run", "dataset", "model", "method"]


def test_runs_from_before_a_setting_and_kernel_choices_share_a_seed_group(tmp_path):
    """A config.json without "teacher" ran the default teacher, one without "head" the linear head;
    --deterministic chooses kernels."""
    results = tmp_path / "results"
    make_run(results, "old_s0", seed=0)
    make_run(results, "new_s1", seed=1, teacher="ViT-L-14-336", deterministic=True, head="linear")
    make_run(results, "new_s8", seed=8, teacher="ViT-L-14-336", deterministic=False, head="linear")
    make_run(results, "other_s0", seed=0, teacher="ViT-B-16")
    make_run(results, "other_s1", seed=1, teacher="ViT-B-16")
    make_run(results, "cam_s0", seed=0, head="boostlu")
    groups = summarize.seed_groups(summarize.read_runs([results]))
    assert sorted(sorted(row["run"] for row in group) for group in groups.values()) == [
        ["cam_s0"], ["new_s1", "new_s8", "old_s0"], ["other_s0", "other_s1"]]
    assert main_clip.get_args_parser().get_default("head") == rundir.ADDED_SETTINGS["head"]
