"""bench/epoch_cost.py runs end to end (tiny models: a smoke test, not a measurement)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def load_bench():
    path = Path(__file__).resolve().parent.parent / "bench" / "epoch_cost.py"
    spec = importlib.util.spec_from_file_location("epoch_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_epoch_cost_smoke(tmp_path, capsys):
    bench = load_bench()
    result = bench.main(["--tiny", "--num-train", "6", "--num-val", "3", "--num-test", "3", "--batch-size", "3",
                         "--image-px", "64", "--work-dir", str(tmp_path)])
    assert result["sizes"] == {"train": 6, "val": 3, "test": 3}
    assert result["cached_images"] == 9   # the whole official train set: train + val
    for design in ("original", "ours"):
        assert all(result["per_epoch"][design][phase] > 0 for phase in ("train", "val", "test"))
    out = capsys.readouterr().out
    assert "(a) original" in out and "(b) ours" in out and "acceptance" in out
    # Both runs went through main_clip's logger: ours cached the teacher, the original did not.
    assert any((tmp_path / "cache").glob("teacher-*-train.npz"))
    assert (tmp_path / "results" / "original" / "metrics.jsonl").read_text().count('"phase": "test"') == 1


def test_epoch_cost_rejects_bad_sizes():
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--num-train", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--test-epochs", "11"])
