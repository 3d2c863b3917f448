"""linear_init's two stages: the hand-over from the head stage survives an interruption at any
checkpoint, and model selection is Cole et al.'s (the fine-tuning stage's epochs) by default."""
from __future__ import annotations

import json

import pytest
import torch

import checkpoint
import main_clip
from conftest import demo_args

# 2 head epochs then 2 fine-tuning epochs; the head's learning rate high enough that its best
# epoch is a real competitor of the fine-tuning epochs.
LINEAR_INIT = ("--train-mode", "linear_init", "--head-epochs", "2", "--head-lr", "1e-2")


def run(demo_root, out, *flags):
    return main_clip.main(demo_args(demo_root, out, *LINEAR_INIT, *flags))


def killed_before_save(demo_root, out, monkeypatch, save_number: int, *flags) -> None:
    """The run, stopped just before its ``save_number``-th write of last.pt (as a SIGKILL there
    would leave the folder: best.pt may already hold that epoch)."""
    calls = []
    save_last = checkpoint.CheckpointSaver.save_last

    def dies_at_the_chosen_write(saver, state):
        calls.append(state["epoch"])
        if len(calls) == save_number:
            raise KeyboardInterrupt
        save_last(saver, state)
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.CheckpointSaver, "save_last", dies_at_the_chosen_write)
        with pytest.raises(KeyboardInterrupt):
            run(demo_root, out, *flags)


@pytest.fixture(scope="module")
def straight_runs(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return out, {method: run(demo_root, out, "-l", method, "--run-name", f"once-{method}")
                 for method in ("EM_PL", "role")}


# Writes of last.pt in a linear_init run of 2 + 2 epochs: 1 the start (epoch 0), 2-3 the head
# epochs, 4 the fine-tuning stage as it starts (the hand-over), 5-6 the fine-tuning epochs.
@pytest.mark.parametrize("method", ["EM_PL", "role"])
@pytest.mark.parametrize("save_number", [4, 5])
def test_a_resume_at_the_stage_change_equals_the_run_in_one_go(demo_root, straight_runs, monkeypatch, method,
                                                               save_number):
    out, once = straight_runs
    name = f"cut-{method}-{save_number}"
    killed_before_save(demo_root, out, monkeypatch, save_number, "-l", method, "--run-name", name)
    # Before the fix, the fine-tuning stage restarted from this best.pt (already the first
    # fine-tuning epoch's) instead of the head stage's best.
    resumed = run(demo_root, out, "-l", method, "--run-name", name, "--resume")
    assert resumed == once[method]
    for file in ("best.pt", "last.pt"):
        mine, theirs = (checkpoint.load_checkpoint(out / folder / file)["model"] for folder in (name, f"once-{method}"))
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


def test_a_best_pt_of_another_epoch_at_the_hand_over_is_refused(demo_root, tmp_path, monkeypatch, capsys):
    killed_before_save(demo_root, tmp_path, monkeypatch, 4, "-l", "an", "--run-name", "r")
    best_path = tmp_path / "r" / "best.pt"
    best = checkpoint.load_checkpoint(best_path)
    saver = checkpoint.CheckpointSaver(tmp_path / "r", logger=None)
    saver._write("best.pt", {**best, "epoch": best["epoch"] + 7})
    capsys.readouterr()
    code = main_clip.cli(["--output-dir", str(tmp_path), "--run-name", "r", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"holds epoch {best['epoch'] + 7}" in err[0] and f"records epoch {best['epoch']} as the best" in err[0]


def test_by_default_the_reported_epoch_is_the_fine_tuning_stages_best(demo_root, tmp_path):
    summary = run(demo_root, tmp_path, "-l", "an", "--run-name", "r")
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    val = {r["epoch"]: r["clean"]["map"] for r in records if r["phase"] == "val"}
    fine_tuning = {epoch: value for epoch, value in val.items() if epoch >= 3}
    best_epoch = max(fine_tuning, key=lambda epoch: (fine_tuning[epoch], -epoch))
    assert summary["best_epoch"] == best_epoch and summary["best_val_map"] == fine_tuning[best_epoch]
    assert summary["best_stage"] == "end_to_end" and summary["model_selection"] == "final_stage"
    test = {r["epoch"]: r["clean"]["map"] for r in records if r["phase"] == "test"}
    assert summary["best_test_map"] == test[best_epoch]
    assert checkpoint.load_checkpoint(tmp_path / "r" / "best.pt")["epoch"] == best_epoch


def test_all_stages_compete_on_request_and_the_summary_names_the_stage(demo_root, tmp_path, monkeypatch):
    # A fine-tuning stage that never beats the head: its val mAP is made to be 0.
    import engine

    evaluate = engine.evaluate

    def fine_tuning_scores_zero(phase, epoch, *args, **kwargs):
        record = evaluate(phase, epoch, *args, **kwargs)
        if phase == "val" and epoch >= 3:
            record["clean"]["map"] = 0.0
        return record
    monkeypatch.setattr(engine, "evaluate", fine_tuning_scores_zero)
    every = run(demo_root, tmp_path, "-l", "an", "--run-name", "every", "--model-selection", "all_stages")
    assert every["best_epoch"] in (1, 2) and every["best_stage"] == "head"
    final = run(demo_root, tmp_path, "-l", "an", "--run-name", "final")
    # Cole et al.'s rule: the fine-tuning stage's best (all ties at 0: its first epoch).
    assert final["best_epoch"] == 3 and final["best_stage"] == "end_to_end" and final["best_val_map"] == 0.0


def test_a_run_folder_from_before_the_flag_keeps_its_selection(demo_root, tmp_path):
    run(demo_root, tmp_path, "-l", "an", "--run-name", "old", "--epochs", "1", "--model-selection", "all_stages")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    del config["model_selection"]  # as a version before --model-selection wrote it
    config_file.write_text(json.dumps(config))
    resumed = main_clip.main(main_clip.get_args_parser().parse_args(
        ["--output-dir", str(tmp_path), "--run-name", "old", "--resume", "--epochs", "2"]))
    assert resumed["model_selection"] == "all_stages"
