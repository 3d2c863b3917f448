"""--image-cache uint8 (issue 26): every image decoded and resized once into a memory-mapped uint8
file; the inputs it gives equal today's to the bit, so runs, resumes and the teacher's views are
unchanged; the file is keyed, atomic, checked for room, cleaned; GPU decoding sits behind its
capability check."""
from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import caches
import datasets
import main_clip
import teacher as teacher_module
from conftest import demo_args, run_once_and_resumed
from distributed import Distributed
from errors import RunError


def write_images(folder: Path) -> list[Path]:
    """Photo-like JPEGs of COCO's and VOC's sizes (both orientations, an odd one, one smaller than
    the network's input) and the modes open_rgb converts: grey, 16-bit grey, palette, RGBA."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for number, (width, height) in enumerate([(640, 480), (480, 640), (500, 375), (333, 500), (37, 61)]):
        y, x = np.mgrid[0:height, 0:width]
        field = np.stack([(x * 0.3 + y * 0.1) % 255, (y * 0.4) % 255, (x * 0.2 + 50) % 255], -1)
        pixels = np.clip(field + rng.normal(0, 20, field.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"photo{number}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    for mode, pixels in (("L", rng.integers(0, 256, (90, 120), dtype=np.uint8)),
                         ("I;16", rng.integers(0, 65536, (90, 120), dtype=np.uint16)),
                         ("RGBA", rng.integers(0, 256, (90, 120, 4), dtype=np.uint8))):
        paths.append(folder / f"{mode.replace(';', '')}.png")
        image = Image.fromarray(pixels)
        assert image.mode == mode
        image.save(paths[-1])
    paths.append(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)).convert("P").save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("images"))


def build(paths, size, folder, phase="train", **kwargs) -> caches.ResizedImages:
    return caches.cached_resized_images(paths, size, folder, phase, root=Path(paths[0]).parent,
                                        log=kwargs.pop("log", lambda message: None), **kwargs)


def no_labels(paths) -> np.ndarray:
    return np.zeros((len(paths), 3))


def test_pil_resize_commutes_with_the_horizontal_flip():
    """What makes the cached path exact for flipped training images: PIL's bilinear resize of a
    flipped image is the flip of the resized image, to the bit, for every width from 1 to 1024
    pixels into the sizes the models read (and at full size below)."""
    rng = np.random.default_rng(1)
    for width in range(1, 1025):
        image = Image.fromarray(rng.integers(0, 256, (4, width, 3), dtype=np.uint8))
        for size in (64, 224, 336, 448):
            flipped_first = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((size, 3), Image.Resampling.BILINEAR)
            resized_first = image.resize((size, 3), Image.Resampling.BILINEAR).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            assert np.array_equal(np.asarray(flipped_first), np.asarray(resized_first)), (width, size)


def test_the_cache_stores_the_transforms_resize(images, tmp_path):
    cached = build(images, 448, tmp_path)
    assert len(cached) == len(images) and cached.size == 448
    for index, path in enumerate(images):
        expected = datasets.build_transform(448, train=False).transforms[0](datasets.open_rgb(path))
        assert np.array_equal(cached.row(index), np.asarray(expected))
        # The teacher's 'original' view resizes with the same call.
        assert np.array_equal(cached.row(index), np.asarray(
            datasets.open_rgb(path).resize((448, 448), Image.Resampling.BILINEAR)))


@pytest.mark.parametrize("size", [448, 64])
def test_student_inputs_from_the_cache_equal_decoded_inputs_to_the_bit(images, tmp_path, size):
    cached = build(images, size, tmp_path)
    labels = no_labels(images)
    for train in (True, False):
        decoded = datasets.MultiLabelDataset(images, labels, labels, size, train=train)
        from_cache = datasets.MultiLabelDataset(images, labels, labels, size, train=train, resized=cached)
        for index in range(len(images)):
            for flip in (False, True):
                assert torch.equal(decoded[index, flip]["image"], from_cache[index, flip]["image"]), (index, flip)
    plain = datasets.ImageListDataset(images, size, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)
    listed = datasets.ImageListDataset(images, size, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD, resized=cached)
    for index in range(len(images)):
        assert torch.equal(plain[index][0], listed[index][0])
    # DualCoOp's augmentation acts on the resized image: the cache's rows give the same inputs.
    augmentation = augment.AUGMENTATIONS["cutout_randaugment"]
    decoded = datasets.MultiLabelDataset(images, labels, labels, size, train=True, augmentation=augmentation)
    from_cache = datasets.MultiLabelDataset(images, labels, labels, size, train=True, augmentation=augmentation,
                                            resized=cached)
    for index in range(len(images)):
        item = datasets.SampledItem(index, True, None, 1000 + index)
        assert torch.equal(decoded[item]["image"], from_cache[item]["image"]), index


@pytest.mark.parametrize("view, size", [("original", 336), ("original", 64), ("clip", 336), ("clip", 64)])
def test_teacher_views_from_the_cache_equal_decoded_views(images, tmp_path, view, size):
    """The view the user chose, from a cache at the size it starts by resizing to (original: 448,
    whatever the teacher's size; clip: the teacher's size): the student's view, the online teacher's
    and the one-time pass's (both flips) equal today's to the bit."""
    view_fn = functools.partial(teacher_module.teacher_input, view=view, size=size)
    source = teacher_module.view_source_size(view_fn)
    assert source == (448 if view == "original" else size)
    cached = build(images, source, tmp_path)
    labels = no_labels(images)
    decoded = datasets.MultiLabelDataset(images, labels, labels, size, train=True, view=view_fn, teacher_view=view_fn)
    from_cache = datasets.MultiLabelDataset(images, labels, labels, size, train=True, view=view_fn,
                                            teacher_view=view_fn, resized=cached)
    for index in range(len(images)):
        for flip in (False, True):
            a, b = decoded[index, flip], from_cache[index, flip]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["teacher_image"], b["teacher_image"])
    flips = teacher_module.Flips(view_fn, (False, True))
    assert teacher_module.view_source_size(flips) == source
    plain = datasets.ImageListDataset(images, size, (), (), views=flips)
    listed = datasets.ImageListDataset(images, size, (), (), views=flips, resized=cached)
    for index in range(len(images)):
        assert torch.equal(plain[index][0], listed[index][0])


def test_unknown_views_have_no_source_size():
    assert teacher_module.view_source_size(lambda image, flip: None) is None
    assert teacher_module.view_source_size(functools.partial(teacher_module.teacher_input, view="clip")) is None


def test_a_cache_of_another_size_is_refused(images, tmp_path):
    cached = build(images, 64, tmp_path)
    labels = no_labels(images)
    with pytest.raises(ValueError, match="64 px images, the network reads 448"):
        datasets.MultiLabelDataset(images, labels, labels, 448, train=True, resized=cached)
    with pytest.raises(ValueError, match="rows for"):
        datasets.MultiLabelDataset(images[:3], labels[:3], labels[:3], 64, train=True, resized=cached)


def test_rows_of_a_split_and_loader_workers(images, tmp_path):
    """A split's rows of the official file (``subset``); the object sent to loader workers holds
    the path, not the pages, and the workers' batches equal the main process's."""
    cached = build(images, 64, tmp_path)
    rows = np.array([4, 0, 2])
    part = cached.subset(rows)
    assert len(part) == 3 and np.array_equal(part.row(1), cached.row(0))
    assert np.array_equal(part.subset([2]).row(0), cached.row(2))
    cached.row(0)   # mapped in this process
    assert len(pickle.dumps(cached)) < 2000
    paths = [images[i] for i in rows]
    labels = no_labels(paths)
    dataset = datasets.MultiLabelDataset(paths, labels, labels, 64, train=True, resized=part)

    def batches(workers: int) -> list[torch.Tensor]:
        sampler = datasets.AugmentationSampler(3, torch.Generator().manual_seed(0))
        return [batch["image"] for batch in torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler,
                                                                       num_workers=workers)]
    in_main, in_worker = batches(0), batches(1)
    assert len(in_main) == 2 and all(torch.equal(a, b) for a, b in zip(in_main, in_worker))


def test_the_file_is_reused_rebuilt_when_images_change_and_old_files_go(images, tmp_path):
    folder = tmp_path / "cache"
    paths = write_images(tmp_path / "own")
    said = []
    first = build(paths, 64, folder, log=said.append)
    assert "decoding" in said[-1]
    (name,) = [p.name for p in folder.iterdir()]
    assert name.startswith("images-64px-train-") and name.endswith(".npy")
    mtime = (folder / name).stat().st_mtime_ns
    again = build(paths, 64, folder, log=said.append)
    assert "using" in said[-1] and again.path == first.path and (folder / name).stat().st_mtime_ns == mtime
    os.utime(paths[0], ns=(mtime + 10**9, mtime + 10**9))   # an image replaced: another key
    rebuilt = build(paths, 64, folder, log=said.append)
    assert rebuilt.path != first.path and not first.path.exists()
    assert any("removing" in line for line in said)
    assert [p.name for p in folder.iterdir()] == [rebuilt.path.name]   # no temporary file left
    # Another phase or size has its own file.
    build(paths, 64, folder, phase="val")
    build(paths, 32, folder)
    assert len(list(folder.iterdir())) == 3


def test_a_damaged_file_is_made_again(images, tmp_path):
    paths = write_images(tmp_path / "own")
    first = build(paths, 64, tmp_path / "cache")
    expected = np.array(first.array())
    with open(first.path, "r+b") as handle:
        handle.truncate(first.path.stat().st_size - 10)
    said = []
    again = build(paths, 64, tmp_path / "cache", log=said.append)
    assert any("is unreadable" in line or "expected uint8" in line for line in said)
    assert np.array_equal(again.array(), expected)


def test_no_room_is_one_line_before_the_pass(images, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    with pytest.raises(RunError, match="--cache-dir"):
        build(images, 64, tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("images-*"))


def test_gpu_decoding_is_behind_its_capability_check():
    assert datasets.gpu_decode_unavailable("cpu") == "cpu is not a CUDA device"
    if not torch.cuda.is_available():
        assert datasets.gpu_decode_unavailable("cuda") == "torch sees no CUDA device"
    else:   # on a GPU machine: usable, or a reason naming decode_jpeg
        reason = datasets.gpu_decode_unavailable("cuda")
        assert reason is None or "decode_jpeg" in reason


def test_the_tensor_decoding_recipe_runs_on_the_cpu(images):
    import torchvision
    out = datasets.decode_resize_jpegs([torchvision.io.read_file(str(p)) for p in images[:2]], 64, "cpu")
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.uint8


def build_in_process(rank: int, world_size: int, init_file: str, paths, folder: str, shared: bool) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        if not shared and rank == 1:   # this process cannot see the file rank 0 writes
            real = os.path.isfile
            os.path.isfile = lambda path: False if ".tmp" in str(path) else real(path)
        result = build(paths, 48, folder, dist=Distributed(rank, world_size), num_workers=0)
        torch.save(None if result is None else torch.from_numpy(np.array(result.array())),
                   Path(folder).parent / f"rows-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # a subprocess or a whole pipeline
@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_two_processes_build_one_file(images, tmp_path, shared):
    """Under torchrun each process decodes its share into one file, equal to one process's;
    processes that do not share the folder decode as usual and leave no file."""
    torch.multiprocessing.spawn(build_in_process, args=(2, str(tmp_path / "init"), images, str(tmp_path / "cache"),
                                                        shared), nprocs=2, join=True)
    rows = [torch.load(tmp_path / f"rows-{rank}.pt", weights_only=True) for rank in (0, 1)]
    if shared:
        one = build(images, 48, tmp_path / "one")
        assert all(torch.equal(r, torch.from_numpy(np.array(one.array()))) for r in rows)
        assert len(list((tmp_path / "cache").iterdir())) == 1
    else:
        assert rows == [None, None]
        assert not list((tmp_path / "cache").iterdir())


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_numbers(a: Path, b: Path) -> None:
    """summary.json equal key by key; metrics.jsonl equal record by record but for phase times."""
    assert json.loads((a / "summary.json").read_text()) == json.loads((b / "summary.json").read_text())
    first, second = records(a), records(b)
    assert len(first) == len(second)
    for x, y in zip(first, second):
        x.pop("time_min"), y.pop("time_min")
        assert x == y


@pytest.mark.parametrize("flags", [(), ("--teacher-view", "clip")])
def test_runs_with_the_image_cache_equal_runs_without(demo_root, tmp_path, flags):
    """The demo run with and without the cache (each with its own cache folder, so that with
    --teacher-view clip the teacher's one-time pass also reads the cache)."""
    for mode in ("off", "uint8"):
        main_clip.main(demo_args(demo_root, tmp_path, *flags, "--image-cache", mode, "--run-name", mode,
                                 "--cache-dir", str(tmp_path / f"cache-{mode}")))
    same_numbers(tmp_path / "off", tmp_path / "uint8")
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cache-uint8").glob("images-*.npy")) == ["64px", "64px"]
    log = (tmp_path / "uint8" / "log.txt").read_text()
    if flags:   # the teacher's pass started the train file
        assert log.index("image cache train 64px") < log.index("teacher-clip train")


def test_a_resume_may_switch_the_image_cache_on(demo_root, tmp_path, monkeypatch):
    run_once_and_resumed(demo_root, tmp_path, monkeypatch, resume_flags=("--image-cache", "uint8"))
    same_numbers(tmp_path / "once", tmp_path / "split")
    assert "image cache train" in (tmp_path / "split" / "log.txt").read_text()


def test_the_cache_is_skipped_where_the_student_and_the_teacher_start_differently(demo_root, tmp_path):
    """Online pseudo-labels with the original view: the teacher resizes to 448, the tiny student
    to 64; no file is made for the train split, whose images are decoded (val and test use it)."""
    main_clip.main(demo_args(demo_root, tmp_path, "--pseudo-labels", "online", "--epochs", "1", "--image-cache",
                             "uint8", "--cache-dir", str(tmp_path / "cache")))
    run_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("pascal_"))
    assert "image cache: not used for the train split" in (run_dir / "log.txt").read_text()
    # The official train file serves the val split, the official val file the test split.
    assert sorted(p.name.split("-")[2] for p in (tmp_path / "cache").glob("images-*.npy")) == ["train", "val"]
