"""A newcomer's first hour: default run names unique per configuration, one-line mistakes with
the name meant, hints that carry the user's own flags, a demo that says where its run is."""
from __future__ import annotations

import json
import shutil

import pytest

import config as config_module
import main_clip
from conftest import demo_args, demo_argv


def error_lines(capsys, argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main_clip.cli(argv)
    except SystemExit as stop:  # argparse stops on the command line itself
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def resolved_name(demo_root, out, *flags) -> str:
    return config_module.resolve_config(demo_args(demo_root, out, *flags))["run_name"]


def test_default_names_differ_where_the_numbers_can_and_agree_where_they_cannot(demo_root, tmp_path):
    plain = resolved_name(demo_root, tmp_path, "-l", "LL-R")
    assert plain.startswith("pascal_resnet50_LL-R_seed0_tiny_") and len(plain.rsplit("_", 1)[1]) == 8
    others = {resolved_name(demo_root, tmp_path, "-l", "LL-R", *flags)
              for flags in (("--head", "boostlu"), ("--data-root", str(tmp_path)), ("--delta-rel", "0.3"),
                            ("--teacher", "ViT-B-16"), ("--val-labels", "observed"))}
    assert plain not in others and len(others) == 5
    # Flags that cannot change the numbers, or that restate a default, keep the name.
    assert {resolved_name(demo_root, tmp_path, "-l", "LL-R", *flags)
            for flags in ((), ("--num-workers", "1"), ("--epochs", "7"), ("--head", "linear"),
                          ("--cache-dir", str(tmp_path / "c")))} == {plain}
    real = config_module.resolve_config(config_module.get_args_parser().parse_args(["-l", "LL-R"]))["run_name"]
    assert "_tiny_" not in real and real.startswith("pascal_resnet50_LL-R_seed0_")


def test_a_default_named_run_resumes_from_its_flags_and_an_older_default_name_too(demo_root, tmp_path):
    flags = ("-l", "an", "--train-mode", "linear_fixed_features", "--head-lr", "1e-2", "--epochs", "1")
    first = main_clip.main(demo_args(demo_root, tmp_path, *flags))
    [folder] = [p for p in tmp_path.iterdir() if (p / "summary.json").exists()]
    resumed = main_clip.main(demo_args(demo_root, tmp_path, *flags, "--epochs", "2", "--resume"))
    assert resumed["epochs_run"] == 2 and first["epochs_run"] == 1
    assert [p for p in tmp_path.iterdir() if (p / "summary.json").exists()] == [folder]
    folder.rename(tmp_path / "pascal_resnet50_an_seed0")  # as a version before the hash named it
    again = main_clip.main(demo_args(demo_root, tmp_path, *flags, "--epochs", "3", "--resume"))
    assert again["epochs_run"] == 3 and json.loads(
        (tmp_path / "pascal_resnet50_an_seed0" / "summary.json").read_text())["epochs_run"] == 3


def test_a_folder_of_another_configuration_is_never_offered_to_resume(demo_root, tmp_path, capsys):
    flags = ("-l", "an", "--train-mode", "linear_fixed_features", "--epochs", "1", "--run-name", "r")
    assert main_clip.cli(demo_argv(demo_root, tmp_path, *flags)) == 0
    code, err = error_lines(capsys, demo_argv(demo_root, tmp_path, *flags, "--head-lr", "0.5"))
    assert code == 2 and len(err) == 1 and "--resume to continue it or" not in err[0]
    assert f"run folder {tmp_path / 'r'} holds a run of another configuration (head_lr: 0.0001 -> 0.5)" in err[0]
    code, err = error_lines(capsys, demo_argv(demo_root, tmp_path, *flags))
    assert code == 2 and "pass --resume to continue it" in err[0]


@pytest.mark.parametrize("argv, line", [
    (["-l", "EMPL"], "unknown method 'EMPL'; did you mean EM_PL?"),
    (["--method", "em_pl"], "unknown method 'em_pl'; did you mean EM_PL?"),
    (["-d", "Pascal"], "unknown dataset 'Pascal'; did you mean pascal?"),
    (["-m", "resnet"], "unknown backbone 'resnet'; did you mean resnet50?"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
])
def test_a_mistyped_name_is_one_line_with_the_name_meant(capsys, argv, line):
    code, err = error_lines(capsys, argv)
    assert code == 2 and len(err) == 1 and line in err[0] and err[0].startswith("error: ")


def test_the_papers_name_vlpl_is_em_pl():
    assert config_module.get_args_parser().parse_args(["-l", "VLPL"]).method == "EM_PL"


def test_the_text_features_hint_carries_the_users_data_root_and_tiny(demo_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_root / "pascal", data / "pascal", ignore=shutil.ignore_patterns("cache", "*.npy"))
    for name in (demo_root / "pascal").glob("formatted_*.npy"):
        shutil.copy(name, data / "pascal" / name.name)
    code, err = error_lines(capsys, demo_argv(data, tmp_path / "out", "-l", "EM_PL"))
    assert code == 2 and len(err) == 1
    assert err[0].endswith(f"`python preproc/make_text_features.py --dataset pascal --data-root {data} --tiny`")


def test_the_dataset_folder_given_as_data_root_is_recognised(demo_root, tmp_path, capsys):
    code, err = error_lines(capsys, demo_argv(demo_root / "pascal", tmp_path, "-l", "an"))
    assert code == 2 and len(err) == 1
    assert err[0].endswith(f"--data-root {demo_root / 'pascal'} is the pascal folder itself; give the folder that "
                           f"holds it: --data-root {demo_root}")


def test_missing_data_is_reported_before_missing_weights(tmp_path, capsys):
    # No data and (offline, empty caches) no weights: the data is what to make first.
    code, err = error_lines(capsys, ["--data-root", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: missing {tmp_path / 'pascal'}")


@pytest.mark.slow  # a subprocess or a whole pipeline
def test_the_demo_says_where_its_run_is_and_what_to_run_next(tmp_path, capsys, monkeypatch):
    import engine

    monkeypatch.setattr(engine.Trainer, "run_epoch", lambda self, epoch, stage: None)  # the pipeline, not the epochs
    assert main_clip.cli(["--demo", "--output-dir", str(tmp_path), "--run-name", "d", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "next: python preproc" not in out  # the demo runs those steps itself
    assert f"run folder: {tmp_path / 'd'}\nnext:\n  python evaluate.py {tmp_path / 'd'}" in out
    assert f"python instrumentation.py {tmp_path} --plot {tmp_path / 'plots'}" in out
