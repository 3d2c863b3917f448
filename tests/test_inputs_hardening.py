"""Damaged or hostile inputs: caches keyed by the image files themselves, no unpickling, damaged
and 16-bit images, text features with zero or non-unit rows. Each failure is one line naming the
file, and nothing partial is written."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import caches
import datasets
import main_clip
import teacher as teacher_module

SIZE = 16
MEAN, STD = datasets.CLIP_MEAN, datasets.CLIP_STD


def save_image(path: Path, seed: int, size=(20, 14), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def one_line(message: str, *names: str) -> None:
    assert "\n" not in message.strip(), message
    for name in names:
        assert name in message, (name, message)


class Counting:
    """A fixed map of the pooled image, counting the images it sees."""

    def __init__(self):
        self.seen = 0
        self.weight = torch.randn(3 * 4 * 4, 5, generator=torch.Generator().manual_seed(0))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1) @ self.weight


def embed(paths, cache_file, messages=None, **kw):
    encoder = Counting()
    out = caches.cached_embeddings(encoder, {"teacher": "abc"}, paths, SIZE, MEAN, STD, cache_file, batch_size=4,
                                   log=(messages.append if messages is not None else lambda m: None), **kw)
    return out, encoder.seen


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "root" / "images"
    for i in range(5):
        save_image(folder / f"{i}.png", i)
    return folder


def no_files_but(folder: Path, *names: str) -> None:
    left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert left == sorted(names), f"unexpected files: {left}"


def write_pascal(root: Path, counts=(("train", 5), ("val", 2)), images=True) -> Path:
    """Formatted pascal files under ``root`` (one positive per image) and, with ``images``, the
    images in the image root; returns the image root."""
    folder = root / "pascal"
    image_root = folder / datasets.get_dataset_info("pascal").image_root
    folder.mkdir(parents=True)
    for phase, n in counts:
        names = [f"{phase}{i}.jpg" for i in range(n)]
        if images:
            for i, name in enumerate(names):
                save_image(image_root / name, i, fmt="JPEG")
        labels = np.eye(n, 20)
        np.save(folder / f"formatted_{phase}_images.npy", np.array(names))
        np.save(folder / f"formatted_{phase}_labels.npy", labels)
        np.save(folder / f"formatted_{phase}_labels_obs.npy", labels)
    return image_root


def cli_error(capsys, argv: list[str]) -> str:
    """The command line's one error line (besides progress bars), checking exit status 2."""
    capsys.readouterr()
    assert main_clip.cli(argv) == 2
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


# ---------------------------------------------------------------------------------------------
# 1. The embedding cache is keyed by the image files (relative path, size, mtime), not path strings
# ---------------------------------------------------------------------------------------------

def test_replaced_image_misses_the_cache(tmp_path, image_dir):
    paths = sorted(str(p) for p in image_dir.iterdir())
    cache_file = tmp_path / "cache" / "c.npz"
    first, seen = embed(paths, cache_file)
    assert seen == 5
    # Other bytes under the same name (a new modification time, set explicitly: some file
    # systems keep whole seconds).
    before = os.stat(paths[2]).st_mtime_ns
    save_image(Path(paths[2]), seed=99)
    os.utime(paths[2], ns=(before + 2_000_000_000, before + 2_000_000_000))
    messages = []
    second, seen = embed(paths, cache_file, messages)
    assert seen == 5 and any("other inputs" in m for m in messages)
    assert not np.array_equal(second[2], first[2])
    np.testing.assert_array_equal(second[[0, 1, 3, 4]], first[[0, 1, 3, 4]])
    # Touched but identical: the key covers path, size and modification time, not the bytes,
    # so it is recomputed (to the same numbers).
    os.utime(paths[0], ns=(before + 4_000_000_000, before + 4_000_000_000))
    third, seen = embed(paths, cache_file)
    assert seen == 5
    np.testing.assert_array_equal(third, second)
    no_files_but(cache_file.parent, "c.npz")


