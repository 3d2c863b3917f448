"""The embedding cache on a full, read-only or shared disk: the teacher pass refuses to start
(one line) when its file cannot be written, a failed final write is one line and leaves nothing,
and temporary files of killed writers are removed while those of live writers stay."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import caches
import datasets
import fileio
from conftest import REPO_ROOT
from errors import RunError
from test_inputs_hardening import write_pascal

SIZE = 16
MEAN, STD = datasets.CLIP_MEAN, datasets.CLIP_STD


class Counting:
    """A fixed map of the pooled image to 5 values, counting the images it sees."""

    def __init__(self):
        self.seen = 0
        self.weight = torch.randn(3 * 4 * 4, 5, generator=torch.Generator().manual_seed(0))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1) @ self.weight


@pytest.fixture
def image_paths(tmp_path) -> list[str]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (14, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return sorted(str(p) for p in folder.iterdir())


def embed(encoder, paths, cache_file, messages=None):
    return caches.cached_embeddings(encoder, {"teacher": "abc"}, paths, SIZE, MEAN, STD, cache_file, batch_size=3,
                                    log=(messages.append if messages is not None else lambda m: None))


def one_line(message: str, *parts: str) -> None:
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def report_free(monkeypatch, free: int) -> None:
    """The file system reports ``free`` bytes free."""
    real = shutil.disk_usage

    def disk_usage(path):
        return real(path)._replace(free=free)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


# -- before the pass: the cache folder can be written and has room ------------------------------

@pytest.mark.parametrize("how", ["under_a_file", "read_only"])
def test_unwritable_cache_folder_stops_before_encoding(tmp_path, image_paths, how):
    if how == "under_a_file":
        (tmp_path / "a-file").write_text("")
        folder = tmp_path / "a-file" / "cache"
    else:
        folder = tmp_path / "cache"
        folder.mkdir()
        folder.chmod(0o500)
        if os.access(folder, os.W_OK):   # root writes anyway: the under_a_file case covers it
            folder.chmod(0o700)
            pytest.skip("permissions do not stop this user from writing")
    encoder = Counting()
    try:
        with pytest.raises(RunError) as error:
            embed(encoder, image_paths, folder / "c.npz")
    finally:
        if folder.is_dir():
            folder.chmod(0o700)
    one_line(str(error.value), f"cannot write to {folder}", "--cache-dir")
    assert encoder.seen == 0


def test_full_disk_stops_before_encoding(tmp_path, image_paths, monkeypatch):
    report_free(monkeypatch, 1000)
    folder = tmp_path / "cache"
    encoder = Counting()
    with pytest.raises(RunError) as error:
        embed(encoder, image_paths, folder / "c.npz")
    one_line(str(error.value), str(folder), "1.0 kB free", "bytes) needed", "--cache-dir")
    assert encoder.seen == 0
    assert files_in(folder) == []


def test_too_little_room_for_the_whole_file_stops_after_the_first_batch(tmp_path, image_paths, monkeypatch):
    """The lower bound (1 value per image) fits; the exact size, known after the first batch, does not."""
    exact = caches._cache_size(7, (5,), "float32")
    report_free(monkeypatch, exact - 1)
    encoder = Counting()
    with pytest.raises(RunError) as error:
        embed(encoder, image_paths, tmp_path / "cache" / "c.npz")
    one_line(str(error.value), str(tmp_path / "cache"), f"({exact} bytes) needed", "7 x 5 float32")
    assert encoder.seen == 3   # one batch of 3, not the whole pass
    report_free(monkeypatch, exact)
    assert embed(Counting(), image_paths, tmp_path / "cache" / "c.npz").shape == (7, 5)


def test_check_writable_for_other_folders(tmp_path, monkeypatch):
    fileio.check_writable(tmp_path / "new" / "out", 10, "--output-dir")
    assert (tmp_path / "new" / "out").is_dir() and files_in(tmp_path / "new" / "out") == []
    report_free(monkeypatch, 5)
    with pytest.raises(RunError) as error:
        fileio.check_writable(tmp_path / "new" / "out", 2_500_000_000, "--output-dir", needed_for="checkpoints")
    one_line(str(error.value), f"{tmp_path / 'new' / 'out'} has 5 bytes free", "2.5 GB (2500000000 bytes) needed "
             "for checkpoints", "--output-dir")


def test_failed_final_write_is_one_line_and_leaves_nothing(tmp_path, image_paths, monkeypatch):
    def disk_full(handle, **arrays):
        handle.write(b"part of an archive")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", disk_full)
    cache_file = tmp_path / "cache" / "c.npz"
    encoder = Counting()
    with pytest.raises(RunError) as error:
        embed(encoder, image_paths, cache_file)
    one_line(str(error.value), f"cannot write the embedding cache {cache_file}", os.strerror(errno.ENOSPC),
             "lost", "run again")
    assert encoder.seen == 7
    assert files_in(cache_file.parent) == []


# -- temporary files: a killed writer's are removed, a live writer's stay ------------------------

WRITER = textwrap.dedent("""
    import sys, time
    import fileio

    def write(handle):
        handle.write(b"x" * 100_000)
        handle.flush()
        print("writing", flush=True)
        time.sleep(3600)   # killed here, inside atomic_write
    fileio.atomic_write(sys.argv[1], write)
""")


@pytest.fixture
def writer(tmp_path):
    """Start a process that is writing ``<folder>/c.npz`` (inside atomic_write) when returned."""
    processes = []

    def start(folder: Path) -> tuple[subprocess.Popen, str]:
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(folder / "c.npz")], cwd=REPO_ROOT,
                                   stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        processes.append(process)
        assert process.stdout.readline() == "writing\n"
        temp_files = [name for name in files_in(folder) if name.endswith(".tmp")]
        assert len(temp_files) == 1 and temp_files[0].startswith(".c.npz.")
        return process, temp_files[0]
    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()


def test_temp_file_of_a_live_writer_stays(tmp_path, writer):
    folder = tmp_path / "cache"
    _, temp_file = writer(folder)
    assert fileio.remove_stale_temp_files(folder) == []
    assert files_in(folder) == [temp_file]


def test_temp_file_of_a_killed_writer_is_removed_when_the_cache_is_first_used(tmp_path, writer):
    data = tmp_path / "data"
    image_dir = write_pascal(data, counts=(("train", 3),))
    folder = tmp_path / "cache"
    process, temp_file = writer(folder)
    (folder / ".other.npz.unrelated.tmp").write_bytes(b"left by an older version, never locked")
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert temp_file in files_in(folder)
    messages = []
    cache = caches.OfficialSetCache(str(data), "pascal", image_dir, folder, batch_size=2, num_workers=0,
                                    device=torch.device("cpu"), log=messages.append)
    spec = caches.Encoder(Counting(), {"teacher": "abc"}, "teacher", SIZE, MEAN, STD)
    assert cache.embeddings("train", spec).shape == (3, 5)
    assert not any(name.endswith(".tmp") for name in files_in(folder))
    removed = [m for m in messages if "temporary file" in m]
    assert len(removed) == 1
    one_line(removed[0], str(folder), temp_file, ".other.npz.unrelated.tmp", "removed 2")
    assert cache.remove_stale_temp_files() == []
