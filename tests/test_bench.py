"""The bench/ scripts run end to end (tiny models: smoke tests, not measurements)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def load_bench(name: str = "epoch_cost"):
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a subprocess or a whole pipeline
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


@pytest.mark.slow  # a subprocess or a whole pipeline
def test_channels_last_smoke(capsys):
    result = load_bench("channels_last").main(["--tiny", "--batch-size", "2", "--repeats", "1"])
    assert set(result) == {"contiguous", "channels_last"}
    assert all(result[layout][phase] > 0 for layout in result for phase in ("train", "eval"))
    out = capsys.readouterr().out
    assert "train step: contiguous" in out and "eval  step: contiguous" in out and "x" in out.splitlines()[-1]


def test_channels_last_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        load_bench("channels_last").main(["--tiny", "--repeats", "0"])


def test_aevlp_cost_smoke(tmp_path, capsys):
    bench = load_bench("aevlp_cost")
    result = bench.main(["--tiny", "--num-images", "3", "--batch-size", "2", "--width", "64", "--height", "48",
                         "--grid", "2", "--repeats", "1", "--work-dir", str(tmp_path)])
    assert set(result) == bench.RESULT_KEYS
    assert result["pseudo_labels_identical"] is True
    assert result["sizes"] == {"images": 3, "batch": 2, "grid": 2, "views": 5, "classes": 20, "steps_per_epoch": 2,
                               "epochs": 1}
    assert set(result["a_per_epoch"]) == {"decode", "views", "forward", "damp", "total"}
    assert result["coco"]["images"] == 82_081
    assert result["coco"]["cache_gb_float32"] == pytest.approx(82_081 * 34 * 512 * 4 / 1e9)
    assert (tmp_path / "cache" / "aevlp.npz").is_file()   # (b) went through the cache API
    out = capsys.readouterr().out
    assert "(a) AEVLP" in out and "(b) ours" in out and "pseudo-labels identical: yes" in out
    assert "break-even" in out and "COCO" in out


def test_aevlp_cost_rejects_bad_sizes():
    bench = load_bench("aevlp_cost")
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--num-images", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--width", "3", "--grid", "4"])


@pytest.mark.slow  # a subprocess or a whole pipeline
def test_data_path_smoke(tmp_path, capsys):
    bench = load_bench("data_path")
    result = bench.main(["--tiny", "--num-train", "4", "--num-val", "2", "--num-test", "2", "--batch-size", "2",
                         "--image-width", "80", "--image-height", "60", "--repeats", "1", "--num-workers", "0",
                         "--gpu-decode", "--work-dir", str(tmp_path)])
    assert result["sizes"] == {"train": 4, "val": 2, "test": 2}
    assert result["difference"] == {"student": 0.0, "teacher": 0.0}   # the cached path's inputs, to the bit
    for path in ("decode", "cache"):
        for phase in ("teacher", "train", "eval"):
            assert all(result["results"][path][phase][key] > 0 for key in ("loader_rate", "step_s", "floor", "full"))
    assert result["build"]["images"] == 8 and result["build"]["bytes"] > 0
    assert result["gpu_decode"]["available"] is False and result["gpu_decode"]["device"] == "cpu"
    out = capsys.readouterr().out
    assert "loader img/s" in out and "full/floor" in out and "identical to the bit" in out and "GPU decode" in out
    assert len(list((tmp_path / "cache-cache").glob("images-64px-*.npy"))) == 2   # official train and val
    assert not list((tmp_path / "cache-decode").glob("images-*"))


def test_data_path_rejects_bad_sizes():
    bench = load_bench("data_path")
    for argv in (["--tiny", "--num-train", "0"], ["--tiny", "--num-workers", "-1"], ["--tiny", "--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