def test_relative_and_absolute_paths_share_one_cache(tmp_path, image_dir, monkeypatch):
    names = sorted(p.name for p in image_dir.iterdir())
    cache_file = tmp_path / "cache" / "c.npz"
    _, seen = embed([str(image_dir / n) for n in names], cache_file)
    assert seen == 5
    monkeypatch.chdir(image_dir.parent)
    _, seen = embed([f"images/../images/{n}" for n in names], cache_file)
    assert seen == 0
    # With root: keyed relative to it, so it also holds when the folder moves (times kept).
    rooted = tmp_path / "rooted.npz"
    _, seen = embed([f"images/{n}" for n in names], rooted, root="images")
    assert seen == 5
    _, seen = embed([str(image_dir / n) for n in names], rooted, root=image_dir)
    assert seen == 0
    moved = shutil.copytree(image_dir, tmp_path / "elsewhere" / "images")   # copy2 keeps the times
    _, seen = embed([str(moved / n) for n in names], rooted, root=moved)
    assert seen == 0


def test_official_set_cache_is_shared_by_relative_and_absolute_data_roots(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_pascal(root, counts=(("train", 3),))
    encoder = Counting()
    spec = caches.Encoder(encoder, {"teacher": "abc"}, "teacher", SIZE, MEAN, STD)

    def official(data_root):
        image_dir = datasets.dataset_dir(data_root, "pascal") / datasets.get_dataset_info("pascal").image_root
        cache = caches.OfficialSetCache(str(data_root), "pascal", image_dir, tmp_path / "cache", batch_size=2,
                                        num_workers=0, device=torch.device("cpu"), log=lambda m: None)
        return cache.embeddings("train", spec)

    first = official(root)
    assert encoder.seen == 3
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(official(Path("data")), first)
    assert encoder.seen == 3


def test_cache_key_stats_each_image_once_and_reads_none(tmp_path, image_dir, monkeypatch):
    """Fast for 100k images (about 0.5 s measured): one os.stat per image, no file opened."""
    paths = sorted(str(p) for p in image_dir.iterdir())
    calls = {"stat": 0, "open": 0}
    real_stat, real_open = os.stat, Image.open

    def counting_stat(*args, **kwargs):
        calls["stat"] += 1
        return real_stat(*args, **kwargs)

    def counting_open(*args, **kwargs):
        calls["open"] += 1
        return real_open(*args, **kwargs)
    monkeypatch.setattr(os, "stat", counting_stat)
    monkeypatch.setattr(Image, "open", counting_open)
    key = caches.cache_key_hash({"k": 1}, paths, 8, MEAN, STD, root=image_dir)
    assert calls == {"stat": len(paths), "open": 0}
    assert key == caches.cache_key_hash({"k": 1}, paths, 8, MEAN, STD, root=str(image_dir) + "/")


# ---------------------------------------------------------------------------------------------
# 2. Image lists are never unpickled
# ---------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_object_list(root: Path, images: list) -> Path:
    """Formatted pascal train files whose image list is an object (pickled) array."""
    write_pascal(root, counts=(("train", len(images)),), images=False)
    path = root / "pascal" / "formatted_train_images.npy"
    np.save(path, np.array(images, dtype=object), allow_pickle=True)
    return path


def test_pickled_image_list_is_never_loaded(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    path = write_object_list(tmp_path, ["a.jpg", Payload(marker)])
    with pytest.raises(ValueError) as error:
        datasets.load_formatted(tmp_path, "pascal", "train")
    one_line(str(error.value), str(path), "save the list again as a plain str array", "preproc/format_*.py")
    assert not marker.exists()
    # Through the command line: one error line, exit status 2, no run folder.
    out = tmp_path / "results"
    error = cli_error(capsys, ["-d", "pascal", "-l", "an", "--data-root", str(tmp_path), "--output-dir", str(out),
                               "--tiny-models"])
    one_line(error, "error: ", str(path), "preproc/format_*.py")
    assert not marker.exists() and not out.exists()


def test_data_readmes_do_not_promise_to_load_object_arrays():
    for readme in Path(__file__).resolve().parent.parent.glob("data/*/README.md"):
        text = " ".join(readme.read_text().split())
        assert "load as they are" not in text
        if "object" in text:
            assert "never unpickled" in text and "plain str array" in text


# ---------------------------------------------------------------------------------------------
# 3. Empty, truncated or non-image files: one error naming the file
# ---------------------------------------------------------------------------------------------

def test_truncated_images_stay_refused():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("damage", ["truncated_jpeg", "truncated_png", "not_an_image"])
def test_damaged_image_is_named_where_it_is_decoded(tmp_path, damage):
    if damage == "not_an_image":
        path = tmp_path / "bad.jpg"
        path.write_bytes(b"<html>not found</html>")
    else:
        fmt = "JPEG" if damage == "truncated_jpeg" else "PNG"
        path = truncate(save_image(tmp_path / f"bad.{fmt.lower()}", 0, size=(64, 64), fmt=fmt))
    good = save_image(tmp_path / "good.png", 1)
    labels = np.zeros((2, 3))
    readers = [lambda: datasets.open_rgb(path),
               lambda: datasets.ImageListDataset([good, path], SIZE, MEAN, STD)[1],
               lambda: datasets.MultiLabelDataset([good, path], labels, labels, SIZE, train=True)[1]]
    for read in readers:
        with pytest.raises(ValueError) as error:
            read()
        one_line(str(error.value), str(path), "cannot decode image")
        assert isinstance(error.value, main_clip.RunError)   # the CLI prints it as one error line


def test_damaged_image_is_one_error_line_of_the_command_line(tmp_path, capsys):
    """Found when a tiny run reads it (it is not empty, so not at start-up): one line, status 2."""
    image_root = write_pascal(tmp_path / "data")
    for name in ("train1.jpg", "train3.jpg"):
        truncate(image_root / name)
    error = cli_error(capsys, ["-d", "pascal", "-l", "an", "--data-root", str(tmp_path / "data"), "--output-dir",
                               str(tmp_path / "out"), "--tiny-models", "--epochs", "1", "--num-workers", "0"])
    one_line(error, "error: cannot decode image", str(image_root), "once it is replaced",
             "continue with: python main_clip.py", "--resume")
    for seed, name in enumerate(("train1.jpg", "train3.jpg")):
        save_image(image_root / name, seed, fmt="JPEG")
    resume = shlex.split(error.split("continue with: ", 1)[1])[2:]
    assert main_clip.cli(resume) == 0
    [run_dir] = (tmp_path / "out").glob("pascal_resnet50_an_seed0_tiny_*")  # the default run name
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 1


def test_damaged_image_is_named_through_loader_workers(tmp_path):
    """A DataLoader worker's error is re-raised by torch as ``type(message with the worker's
    traceback)``; the error keeps its one line. (torch's own wrapper: a real worker takes seconds
    to shut down after an error.)"""
    from torch.utils.data._utils import ExceptionWrapper
    path = truncate(save_image(tmp_path / "bad.jpg", 0, size=(64, 64), fmt="JPEG"))
    try:
        datasets.ImageListDataset([path], SIZE, MEAN, STD)[0]
    except datasets.UnreadableImageError as error:
        direct, wrapper = str(error), ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(datasets.UnreadableImageError) as error:
        wrapper.reraise()
    assert "Traceback" in wrapper.exc_msg and str(error.value) == direct
    one_line(direct, str(path), "cannot decode image")


def test_empty_image_is_refused_before_reading(tmp_path, image_dir):
    paths = sorted(str(p) for p in image_dir.iterdir())
    Path(paths[3]).write_bytes(b"")
    for build in (lambda: datasets.ImageListDataset(paths, SIZE, MEAN, STD),
                  lambda: datasets.MultiLabelDataset(paths, np.zeros((5, 2)), np.zeros((5, 2)), SIZE, train=False),
                  lambda: embed(paths, tmp_path / "cache" / "c.npz")):
        with pytest.raises(ValueError) as error:
            build()
        one_line(str(error.value), paths[3], "empty", "1 of 5")
    assert not (tmp_path / "cache").exists()


def test_damaged_image_writes_no_cache(tmp_path, image_dir):
    paths = sorted(str(p) for p in image_dir.iterdir())
    truncate(Path(paths[4]))
    with pytest.raises(ValueError) as error:
        embed(paths, tmp_path / "cache" / "c.npz")
    one_line(str(error.value), paths[4])
    assert not (tmp_path / "cache" / "c.npz").exists()
    no_files_but(tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# 4. 16-bit grey images are scaled to 8 bits, not clipped to white; float grey in 0..1 is scaled,
#    not clipped to black
# ---------------------------------------------------------------------------------------------

def test_16_bit_png_spans_the_8_bit_range(tmp_path):
    values = np.linspace(0, 65535, 32 * 16).round().astype(np.uint16).reshape(16, 32)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(datasets.open_rgb(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 32, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.round(values / 257).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert rgb.min() == 0 and rgb.max() == 255
    # The same image stored as 8-bit grey gives the same network input.
    eight = tmp_path / "eight.png"
    Image.fromarray(np.round(values / 257).astype(np.uint8)).save(eight)
    images = datasets.ImageListDataset([path, eight], SIZE, MEAN, STD)
    torch.testing.assert_close(images[0][0], images[1][0])
    # Mode "I" (what older Pillow gives 16-bit PNGs) is read the same way.
    np.testing.assert_array_equal(np.asarray(datasets.to_rgb(Image.fromarray(values.astype(np.int32)))), rgb)


def save_float_tiff(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.float32)).save(path)
    assert Image.open(path).mode == "F"   # what PIL gives a 32-bit float TIFF
    return path


def test_float_tiff_in_0_to_1_spans_the_8_bit_range(tmp_path):
    values = np.linspace(0, 1, 32 * 16).reshape(16, 32).astype(np.float32)
    rgb = np.asarray(datasets.open_rgb(save_float_tiff(tmp_path / "unit.tif", values)))
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 32, 3)
    expected = np.round(255 * values.astype(np.float64)).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert rgb.min() == 0 and rgb.max() == 255
    # Floats on the 8-bit scale are read as they are (rounded).
    eight = np.linspace(0, 255, 32 * 16).reshape(16, 32)
    rgb = np.asarray(datasets.open_rgb(save_float_tiff(tmp_path / "eight.tif", eight)))
    np.testing.assert_array_equal(rgb[..., 1], np.round(eight.astype(np.float32).astype(np.float64)).astype(np.uint8))


@pytest.mark.parametrize("bad,reason", [("nan", "NaN or infinite"), ("inf", "NaN or infinite"),
                                        ("16_bit_range", "from 0 to 65535"), ("negative", "from -1 to 1")])
def test_float_tiff_without_a_sure_8_bit_reading_is_refused_in_one_line(tmp_path, bad, reason):
    values = np.linspace(0, 1, 64).reshape(8, 8)
    if bad in ("nan", "inf"):
        values[3, 4] = np.nan if bad == "nan" else np.inf
    elif bad == "16_bit_range":
        values = values * 65535
    else:
        values = values * 2 - 1
    path = save_float_tiff(tmp_path / f"{bad}.tif", values)
    for read in (lambda: datasets.open_rgb(path), lambda: datasets.ImageListDataset([path], SIZE, MEAN, STD)[0]):
        with pytest.raises(datasets.UnreadableImageError) as error:
            read()
        one_line(str(error.value), f"cannot use image {path}", reason, "convert it to 8-bit")
        assert isinstance(error.value, main_clip.RunError)


# ---------------------------------------------------------------------------------------------
# 5. Text features: zero or non-finite rows are errors, non-unit rows a warning
# ---------------------------------------------------------------------------------------------

def unit_rows(k: int = 20, d: int = 8) -> np.ndarray:
    rows = np.random.default_rng(0).normal(size=(k, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("bad", ["zero", "nan", "inf"])
def test_zero_or_non_finite_text_feature_row_is_an_error(tmp_path, bad):
    features = unit_rows()
    features[3] = {"zero": 0.0, "nan": np.nan, "inf": np.inf}[bad]
    path = tmp_path / "text.npy"
    np.save(path, features)
    with pytest.raises(ValueError) as error:
        teacher_module.load_text_features(path, 20, 8, dataset="pascal")
    one_line(str(error.value), str(path), "row 3 (boat)", "make_text_features.py --dataset pascal")
    no_files_but(tmp_path, "text.npy")


def test_non_unit_text_features_warn_once_and_are_used_as_stored(tmp_path, capsys):
    path = tmp_path / "CoCo80text_feature.npy"
    stored = unit_rows() * np.linspace(15, 19, 20, dtype=np.float32)[:, None]   # like the published file
    np.save(path, stored)
    warnings = []
    features = teacher_module.load_text_features(path, 20, 8, warn=warnings.append)
    np.testing.assert_array_equal(features.numpy(), stored)
    assert len(warnings) == 1
    one_line(warnings[0], str(path), "20 of 20 rows are not unit-norm", "used as stored")
    teacher_module.load_text_features(path, 20, 8)   # default: stderr
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err
    # Unit rows (to float precision) say nothing.
    np.save(path, unit_rows())
    teacher_module.load_text_features(path, 20, 8, warn=warnings.append)
    assert len(warnings) == 1
    no_files_but(tmp_path, path.name)
