"""End-to-end runs of main_clip.main on the synthetic VOC-layout demo data with tiny models."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import engine
import config as config_module
import main_clip
import methods
import metrics
import models
from conftest import demo_args


def run_args(demo_root: Path, out: Path, *extra: str):
    return demo_args(demo_root, out, *extra)


def read_run(run_dir: Path) -> dict:
    log = (run_dir / "log.txt").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    return dict(log=log, records=records, summary=summary, config=config)


@pytest.mark.parametrize("loss", list(methods.REGISTRY))
def test_every_loss_runs_and_writes_the_run_files(demo_root, tmp_path, loss):
    extra = ["-l", loss, "--run-name", "r"]
    if loss == "EM_APL":
        extra += ["--warmup-epoch", "1"]
    summary = main_clip.main(run_args(demo_root, tmp_path, *extra))
    run_dir = tmp_path / "r"
    run = read_run(run_dir)
    assert run["config"]["method"] == loss and run["config"]["lr"] == 1e-3
    assert summary == run["summary"]
    assert {(r["epoch"], r["phase"]) for r in run["records"]} >= {(1, "train"), (1, "val"), (2, "train"), (2, "val"), (1, "test")}
    logged_test = float(re.search(r"Best epoch test score: ([0-9.]+)", run["log"]).group(1))
    assert logged_test == pytest.approx(run["summary"]["best_test_map"], abs=1e-3)
    assert re.search(r"\[train\] time: [0-9.]+ min, loss: -?[0-9.]+, map_clean: [0-9.]+, map_observed: [0-9.]+", run["log"])
    assert len(run["summary"]["test_ap_per_class"]) == 20
    for name in ("last.pt", "best.pt"):
        state = torch.load(run_dir / name, map_location="cpu", weights_only=True)
        assert "model" in state
    if methods.REGISTRY[loss].needs_pseudo_labels:
        assert 0.0 <= run["summary"]["pseudo_labels"]["recall"] <= 1.0


def test_training_learns_on_demo_data(demo_root, tmp_path):
    args = run_args(demo_root, tmp_path, "-l", "an", "--run-name", "learn", "--epochs", "4")
    summary = main_clip.main(args)
    config = config_module.resolve_config(run_args(demo_root, tmp_path, "-l", "an"))
    bench = datasets.load_benchmark(demo_root, "pascal")
    torch.manual_seed(config["seed"])
    untrained = models.build_model(config["model"], 20, tiny=True)
    test_set = datasets.MultiLabelDataset([bench.image_dir / p for p in bench.test.images], bench.test.labels_obs,
                                          bench.test.labels, config["image_size"], train=False)
    scores, indices = engine.predict(untrained, engine.make_loader(test_set, 32, 0), "cpu", "untrained")
    untrained_map = metrics.compute_metrics(scores, bench.test.labels[indices])["map"]
    assert summary["best_test_map"] >= untrained_map + 15, (summary["best_test_map"], untrained_map)


def test_resume_gives_the_same_numbers(demo_root, tmp_path):
    once = main_clip.main(run_args(demo_root, tmp_path, "-l", "EM_PL", "--run-name", "once"))
    main_clip.main(run_args(demo_root, tmp_path, "-l", "EM_PL", "--run-name", "twice", "--epochs", "1"))
    resumed = main_clip.main(run_args(demo_root, tmp_path, "-l", "EM_PL", "--run-name", "twice", "--resume"))
    assert resumed == once
    log = (tmp_path / "twice" / "log.txt").read_text()
    assert "resumed from" in log


def test_online_pseudo_labels_run(demo_root, tmp_path):
    summary = main_clip.main(run_args(demo_root, tmp_path, "-l", "EM_PL", "--pseudo-labels", "online",
                                      "--run-name", "online", "--epochs", "1"))
    assert summary["best_epoch"] == 1


def cli_error(capsys, argv) -> str:
    code = main_clip.cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_bad_input_is_one_line_error_and_writes_nothing(demo_root, tmp_path, capsys):
    common = ["--output-dir", str(tmp_path / "out"), "--tiny-models", "--num-workers", "0"]
    message = cli_error(capsys, ["-d", "coco", "--data-root", str(demo_root), *common])
    assert "format_coco.py" in message
    empty = tmp_path / "empty"
    (empty / "pascal").mkdir(parents=True)
    for name in ("images", "labels"):
        np.save(empty / "pascal" / f"formatted_train_{name}.npy", np.load(demo_root / "pascal" / f"formatted_train_{name}.npy"))
    message = cli_error(capsys, ["-d", "pascal", "--data-root", str(empty), *common])
    assert "generate_observed_labels.py" in message or "format_pascal.py" in message
    bad_text = tmp_path / "bad_text.npy"
    np.save(bad_text, np.ones((19, 8), dtype=np.float32))
    message = cli_error(capsys, ["-d", "pascal", "--data-root", str(demo_root), "--text-features", str(bad_text), *common])
    assert str(bad_text) in message and "make_text_features.py" in message
    assert not (tmp_path / "out").exists()

    taken = tmp_path / "out" / "taken"
    taken.mkdir(parents=True)
    (taken / "log.txt").write_text("an earlier run\n")
    (taken / "last.pt").write_bytes(b"a started run")
    message = cli_error(capsys, ["-d", "pascal", "--data-root", str(demo_root), "--run-name", "taken", *common])
    assert "--resume" in message
    assert sorted(p.name for p in taken.iterdir()) == ["last.pt", "log.txt"]
    mine = tmp_path / "out" / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a run's file\n")
    assert "notes.txt" in cli_error(capsys, ["-d", "pascal", "--data-root", str(demo_root), "--run-name", "mine", *common])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_resume_continues_the_run_as_configured(demo_root, tmp_path):
    out = tmp_path / "out"
    first = main_clip.main(run_args(demo_root, tmp_path, "-l", "EM_PL", "-t", "0.02", "--alpha", "0.3",
                                    "--epochs", "1", "--output-dir", str(out), "--run-name", "r"))
    config = json.loads((out / "r" / "config.json").read_text())
    command = main_clip.resume_command(config)
    assert command == f"python main_clip.py --output-dir {out} --run-name r --resume"
    resume = main_clip.get_args_parser().parse_args(command.split()[2:])
    # Without --epochs the run keeps its own count (1, not the default 10): nothing is left to do.
    assert main_clip.main(resume) == first
    more = main_clip.get_args_parser().parse_args(command.split()[2:] + ["--epochs", "2"])
    assert main_clip.main(more)["epochs_run"] == 2
    resumed = json.loads((out / "r" / "config.json").read_text())
    assert resumed["epochs"] == 2 and resumed["temp"] == 0.02 and resumed["alpha"] == 0.3  # recorded
    assert "resume with epochs 1 -> 2" in (out / "r" / "log.txt").read_text()
    renamed = out / "renamed"
    (out / "r").rename(renamed)  # a renamed run folder resumes under its new name
    again = main_clip.get_args_parser().parse_args(["--output-dir", str(out), "--run-name", "renamed", "--resume"])
    assert main_clip.main(again)["epochs_run"] == 2


def test_demo_flags_keep_what_the_user_set():
    parser = main_clip.get_args_parser()
    given = config_module.given_flags(parser, ["--demo", "--epochs=1", "-l", "an"])
    assert given == {"demo", "epochs", "method"}
    args = main_clip.demo_args(parser.parse_args(["--demo", "--epochs=1", "-l", "an"]), given)
    assert args.epochs == 1 and args.tiny_models and args.method == "an" and args.num_workers == 0


def test_a_saved_config_starts_a_new_run_with_overrides(demo_root, tmp_path, capsys):
    main_clip.main(run_args(demo_root, tmp_path, "-l", "EM_PL", "--alpha", "0.3", "-t", "0.02", "--epochs", "1",
                            "--run-name", "first"))
    saved = tmp_path / "first" / "config.json"
    # Only the flags that differ from their defaults override the saved run's settings.
    again = main_clip.get_args_parser().parse_args(["--config", str(saved), "--run-name", "again", "--beta-pos", "0.5"])
    main_clip.main(again)
    first, second = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("first", "again"))
    changed = {k for k in first if first[k] != second.get(k)}
    assert changed == {"run_name", "config", "beta_pos"} and second["beta_pos"] == 0.5 and second["alpha"] == 0.3
    other_method = config_module.apply_saved_config(main_clip.get_args_parser().parse_args(
        ["--config", str(saved), "--run-name", "an", "-l", "an"]))
    assert other_method.alpha is None and other_method.temp == 0.02  # EM_PL's own settings stay behind
    assert config_module.resolve_config(other_method)["method"] == "an"
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({**first, "future_setting": 1}))
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert "incompatible version" in cli_error(capsys, ["--config", str(foreign), "--run-name", "x"])
    assert "give it a new --run-name" in cli_error(capsys, ["--config", str(saved)])
    assert "cannot read a run configuration" in cli_error(capsys, ["--config", str(tmp_path / "none.json"),
                                                                   "--run-name", "y"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_flags_given_equal_to_their_defaults_still_override_a_saved_run(demo_root, tmp_path, capsys, monkeypatch):
    parser = main_clip.get_args_parser()
    assert parser.get_default("seed") == 0
    saved = config_module.resolve_config(run_args(demo_root, tmp_path, "--seed", "2", "--run-name", "r"))
    (tmp_path / "r").mkdir()
    saved_file = tmp_path / "r" / "config.json"
    saved_file.write_text(json.dumps(saved))
    # --seed 0 on the command line is a change a resumed run refuses, not a flag left out.
    message = cli_error(capsys, ["--output-dir", str(tmp_path), "--run-name", "r", "--resume", "--seed", "0"])
    assert "different configuration" in message and "seed" in message
    argv = ["--config", str(saved_file), "--run-name", "seed0", "--seed", "0"]
    seen = {}
    monkeypatch.setattr(main_clip, "main", lambda args, given=None: seen.update(args=args, given=given))
    assert main_clip.cli(argv) == 0
    new_run = config_module.apply_saved_config(seen["args"], seen["given"])
    assert new_run.seed == 0 and new_run.lr == saved["lr"] and new_run.epochs == saved["epochs"]
    # Without the command line's record (a Namespace built in code), a default value reads as left out.
    assert config_module.apply_saved_config(parser.parse_args(argv)).seed == 2


def test_a_run_from_before_a_method_switch_resumes_with_the_switch_at_its_old_behaviour(demo_root, tmp_path, capsys):
    saved = config_module.resolve_config(run_args(demo_root, tmp_path, "-l", "LL-Cp", "--run-name", "old"))
    assert saved.pop("permanent_ties") is False          # LL-Cp gained --permanent-ties later
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    args = main_clip.get_args_parser().parse_args(["--output-dir", str(tmp_path), "--run-name", "old", "--resume"])
    config = config_module.resolve_config(config_module.apply_resumed_config(args, {"output_dir", "run_name", "resume"}))
    assert config["permanent_ties"] is False and main_clip.prepare_run_dir(config) == tmp_path / "old"
    # Switched on, it is a different run.
    on = main_clip.get_args_parser().parse_args(["--output-dir", str(tmp_path), "--run-name", "old", "--resume",
                                                 "--permanent-ties", "on"])
    with pytest.raises(main_clip.RunError, match="permanent_ties: False -> True"):
        main_clip.prepare_run_dir(config_module.resolve_config(config_module.apply_resumed_config(on)))
    (tmp_path / "old" / "config.json").write_text(json.dumps({**saved, "method": "LL-X"}))
    message = cli_error(capsys, ["--output-dir", str(tmp_path), "--run-name", "old", "--resume"])
    assert "method 'LL-X' is not one this version knows" in message


def test_method_is_the_flag_and_the_key_and_a_folder_that_says_loss_still_resumes_and_reads(demo_root, tmp_path):
    import evaluate
    from reading import summarize

    for spelling in ("--method", "-l", "--loss"):
        assert config_module.get_args_parser().parse_args([spelling, "an"]).method == "an"
    first = main_clip.main(demo_args(demo_root, tmp_path, "--method", "an", "--epochs", "1", "--run-name", "old"))
    assert first["method"] == "an" and "loss" not in first
    # As a version before --method wrote the folder: the method under "loss".
    config_file = tmp_path / "old" / "config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({("loss" if k == "method" else k): v for k, v in saved.items()}))
    resumed = main_clip.main(config_module.get_args_parser().parse_args(
        ["--output-dir", str(tmp_path), "--run-name", "old", "--resume", "--epochs", "2"]))
    assert resumed["method"] == "an" and resumed["epochs_run"] == 2
    assert evaluate.main(evaluate.get_args_parser().parse_args([str(tmp_path / "old")]))["method"] == "an"
    summary_file = tmp_path / "old" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps({("loss" if k == "method" else k): v for k, v in summary.items()}))
    assert summarize.read_runs([tmp_path])[0]["method"] == "an"
