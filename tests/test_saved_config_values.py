"""A hand-edited config.json (``--resume``, ``--config``) is checked as the flags are, before any
work: one error line naming the file or the flag, nothing written, a started run folder left
byte for byte as it was."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import config as config_module
import main_clip
import methods
from conftest import demo_args

# (setting, hand-edited value, the flag the error line names, whether the line names the file:
# a value of the wrong kind is refused where the file is read; a range is checked on the run's
# whole configuration, as for a flag).
EDITS = [
    ("optimizer", "rmsprop", "--optimizer", True),
    ("train_mode", "nosuch", "--train-mode", True),
    ("head", "nosuch", "--head", True),
    ("amp", "fp8", "--amp", True),
    ("epochs", "10", "--epochs", True),
    ("image_size", 0, "--image-size", False),
    ("bsize", 0, "--bsize", False),
    ("val_labels", "nosuch", "--val-labels", True),
    ("test_every_epoch", "yes", "--test-every-epoch", True),
    ("alpha", "0.2", "--alpha", True),            # EM_PL's own hyperparameter, as a string
]


@pytest.fixture(scope="module")
def started_run(demo_root, tmp_path_factory) -> Path:
    """A run folder after one finished epoch of a tiny EM_PL run: config.json and last.pt."""
    out = tmp_path_factory.mktemp("started")
    main_clip.main(demo_args(demo_root, out, "--epochs", "1", "--run-name", "started"))
    return out / "started"


def error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main_clip.cli(argv) == 2
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def edit(config_file: Path, key: str, value) -> None:
    config = json.loads(config_file.read_text())
    assert key in config and config[key] != value
    config_file.write_text(json.dumps({**config, key: value}, indent=1))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("key, value, flag, names_file", EDITS, ids=[edit[0] for edit in EDITS])
def test_a_hand_edited_value_stops_a_resume_and_leaves_the_run_folder_as_it_was(
        started_run, tmp_path, capsys, key, value, flag, names_file):
    run = Path(shutil.copytree(started_run, tmp_path / "out" / "run"))
    edit(run / "config.json", key, value)
    before = snapshot(run)
    assert {"config.json", "last.pt"} <= set(before)
    message = error_line(capsys, ["--output-dir", str(tmp_path / "out"), "--run-name", "run", "--resume"])
    assert flag in message
    if names_file:
        assert str(run / "config.json") in message and json.dumps(value) in message and "expected" in message
    assert snapshot(run) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run"]


@pytest.mark.parametrize("key, value, flag, names_file", EDITS, ids=[edit[0] for edit in EDITS])
def test_a_hand_edited_value_stops_a_new_run_from_it_before_its_folder_exists(
        started_run, tmp_path, capsys, key, value, flag, names_file):
    saved = Path(shutil.copy(started_run / "config.json", tmp_path / "config.json"))
    edit(saved, key, value)
    message = error_line(capsys, ["--config", str(saved), "--run-name", "new", "--output-dir", str(tmp_path / "out")])
    assert flag in message
    if names_file:
        assert str(saved) in message and json.dumps(value) in message
    assert not (tmp_path / "out").exists()


def saved_config(demo_root: Path, folder: Path, *flags: str) -> Path:
    """A run's config.json as a run of ``flags`` on the demo data records it, at the method's
    own protocol (no training)."""
    config = config_module.resolve_config(main_clip.get_args_parser().parse_args(
        ["--data-root", str(demo_root), "--output-dir", str(folder / "out"), "--tiny-models", *flags]))
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("loss", [name for name, method in methods.REGISTRY.items() if method.hyperparameters])
def test_every_methods_saved_config_reads_back_and_a_hyperparameter_of_the_wrong_kind_is_refused(
        demo_root, tmp_path, loss):
    path = saved_config(demo_root, tmp_path, "-l", loss)
    config = json.loads(path.read_text())
    assert config_module.read_saved_config(path, "--config")["method"] == loss     # as recorded: accepted
    for hyperparameter in methods.REGISTRY[loss].hyperparameters:
        path.write_text(json.dumps({**config, hyperparameter.name: "1"}))
        with pytest.raises(main_clip.RunError) as error:
            config_module.read_saved_config(path, "--config")
        assert f'{hyperparameter.flag} "1": expected' in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize("flags, key, value, message", [
    (["-l", "AEVLP"], "text_gcn", "on", '--text-gcn "on": expected true or false'),
    (["-l", "LL-Cp"], "permanent_ties", 1, "--permanent-ties 1: expected true or false"),
    (["-l", "GR"], "k_schedule", "0,2,-2,-2", '--k-schedule "0,2,-2,-2": expected a list of 4 numbers'),
    (["-l", "GR"], "v_schedule", [0.5, 2.0, 0.8], "--v-schedule [0.5, 2.0, 0.8]: expected a list of 4 numbers"),
    (["-l", "EM_PL"], "warmup_epoch", 1.5, "--warmup-epoch 1.5: expected an integer"),
    (["-l", "EM_PL"], "beta", 0.5, "--beta is a setting of EM_APL, not of -l EM_PL"),   # would be dropped silently
    (["-l", "EM_PL"], "dataset", "voc", "-d/--dataset \"voc\": expected one of"),
    (["-l", "EM_PL"], "seed", True, "-s/--seed true: expected an integer"),
    (["-l", "EM_PL"], "lr", "1e-5", '--lr "1e-5": expected a number'),
    (["-l", "EM_PL"], "data_root", 3, "--data-root 3: expected a string"),
    (["-l", "AEVLP"], "damp_temp", 0, "--damp-temp must be > 0.0, got 0"),   # a range: as for the flag
])
def test_each_kind_of_flag_is_checked_in_a_saved_config(demo_root, tmp_path, capsys, flags, key, value, message):
    path = saved_config(demo_root, tmp_path, *flags)
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, key: value}))
    line = error_line(capsys, ["--config", str(path), "--run-name", "new", "--output-dir", str(tmp_path / "out")])
    assert message in line
    assert not (tmp_path / "out").exists()


def test_a_saved_setting_left_null_is_the_default_as_when_its_flag_is_left_out(demo_root, tmp_path):
    path = saved_config(demo_root, tmp_path, "-l", "EM_PL")
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "alpha": None, "optimizer": None, "head_bsize": None}))
    args = config_module.apply_saved_config(main_clip.get_args_parser().parse_args(
        ["--config", str(path), "--run-name", "new"]), {"config", "run_name"})
    resolved = config_module.resolve_config(args)
    assert (resolved["alpha"], resolved["optimizer"]) == (0.2, "adam")
    # A flag whose default is a value, not None, needs one.
    path.write_text(json.dumps({**config, "val_labels": None}))
    with pytest.raises(main_clip.RunError, match='--val-labels null: expected one of clean, observed'):
        config_module.read_saved_config(path, "--config")

