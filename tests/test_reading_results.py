"""evaluate.py, predict.py and the summariser's paper table and plots, on one tiny demo run."""
from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import datasets
import evaluate
import main_clip
import predict
from conftest import demo_args
from errors import RunError
from reading import cli, plots, saved_run, summarize


@pytest.fixture(scope="module")
def run_dir(demo_root, tmp_path_factory) -> Path:
    """One finished 2-epoch EM_PL run (tiny ResNet) on the demo data."""
    out = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        main_clip.main(demo_args(demo_root, out, "-l", "EM_PL", "--run-name", "r"))
    return out / "r"


@pytest.fixture(scope="module")
def clip_run_dir(demo_root, tmp_path_factory) -> Path:
    """A finished run whose student copies the CLIP tower: it sees the teacher's view."""
    out = tmp_path_factory.mktemp("clip-runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        main_clip.main(demo_args(demo_root, out, "-l", "an", "-m", "clip_vision", "--epochs", "1", "--run-name", "c"))
    return out / "c"


def copy_run(run_dir: Path, dest: Path, without: tuple[str, ...] = ()) -> Path:
    def ignore(folder, names):
        return [name for name in names if name in without or name.startswith("eval_")]
    shutil.copytree(run_dir, dest, ignore=ignore)
    return dest


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- evaluate.py ---------------------------------------------------------------------------------

def test_evaluate_best_on_test_is_the_reported_result(run_dir, capsys):
    result = evaluate.main(evaluate.get_args_parser().parse_args([str(run_dir), "--device", "cpu"]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["clean"]["map"] == pytest.approx(summary["best_test_map"], abs=1e-9)
    np.testing.assert_allclose(result["ap_clean"], summary["test_ap_per_class"], atol=1e-9)
    assert result["epoch"] == summary["best_epoch"] and result["num_images"] == 60
    test_record = next(r for r in records(run_dir) if r["phase"] == "test" and r["epoch"] == summary["best_epoch"])
    assert result["observed"]["map"] == pytest.approx(test_record["observed"]["map"], abs=1e-9)
    assert json.loads((run_dir / "eval_test_best.json").read_text()) == result
    out = capsys.readouterr().out
    assert f"map_clean: {summary['best_test_map']:.3f}, map_observed: {test_record['observed']['map']:.3f}" in out


def test_evaluate_last_on_val_equals_the_last_epoch(run_dir):
    result = evaluate.main(evaluate.get_args_parser().parse_args(
        [str(run_dir), "--split", "val", "--checkpoint", "last", "--batch-size", "7"]))
    last_val = [r for r in records(run_dir) if r["phase"] == "val"][-1]
    assert result["epoch"] == last_val["epoch"] == 2
    assert result["clean"]["map"] == pytest.approx(last_val["clean"]["map"], abs=1e-6)
    assert (run_dir / "eval_val_last.json").is_file()


# -- predict.py ----------------------------------------------------------------------------------

def test_predict_gives_evaluate_probabilities(run_dir, tmp_path, capsys):
    run = saved_run.load_run(run_dir, "best", "cpu")
    scores, _, paths = evaluate.score_split(run, "test")
    images = tmp_path / "images"
    (images / "nested" / "deeper").mkdir(parents=True)
    chosen = list(range(0, len(paths), 6))
    for n, index in enumerate(chosen):
        shutil.copy(paths[index], images / ("nested/deeper" if n % 2 else "") / Path(paths[index]).name)
    (images / "nested" / "broken.jpg").write_bytes(b"not an image")
    (images / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "p.csv"

    result = predict.main(predict.get_args_parser().parse_args(
        [str(run_dir), str(images), "--out", str(out), "--threshold", "0.6", "--top-k", "3", "--batch-size", "4"]))
    assert "broken.jpg" in capsys.readouterr().err
    assert [p.name for p in result["skipped"]] == ["broken.jpg"]
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(chosen)
    names = list(run.class_names)
    expected = {Path(paths[index]).name: scores[index] for index in chosen}
    for row in rows:
        probabilities = np.array([float(row[name]) for name in names])
        np.testing.assert_allclose(probabilities, expected[Path(row["image"]).name], rtol=0, atol=1e-6)
        ranked = [names[c] for c in np.argsort(-probabilities, kind="stable")]
        assert row["top_3"].split(";") == ranked[:3]
        assert row["predicted"] == ";".join(name for name in ranked if probabilities[names.index(name)] >= 0.6)


def test_clip_student_sees_the_run_view(clip_run_dir, tmp_path):
    result = evaluate.main(evaluate.get_args_parser().parse_args([str(clip_run_dir)]))
    summary = json.loads((clip_run_dir / "summary.json").read_text())
    assert result["clean"]["map"] == pytest.approx(summary["best_test_map"], abs=1e-9)
    run = saved_run.load_run(clip_run_dir, "best", "cpu")
    assert run.view is not None
    scores, _, paths = evaluate.score_split(run, "test")
    out = tmp_path / "p.csv"
    predict.main(predict.get_args_parser().parse_args([str(clip_run_dir), *paths[:3], "--out", str(out)]))
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    probabilities = np.array([[float(row[name]) for name in run.class_names] for row in rows])
    np.testing.assert_allclose(probabilities, scores[:3], rtol=0, atol=1e-6)


# -- bad input: one line, exit code 2, nothing written --------------------------------------------

def _incompatible_config(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    del config["image_size"]
    (run / "config.json").write_text(json.dumps(config))


def _other_architecture(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    config["model"] = "convnext_xlarge_1k"
    (run / "config.json").write_text(json.dumps(config))
    state = checkpoint.load_checkpoint(run / "best.pt")
    state["config"]["model"] = "convnext_xlarge_1k"
    torch.save({**state, checkpoint.CHECKSUM: checkpoint.checksum(state)}, run / "best.pt")


def _checkpoint_without_checksum(run: Path) -> None:
    torch.save(checkpoint.load_checkpoint(run / "best.pt"), run / "best.pt")  # as versions before checksums


@pytest.mark.parametrize("tool", ["evaluate", "predict"])
@pytest.mark.parametrize("case, message", [
    ("not_a_run", "is not a run folder: no config.json"),
    ("no_checkpoint", "has no best.pt"),
    ("incompatible_config", "lacks image_size: it comes from an incompatible version"),
    ("other_architecture", "does not fit the model config.json describes"),
    ("old_checkpoint", "not a checkpoint of this code (no checksum)"),
])
def test_bad_run_folder(run_dir, tmp_path, capsys, tool, case, message):
    if case == "not_a_run":
        target = tmp_path / "notes"
        target.mkdir()
        (target / "readme.txt").write_text("x")
    else:
        target = copy_run(run_dir, tmp_path / "copy", without=("best.pt",) if case == "no_checkpoint" else ())
        {"incompatible_config": _incompatible_config, "other_architecture": _other_architecture,
         "old_checkpoint": _checkpoint_without_checksum, "no_checkpoint": lambda run: None}[case](target)
    before = sorted(p.name for p in target.iterdir())
    out = tmp_path / "p.csv"
    argv = [str(target)] + ([str(run_dir.parent)] if tool == "predict" else []) + (
        ["--out", str(out)] if tool == "predict" else [])
    code = {"evaluate": evaluate.cli, "predict": predict.cli}[tool](argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in target.iterdir()) == before and not out.exists()


def test_predict_bad_inputs(run_dir, tmp_path, capsys):
    args = predict.get_args_parser().parse_args
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "bad.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "p.csv"
    with pytest.raises(RunError, match="no such file or folder"):
        predict.main(args([str(run_dir), str(tmp_path / "missing"), "--out", str(out)]))
    with pytest.raises(RunError, match="none of the 1 images could be read"):
        predict.main(args([str(run_dir), str(empty), "--out", str(out)]))
    (empty / "bad.png").unlink()
    with pytest.raises(RunError, match="no images found"):
        predict.main(args([str(run_dir), str(empty), "--out", str(out)]))
    with pytest.raises(RunError, match="--threshold"):
        predict.main(args([str(run_dir), str(empty), "--threshold", "2"]))
    assert not out.exists()


# -- the summariser: the paper's table -------------------------------------------------------------

def fake_run(root: Path, dataset: str, loss: str, seed: int, test: float | None, **config) -> Path:
    run = root / f"{dataset}_{loss}_s{seed}_{len(list(root.glob('*'))) if root.exists() else 0}"
    run.mkdir(parents=True)
    full = {"dataset": dataset, "model": "resnet50", "loss": loss, "seed": seed, "lr": 1e-5, "run_name": run.name,
            **config}
    (run / "config.json").write_text(json.dumps(full))
    (run / "summary.json").write_text(json.dumps({"best_epoch": 1, "best_val_map": 50.0, "best_test_map": test,
                                                  "test_ap_per_class": [test or 0.0] * 20, "pseudo_labels": None}))
    return run


@pytest.fixture
def results(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "results"
    tests = {("pascal", "EM_PL"): [70.0, 72.0, 77.0], ("coco", "EM_PL"): [60.5], ("pascal", "an"): [50.0, 52.0],
             ("cub", "EM"): [20.0, 21.0]}
    for (dataset, loss), values in tests.items():
        for seed, value in zip((0, 1, 8), values):
            fake_run(root, dataset, loss, seed, value)
    fake_run(root, "pascal", "EM_PL", 0, 40.0, lr=1e-4)  # another configuration: its own row
    fake_run(root, "coco", "EM", 0, None)                 # no test mAP: in no cell
    return root, tests


def test_the_selected_runs_table_alone(tmp_path, capsys):
    """--selected: the paper's table of the runs a selection file chose, mean over their seeds."""
    root = tmp_path / "results"
    chosen = [fake_run(root, "pascal", "an", seed, value, lr=lr) for seed, value, lr in ((0, 61.0, 1e-4), (1, 65.0, 1e-5))]
    for seed, value, lr in ((0, 40.0, 1e-5), (1, 30.0, 1e-4)):     # the grid points not chosen
        fake_run(root, "pascal", "an", seed, value, lr=lr)
    groups = [{"method": "an", "dataset": "pascal", "seed": seed, "selected": run.name, "axes": {},
               "complete": True, "finished": 2, "grid_points": 2} for seed, run in enumerate(chosen)]
    (root / "selection_grid.json").write_text(json.dumps({"sweep": "grid", "select_by": "val", "groups": groups}))
    assert cli.main([str(root), "--format", "csv", "--selected"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("an,") and lines[1].endswith(",63.0000,2.8284,2")
    assert cli.main([str(root), "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3     # every configuration: one row per lr
    assert cli.main([str(root), "--selected"]) == 2
    assert "--format markdown" in capsys.readouterr().err
    (root / "selection_grid.json").unlink()
    assert cli.main([str(root), "--format", "markdown", "--selected"]) == 2
    assert "sweep.py --select-by val" in capsys.readouterr().err


def test_paper_columns_are_the_registry_titles_in_its_order():
    """The summariser writes the titles out rather than import datasets (and torch); they must agree."""
    assert list(summarize.PAPER_DATASETS.items()) == list(datasets.PAPER_TITLES.items())


def test_paper_table_text_markdown_csv_latex(results):
    root, tests = results
    rows = summarize.read_runs([root])
    text = summarize.paper_table(rows, "text").splitlines()
    assert text[0] == summarize.PAPER_TITLE + ":"
    assert text[1].split() == ["method", "VOC", "COCO", "CUB"]  # datasets in the paper's order
    body = {line.split("  ")[0]: line for line in text[3:]}
    assert list(body) == ["an", "EM", "EM_PL (lr 0.0001)", "EM_PL (lr 1e-05)"]  # methods in the paper's order
    vlpl = tests[("pascal", "EM_PL")]
    assert f"{statistics.mean(vlpl):.2f} ± {statistics.stdev(vlpl):.2f} (3)" in body["EM_PL (lr 1e-05)"]
    assert "60.50 (1)" in body["EM_PL (lr 1e-05)"] and "40.00 (1)" in body["EM_PL (lr 0.0001)"]
    assert body["an"].split()[-1] == "-" and "20.50 ± 0.71 (2)" in body["EM"]

    markdown = summarize.paper_table(rows, "markdown").splitlines()
    assert markdown[0] == "| method | VOC | COCO | CUB |" and markdown[1] == "|---|---|---|---|"
    assert markdown[2] == "| an | 51.00 ± 1.41 (2) | - | - |"

    table = list(csv.reader(summarize.paper_table(rows, "csv").splitlines()))
    assert table[0][:4] == ["method", "VOC mean", "VOC std", "VOC seeds"]
    em_pl = next(line for line in table if line[0] == "EM_PL (lr 1e-05)")
    assert float(em_pl[1]) == pytest.approx(statistics.mean(vlpl), abs=1e-4)
    assert float(em_pl[2]) == pytest.approx(statistics.stdev(vlpl), abs=1e-4) and em_pl[3] == "3"
    assert em_pl[4:7] == ["60.5000", "", "1"]

    latex = summarize.paper_table(rows, "latex")
    assert "\\begin{tabular}{lccc}" in latex and "Method & VOC & COCO & CUB \\\\" in latex
    assert "EM\\_PL (lr 1e-05) & 73.00 $\\pm$ 3.61 (3) & 60.50 (1) & -- \\\\" in latex


def test_summariser_cli_formats_and_errors(results, tmp_path, capsys):
    root, _ = results
    assert cli.main([str(root), "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("| method | VOC | COCO | CUB |\n")
    assert cli.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run ") and summarize.PAPER_TITLE in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main([str(empty), "--plot", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run folders") and err.count("\n") == 1
    assert not (tmp_path / "plots").exists()


# -- plots -------------------------------------------------------------------------------------------

def test_plots(run_dir, results, tmp_path, capsys):
    root, _ = results
    without_cache = copy_run(run_dir, tmp_path / "runs" / "no_cache")
    log = re.sub(r"^teacher(\S*) train:", r"teacher\1 (moved) train:", (without_cache / "log.txt").read_text(),
                 flags=re.MULTILINE)
    assert "(moved) train:" in log
    (without_cache / "log.txt").write_text(log)
    out = tmp_path / "plots"
    assert cli.main([str(run_dir), str(root), str(without_cache), "--plot", str(out)]) == 0
    err = capsys.readouterr().err
    for name in ("map_curves.png", "test_ap_per_class.png", "pseudo_labels_per_class.png"):
        with Image.open(out / "r" / name) as image:
            assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 300
    assert (out / "no_cache" / "map_curves.png").is_file()
    assert not (out / "no_cache" / "pseudo_labels_per_class.png").exists()
    assert "no_cache: no per-class pseudo-label plot: log.txt names no teacher embedding cache" in err
    fake = next(p.name for p in root.iterdir())
    assert (out / fake / "test_ap_per_class.png").is_file() and not (out / fake / "map_curves.png").exists()
    with Image.open(out / "test_map_by_method.png") as image:
        assert image.size[0] > 2 * image.size[1]  # three dataset panels side by side (VOC, COCO, CUB)


def test_pseudo_label_quality_gives_back_the_run_report(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    quality, reason = plots.pseudo_label_quality(run_dir, config, summary)
    assert reason == "" and len(quality["precision"]) == 20
    positives, true = np.array(quality["positives"]), np.array(quality["true"])
    hits = np.array(quality["recall"]) * true
    assert hits.sum() / positives.sum() == pytest.approx(summary["pseudo_labels"]["precision"])
    assert hits.sum() / true.sum() == pytest.approx(summary["pseudo_labels"]["recall"])
    other = dict(summary, pseudo_labels=dict(summary["pseudo_labels"], precision=0.5))
    quality, reason = plots.pseudo_label_quality(run_dir, config, other)
    assert quality is None and "no longer gives the run's pseudo-labels" in reason


def test_paper_rows_name_what_tells_configurations_apart(tmp_path):
    root = tmp_path / "results"
    fake_run(root, "pascal", "EM", 0, 50.0, config=None)
    fake_run(root, "pascal", "EM", 1, 52.0, config="old/config.json")  # --config's file: bookkeeping
    fake_run(root, "pascal", "EM", 8, 54.0, head_lr_mult=None)         # unset: as if the key were absent
    fake_run(root, "pascal", "EM", 0, 40.0, head_lr_mult=1.0)          # a key older configs lack
    methods, _, cells = summarize.paper_cells(summarize.read_runs([root]))
    assert methods == ["EM (head_lr_mult 1.0)", "EM (no head_lr_mult)"]
    assert sorted(row["test"] for row in cells[("EM (no head_lr_mult)", "pascal")]) == [50.0, 52.0, 54.0]


# -- a checkpoint is scored only in its own run folder ---------------------------------------------

@pytest.fixture(scope="module")
def other_runs(demo_root, tmp_path_factory) -> dict[str, Path]:
    """1-epoch runs that differ from ``run_dir`` in one setting each (and in --epochs and
    --run-name, which a checkpoint may record otherwise than its run folder)."""
    out = tmp_path_factory.mktemp("other-runs")
    flags = {"image_size": ("-l", "EM_PL", "--image-size", "48"), "head": ("-l", "EM_PL", "--head", "boostlu"),
             "method": ("-l", "an",)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        for name, extra in flags.items():
            main_clip.main(demo_args(demo_root, out, *extra, "--epochs", "1", "--run-name", name))
    return {name: out / name for name in flags}


def _tool_argv(tool: str, run: Path, tmp_path: Path) -> list[str]:
    images = [] if tool == "evaluate" else [str(_some_test_images(run, tmp_path)), "--out", str(tmp_path / "p.csv")]
    return [str(run), *images]


def _some_test_images(run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    if not folder.is_dir():
        folder.mkdir()
        benchmark = saved_run.load_benchmark(json.loads((run / "config.json").read_text()))
        for path in benchmark.image_paths("test")[:3]:
            shutil.copy(path, folder / Path(path).name)
    return folder


def _run_tool(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    code = {"evaluate": evaluate.cli, "predict": predict.cli}[tool](argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("tool", ["evaluate", "predict"])
@pytest.mark.parametrize("other, difference", [
    ("image_size", "(image_size: 48 vs 64);"),
    ("head", "(head: 'boostlu' vs 'linear');"),
    ("method", "method: 'an' vs 'EM_PL'"),   # and EM_PL's own settings, which an -l an run has not
])
def test_checkpoint_of_another_run_is_refused(run_dir, other_runs, tmp_path, capsys, tool, other, difference):
    target = copy_run(run_dir, tmp_path / "copy")
    shutil.copy(other_runs[other] / "best.pt", target / "best.pt")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    code, err = _run_tool(tool, _tool_argv(tool, target, tmp_path), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {target / 'best.pt'} was trained with another configuration than "
                          f"{target / 'config.json'} (") and difference in err, err
    assert err.endswith("; score a checkpoint in the run folder that trained it, or put this run's own best.pt back\n")
    # --epochs and --run-name differ too: a resume or a moved folder may change them, they are not named.
    assert "epochs:" not in err and "run_name:" not in err, err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before and not (tmp_path / "p.csv").exists()


def _resave(path: Path, change) -> None:
    """Rewrite the checkpoint at ``path`` after ``change(state)``, with a valid checksum."""
    state = checkpoint.load_checkpoint(path)
    change(state)
    torch.save({**state, checkpoint.CHECKSUM: checkpoint.checksum(state)}, path)


@pytest.mark.parametrize("tool", ["evaluate", "predict"])
@pytest.mark.parametrize("recorded", ["none", "not_a_dict"])
def test_checkpoint_without_its_configuration_is_refused(run_dir, tmp_path, capsys, tool, recorded):
    target = copy_run(run_dir, tmp_path / "copy")
    if recorded == "none":
        _resave(target / "best.pt", lambda state: state.pop("config"))
    else:
        _resave(target / "best.pt", lambda state: state.update(config="pascal"))
    before = sorted(p.name for p in target.iterdir())
    code, err = _run_tool(tool, _tool_argv(tool, target, tmp_path), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {target / 'best.pt'} records no training configuration"), err
    assert sorted(p.name for p in target.iterdir()) == before and not (tmp_path / "p.csv").exists()


def test_old_config_json_is_read_with_the_values_it_ran_with(other_runs, tmp_path, capsys):
    """A config.json written before a setting existed is read with the value the run used
    (rundir.ADDED_SETTINGS): agreeing with its checkpoint there, it is scored; disagreeing, refused."""
    target = copy_run(other_runs["head"], tmp_path / "old")
    config = json.loads((target / "config.json").read_text())
    assert config["sync_bn"] is False and config["head"] == "boostlu"
    del config["sync_bn"]
    (target / "config.json").write_text(json.dumps(config))
    assert evaluate.cli([str(target)]) == 0
    assert (target / "eval_test_best.json").is_file()
    (target / "eval_test_best.json").unlink()

    del config["head"]  # an old run folder had the linear head: this boostlu checkpoint is not its own
    (target / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    code, err = _run_tool("evaluate", [str(target)], capsys)
    assert code == 2 and "(head: 'boostlu' vs 'linear')" in err and err.count("\n") == 1, err
    assert not (target / "eval_test_best.json").exists()


# -- predict.py never writes over a run's files or its inputs ---------------------------------------

def test_predict_never_replaces_a_run_file_or_an_input(run_dir, tmp_path, capsys, monkeypatch):
    target = copy_run(run_dir, tmp_path / "copy")
    (target / "eval_test_best.json").write_text('{"split": "test"}\n')
    photos = _some_test_images(run_dir, tmp_path)
    an_input = next(photos.iterdir())
    with monkeypatch.context() as patch:
        patch.setattr(saved_run, "load_run", lambda *args: pytest.fail("the model was loaded before --out was checked"))
        for name in ("best.pt", "summary.json", "eval_test_best.json", "config.json"):
            before = (target / name).read_bytes()
            code, err = _run_tool("predict", [str(target), str(photos), "--out", str(target / name)], capsys)
            assert code == 2 and err.count("\n") == 1, err
            assert str(target / name) in err and "pick another --out" in err, err
            assert (target / name).read_bytes() == before
    before = an_input.read_bytes()
    code, err = _run_tool("predict", [str(target), str(photos), "--out", str(an_input)], capsys)
    assert code == 2 and err.count("\n") == 1 and "is one of the input images" in err, err
    assert an_input.read_bytes() == before

    # A new file in the run folder is allowed: the run is still scored as before.
    assert predict.cli([str(target), str(photos), "--out", str(target / "predictions.csv")]) == 0
    assert (target / "predictions.csv").is_file()
    assert (target / "best.pt").read_bytes() == (run_dir / "best.pt").read_bytes()
    assert evaluate.cli([str(target)]) == 0
