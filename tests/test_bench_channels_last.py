"""bench/channels_last.py runs end to end (tiny model: a smoke test, not a measurement)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def load_bench():
    path = Path(__file__).resolve().parent.parent / "bench" / "channels_last.py"
    spec = importlib.util.spec_from_file_location("channels_last_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_channels_last_smoke(capsys):
    result = load_bench().main(["--tiny", "--batch-size", "2", "--repeats", "1"])
    assert set(result) == {"contiguous", "channels_last"}
    assert all(result[layout][phase] > 0 for layout in result for phase in ("train", "eval"))
    out = capsys.readouterr().out
    assert "train step: contiguous" in out and "eval  step: contiguous" in out and "x" in out.splitlines()[-1]


def test_channels_last_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        load_bench().main(["--tiny", "--repeats", "0"])
