"""A checkpoint with one flipped byte: whatever torch's unpickler makes of it, loading it gives
back the original state (a flip in padding) or one RunError line naming the file, never another
exception (it used to end in KeyError / IndexError tracebacks in evaluate.py and --resume)."""
from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import checkpoint
import evaluate
import instrumentation
import main_clip
from conftest import demo_argv
from errors import RunError

FAST = ("-l", "an", "--train-mode", "linear_fixed_features", "--head-lr", "1e-2")


def member_span(path: Path, suffix: str) -> range:
    """The byte offsets of the (stored, uncompressed) zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    header = path.read_bytes()[info.header_offset:info.header_offset + 30]
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_length + extra_length
    return range(start, start + info.compress_size)


def flipped(data: bytes, offset: int, mask: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= mask
    return bytes(damaged)


def old_boundary_passes(error: Exception) -> bool:
    """What the old load_checkpoint let escape as a traceback."""
    return not isinstance(error, (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile,
                                  pickle.UnpicklingError))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A last.pt as CheckpointSaver writes it: weights, nested method state, config."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    saver = checkpoint.CheckpointSaver(folder, instrumentation.RunLogger(folder, resume=False, echo=False))
    saver.save_last(dict(model=torch.nn.Linear(3, 2).state_dict(), epoch=1, method={"rates": [1, 2.5, "x"]},
                         config={"lr": 0.1, "loss": "an"}))
    return folder / checkpoint.LAST


def test_every_one_byte_flip_gives_the_state_or_one_line(small_checkpoint, tmp_path):
    data = small_checkpoint.read_bytes()
    original = checkpoint.checksum(checkpoint.load_checkpoint(small_checkpoint))
    pickle_span = member_span(small_checkpoint, "/data.pkl")
    offsets = sorted(set(pickle_span) | set(range(0, len(data), 7)))
    damaged = tmp_path / "damaged.pt"
    outcomes = {"same": 0, "refused": 0}
    for offset in offsets:
        for mask in (0x01, 0xFF):
            damaged.write_bytes(flipped(data, offset, mask))
            try:
                state = checkpoint.load_checkpoint(damaged)
            except RunError as error:
                message = str(error)
                assert "\n" not in message and message.startswith(f"{damaged}: "), (offset, mask, message)
                outcomes["refused"] += 1
            else:
                assert checkpoint.checksum(state) == original, (offset, mask)
                outcomes["same"] += 1
    assert outcomes["refused"] > len(pickle_span)   # the pickle stream itself is never padding


def test_damaged_structure_that_loads_is_refused_in_one_line(tmp_path):
    """Loadable but not what CheckpointSaver writes: a checksum that is not a string, a list
    holding itself (what a flipped memo reference can build)."""
    path = tmp_path / "odd.pt"
    torch.save({"model": {}, checkpoint.CHECKSUM: 7}, path)
    with pytest.raises(RunError, match=re.escape(f"{path}: damaged")):
        checkpoint.load_checkpoint(path)
    loop = [1]
    loop.append(loop)
    torch.save({"model": loop, checkpoint.CHECKSUM: "0" * 64}, path)
    with pytest.raises(RunError, match=re.escape(f"{path}: damaged")):
        checkpoint.load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")   # torch.load on damaged streams, in the search
def test_evaluate_on_a_flipped_best_checkpoint_is_one_error_line(demo_root, tmp_path, capsys):
    assert main_clip.cli(demo_argv(demo_root, tmp_path, *FAST, "--run-name", "r", "--epochs", "1")) == 0
    best = tmp_path / "r" / checkpoint.BEST
    data = best.read_bytes()
    # A flip the old boundary let through as a traceback (KeyError, IndexError, ...).
    for offset in member_span(best, "/data.pkl"):
        best.write_bytes(flipped(data, offset, 0xFF))
        try:
            torch.load(best, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 (looking for the types the old code missed)
            if old_boundary_passes(error):
                break
    else:
        pytest.fail("no flip of best.pt's pickle stream escapes the old boundary")
    capsys.readouterr()
    assert evaluate.cli([str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {best}: cannot read the checkpoint"), err
