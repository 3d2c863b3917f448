"""Dataset registry, formatted-file loading, the train/val split, transforms and Dataset classes.

The benchmark construction follows docs/DESIGN.md §2 exactly: the formatted files under
``<data_root>/<name>/`` are loaded unchanged, the official train set is split into train/val with
``split_train_val`` and the official val set becomes the test set.
"""
from __future__ import annotations

import os
import stat
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import augment
from errors import RunError
from fileio import atomic_save_npy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PHASES = ("train", "val")

# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

# classnames/<dataset>.txt: one class a line, in class-index order (classnames/README.md).
CLASS_NAMES_DIR = Path(__file__).resolve().parent / "classnames"


def read_class_names(path: str | os.PathLike) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(release names, readable names) of a class-name file. A line is the name the dataset's
    release uses, then, after a tab, the readable name where it differs. ValueError naming the
    file and line for an empty or malformed line, or a name given twice."""
    path = Path(path)
    release, readable = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) > 2 or not all(field and field == field.strip() for field in fields):
            raise ValueError(f"{path}:{number}: expected NAME or NAME<tab>READABLE NAME, got {line!r}")
        release.append(fields[0])
        readable.append(fields[-1])
    for names in (release, readable):
        doubled = sorted(name for name, count in Counter(names).items() if count > 1)
        if doubled:
            raise ValueError(f"{path}: class name(s) given twice: {', '.join(doubled)}")
    return tuple(release), tuple(readable)


@dataclass(frozen=True)
class DatasetInfo:
    """A benchmark's facts, the one place other modules read them from."""
    name: str                      # registry key and folder name under the data root
    paper_title: str               # its column title in the paper's tables
    class_names: tuple[str, ...]   # readable names in class-index order (K of them): prompts, plots
    release_names: tuple[str, ...]  # the same classes as the raw release names them (preproc/ checks them)
    image_root: str                # relative to the dataset folder
    text_feature_file: str         # default text-feature file name
    format_command: str            # what makes the formatted files (for error messages)

    @classmethod
    def from_class_names_file(cls, name: str, **facts) -> DatasetInfo:
        """The dataset ``name`` with its class names read from classnames/<name>.txt."""
        release, readable = read_class_names(CLASS_NAMES_DIR / f"{name}.txt")
        return cls(name=name, class_names=readable, release_names=release, **facts)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def format_instructions(self, data_root: str | os.PathLike) -> str:
        """The full command (or pointer) that creates this dataset's formatted files."""
        folder = dataset_dir(data_root, self.name)
        if self.format_command.startswith("python "):
            return f"{self.format_command} --load-path {folder} --save-path {folder}"
        return self.format_command

    def observed_labels_command(self, data_root: str | os.PathLike) -> str:
        """The command that creates this dataset's observed-label files."""
        return (f"python preproc/generate_observed_labels.py --dataset {self.name} "
                f"--data-root {data_root}")


# In the paper's column order (PAPER_TITLES). Adding a dataset: its row here, its
# classnames/<name>.txt, data/<name>/README.md, and a row (or NO_PROTOCOL) in each method's
# per-dataset table (methods/: the import check names the tables that lack it).
DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    # VOC's release names are its ImageSets/Main file names (diningtable, ...).
    DatasetInfo.from_class_names_file("pascal", paper_title="VOC", image_root="VOCdevkit/VOC2012/JPEGImages",
                                      text_feature_file="VOC20text_feature_labelonly.npy",
                                      format_command="python preproc/format_pascal.py"),
    # COCO 2014 categories in the order of the annotation JSON's ``categories`` list; image paths
    # already start with 'train2014/' or 'val2014/': the root is the folder.
    DatasetInfo.from_class_names_file("coco", paper_title="COCO", image_root="",
                                      text_feature_file="CoCo80text_feature_labelonly.npy",
                                      format_command="python preproc/format_coco.py"),
    # Concepts81 in the official (alphabetical) order of the pre-formatted files (format_nuswide.py
    # refuses a Concepts81.txt that differs). Both routes (pre-formatted files, or format_nuswide.py
    # on the official release) give paths relative to the extracted Flickr.zip folder.
    DatasetInfo.from_class_names_file("nuswide", paper_title="NUS", image_root="Flickr",
                                      text_feature_file="NUS81text_feature.npy",
                                      format_command="put the pre-formatted NUS-WIDE files in place, or run "
                                                     "python preproc/format_nuswide.py on the official release "
                                                     "(see data/nuswide/README.md)"),
    # CUB-200-2011's 312 attributes: release names are attributes.txt's (has_<group>::<value>),
    # readable names short phrases ('dagger bill shape').
    DatasetInfo.from_class_names_file("cub", paper_title="CUB", image_root="CUB_200_2011/images",
                                      text_feature_file="CUB312text_feature.npy",
                                      format_command="python preproc/format_cub.py"),
)}

# Dataset -> column title, in the paper's column order (the paper table of reading/summarize.py).
PAPER_TITLES: dict[str, str] = {name: info.paper_title for name, info in DATASETS.items()}

# Release names under their former constant names, for preproc/ and its tests until they read
# DATASETS[...].release_names themselves.
VOC_CLASSES = DATASETS["pascal"].release_names
COCO_CLASS_NAMES = DATASETS["coco"].release_names
NUSWIDE_CLASS_NAMES = DATASETS["nuswide"].release_names
CUB_ATTRIBUTE_KEYS = DATASETS["cub"].release_names


def get_dataset_info(name: str) -> DatasetInfo:
    """Registry entry for ``name``; ValueError listing the known names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_dir(data_root: str | os.PathLike, name: str) -> Path:
    return Path(data_root) / name


# ----------------------------------------------------------------------------------------------
# Formatted files
# ----------------------------------------------------------------------------------------------

def formatted_paths(folder: str | os.PathLike, phase: str) -> dict[str, Path]:
    """The three formatted files of one phase: keys 'images', 'labels', 'labels_obs'."""
    folder = Path(folder)
    return {"images": folder / f"formatted_{phase}_images.npy",
            "labels": folder / f"formatted_{phase}_labels.npy",
            "labels_obs": folder / f"formatted_{phase}_labels_obs.npy"}


@dataclass
class FormattedData:
    """One set of images with clean and observed labels (row i belongs to images[i])."""
    images: np.ndarray          # str, relative to the image root
    labels: np.ndarray          # float, 0/1, N x K
    labels_obs: np.ndarray      # float, -1/0/+1, N x K

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> FormattedData:
        return FormattedData(self.images[indices], self.labels[indices], self.labels_obs[indices])


def load_image_list(path: str | os.PathLike) -> np.ndarray:
    """Load a formatted image list as a 1-D str array.

    Never unpickles: a file holding an object (pickled) array, as some other SPML code bases
    wrote, is refused with one line naming the file and how to get a plain one.
    """
    path = Path(path)
    try:
        images = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ValueError(f"{path} holds a pickled object array, which is never loaded (unpickling a "
                             f"file can run arbitrary code); save the list again as a plain str array "
                             f"(numpy: np.save(FILE, image_list.astype(str))) where it was made, or make the "
                             f"formatted files with this project's preproc/format_*.py") from None
        raise ValueError(f"{path}: not a readable numpy file ({error})") from error
    if images.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D list of image paths, got shape {images.shape}")
    if images.dtype.kind == "S":
        images = np.char.decode(images, "utf-8")
    elif images.dtype.kind != "U":
        raise ValueError(f"{path}: expected image paths (str), got dtype {images.dtype}")
    return images


def load_label_matrix(path: str | os.PathLike, allowed: Sequence[float],
                      num_classes: int | None = None) -> np.ndarray:
    """Load an N x K label matrix as float64 and check its values; ValueError naming the file."""
    path = Path(path)
    try:
        matrix = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{path}: not a numeric numpy array ({error})") from error
    if matrix.ndim != 2:
        raise ValueError(f"{path}: expected an N x K matrix, got shape {matrix.shape}")
    if matrix.dtype.kind not in "biuf":
        raise ValueError(f"{path}: expected numbers, got dtype {matrix.dtype}")
    if num_classes is not None and matrix.shape[1] != num_classes:
        raise ValueError(f"{path}: has {matrix.shape[1]} classes, the dataset has {num_classes}")
    matrix = matrix.astype(np.float64, copy=False)
    bad = ~np.isin(matrix, np.asarray(allowed, dtype=np.float64))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        allowed_text = "/".join(str(int(v)) for v in allowed)
        raise ValueError(f"{path}: labels must be {allowed_text}; found {matrix[row, col]!r} "
                         f"at row {row}, column {col}")
    return matrix


def save_formatted(folder: str | os.PathLike, phase: str, images: Sequence[str],
                   labels: np.ndarray) -> None:
    """Write ``formatted_<phase>_{images,labels}.npy`` (str array, float64 matrix) atomically."""
    paths = formatted_paths(folder, phase)
    atomic_save_npy(paths["images"], np.asarray(images, dtype=np.str_))
    atomic_save_npy(paths["labels"], np.asarray(labels, dtype=np.float64))


def label_summary(phase: str, labels: np.ndarray) -> str:
    """One line: images, classes and mean positives per image of a 0/1 label matrix."""
    mean_pos = float(labels.sum(axis=1).mean()) if len(labels) else 0.0
    return (f"{phase}: {labels.shape[0]} images, {labels.shape[1]} classes, "
            f"{mean_pos:.2f} positives per image")


def next_step_hint(name: str, save_path: str | os.PathLike) -> str:
    """What to run after formatting into ``save_path`` (a folder named after the dataset)."""
    save_path = Path(save_path)
    if save_path.name == name:
        return "next: " + get_dataset_info(name).observed_labels_command(save_path.parent)
    return (f"next: move the files into <data root>/{name}/ and run "
            + get_dataset_info(name).observed_labels_command("<data root>"))


def load_formatted(data_root: str | os.PathLike, name: str, phase: str) -> FormattedData:
    """Load and validate the formatted files of one official phase ('train' or 'val')."""
    info = get_dataset_info(name)
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    paths = formatted_paths(dataset_dir(data_root, name), phase)
    inside = formatted_paths(data_root, phase)
    if not paths["images"].is_file() and inside["images"].is_file() and Path(data_root).name == name:
        # --data-root names the dataset's own folder, not the folder that holds it.
        raise FileNotFoundError(f"missing {paths['images']}: --data-root {data_root} is the {name} folder itself; "
                                f"give the folder that holds it: --data-root {Path(data_root).parent}")
    for key in ("images", "labels"):
        if not paths[key].is_file():
            raise FileNotFoundError(f"missing {paths[key]}; create it with: "
                                    f"{info.format_instructions(data_root)}")
    if not paths["labels_obs"].is_file():
        raise FileNotFoundError(f"missing {paths['labels_obs']}; create it with: "
                                f"{info.observed_labels_command(data_root)}")
    images = load_image_list(paths["images"])
    labels = load_label_matrix(paths["labels"], (0, 1), info.num_classes)
    labels_obs = load_label_matrix(paths["labels_obs"], (-1, 0, 1), info.num_classes)
    if len(labels) != len(images):
        raise ValueError(f"{paths['labels']} has {len(labels)} rows but {paths['images']} lists "
                         f"{len(images)} images; re-create them with: "
                         f"{info.format_instructions(data_root)}")
    if labels_obs.shape != labels.shape:
        raise ValueError(f"{paths['labels_obs']} has shape {labels_obs.shape} but "
                         f"{paths['labels']} has {labels.shape}; re-create it with: "
                         f"{info.observed_labels_command(data_root)}")
    # Observed labels drawn from other labels (e.g. stale after re-formatting) would silently
    # train on wrong targets: an observed positive must be a clean positive, likewise negatives.
    stale = ((labels_obs == 1) & (labels != 1)) | ((labels_obs == -1) & (labels != 0))
    if stale.any():
        row = int(np.argwhere(stale)[0, 0])
        raise ValueError(f"{paths['labels_obs']} disagrees with {paths['labels']} (row {row}); "
                         f"re-create it with: {info.observed_labels_command(data_root)}")
    return FormattedData(images, labels, labels_obs)


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------

def _check_fraction(value: float, flag: str, allow_one: bool) -> None:
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (0.0 < value and upper_ok):
        bound = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"{flag} must be in {bound}, got {value}")


def split_train_val(num_images: int, val_frac: float = 0.2, split_seed: int = 1200,
                    subsample_seed: int = 999, train_frac: float = 1.0,
                    val_frac_keep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted, int64) of the train and val parts of the official train set.

    Exactly docs/DESIGN.md §2: a RandomState(split_seed) permutation cut into train/val, then a
    RandomState(subsample_seed) subsample of each part (drawn even when the fraction is 1).
    """
    _check_fraction(val_frac, "val_frac", allow_one=False)
    _check_fraction(train_frac, "train_frac", allow_one=True)
    _check_fraction(val_frac_keep, "val_frac_keep", allow_one=True)
    n_val = int(np.round(val_frac * num_images))
    n_train = num_images - n_val
    if n_val == 0 or n_train == 0:
        raise ValueError(f"val_frac={val_frac} splits {num_images} images into {n_train} train "
                         f"and {n_val} val images; both must be non-empty")
    perm = np.random.RandomState(split_seed).permutation(num_images)
    parts = [np.sort(perm[:n_train]), np.sort(perm[-n_val:])]
    rng = np.random.RandomState(subsample_seed)
    for i, frac in enumerate((train_frac, val_frac_keep)):
        keep = int(np.round(frac * len(parts[i])))
        chosen = np.sort(rng.permutation(len(parts[i]))[:keep])
        if keep == 0:
            raise ValueError(f"subsampling fraction {frac} keeps no image of "
                             f"{len(parts[i])}")
        parts[i] = parts[i][chosen]
    return parts[0].astype(np.int64), parts[1].astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Transforms and Dataset classes
# ----------------------------------------------------------------------------------------------

def build_transform(image_size: int, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize to (size, size) (no crop), [random horizontal flip if train], ToTensor, Normalize."""
    # Imported here: the torchvision package import costs seconds and the preproc scripts,
    # which import this module for the registry, never need it.
    from torchvision import transforms

    steps = [transforms.Resize((image_size, image_size))]
    if train:
        steps.append(transforms.RandomHorizontalFlip(0.5))
    steps += [transforms.ToTensor(), transforms.Normalize(mean=list(mean), std=list(std))]
    return transforms.Compose(steps)


def resize_step(image_size: int):
    """``build_transform``'s resize alone (PIL image -> PIL image, bilinear, antialiased as PIL
    always is): the first step of every network input, and what an image cache stores."""
    return build_transform(image_size, train=False).transforms[0]


def check_resized(resized, num_images: int, image_size: int | None):
    """``resized`` (None, or rows of an image cache: ``len``, ``.size``, ``.image(i)``) after
    checking that it has one row per image and, when ``image_size`` is given, that size."""
    if resized is None:
        return None
    if len(resized) != num_images:
        raise ValueError(f"the image cache has {len(resized)} rows for {num_images} images")
    if image_size is not None and resized.size != image_size:
        raise ValueError(f"the image cache holds {resized.size} px images, the network reads {image_size} px")
    return resized


class ResizedImageDataset(torch.utils.data.Dataset):
    """What an image cache stores (--image-cache uint8): each image decoded (``open_rgb``) and
    resized to ``image_size`` x ``image_size`` by ``resize_step``, as a uint8 H x W x 3 tensor, with
    its index."""

    def __init__(self, image_paths: Sequence[str | os.PathLike], image_size: int):
        self.image_paths = [str(p) for p in image_paths]
        check_image_files(self.image_paths)
        self.resize = resize_step(image_size)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.resize(open_rgb(self.image_paths[index])))), int(index)


def gpu_decode_unavailable(device: str | torch.device) -> str | None:
    """None when ``torchvision.io.decode_jpeg`` decodes on ``device`` (a CUDA device, nvjpeg), else
    why not: the capability check of the GPU decoding candidate (``decode_resize_jpegs``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} is not a CUDA device"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        from torchvision.io import decode_jpeg, encode_jpeg
        decode_jpeg(encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8)), device=device)
    except (ImportError, RuntimeError, TypeError, ValueError) as error:
        return f"torchvision.io.decode_jpeg cannot decode on {device} ({type(error).__name__}: {error})"
    return None


def decode_resize_jpegs(datas: Sequence[torch.Tensor], image_size: int, device: str | torch.device) -> torch.Tensor:
    """JPEG files' bytes (1-D uint8 tensors) decoded on ``device`` as RGB (nvjpeg on a GPU) and each
    resized to ``image_size`` x ``image_size`` on the tensor (bilinear, antialiased): B x 3 x S x S
    uint8 on ``device``. The GPU decoding candidate: not PIL's numbers (another decoder, another
    resize), so no run uses it; ``bench/data_path.py --gpu-decode`` measures it and by how much
    its inputs differ. ``gpu_decode_unavailable`` says where it can run on a GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F2

    images = decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device)
    return torch.stack([F2.resize(image, [image_size, image_size], interpolation=InterpolationMode.BILINEAR,
                                  antialias=True) for image in images])


class UnreadableImageError(RunError, ValueError):
    """An image file that cannot be decoded (empty, truncated, not an image). Its message is one
    line naming the file, also when a DataLoader worker re-raises it: torch rebuilds the error
    from the worker's whole traceback, whose last line is kept here."""

    def __init__(self, message: str):
        lines = str(message).strip().splitlines() or [""]
        marker = f"{type(self).__name__}: "
        super().__init__(lines[-1].split(marker, 1)[-1] if len(lines) > 1 else lines[0])


def stat_image_files(image_paths: Sequence[str | os.PathLike]) -> list[os.stat_result]:
    """One ``os.stat`` per image (no reading). FileNotFoundError naming the first missing image
    (and how many are missing); UnreadableImageError naming the first empty one."""
    stats, missing = [], []
    for path in image_paths:
        try:
            result = os.stat(path)
        except OSError:
            result = None
        if result is None or not stat.S_ISREG(result.st_mode):
            missing.append(str(path))
        stats.append(result)
    if missing:
        raise FileNotFoundError(f"image file not found: {missing[0]} ({len(missing)} of "
                                f"{len(image_paths)} missing); check --data-root and the "
                                f"dataset's data/<name>/README.md")
    empty = [str(path) for path, result in zip(image_paths, stats) if result.st_size == 0]
    if empty:
        raise UnreadableImageError(f"image file is empty: {empty[0]} ({len(empty)} of {len(image_paths)} "
                                   f"empty); replace it with the dataset's original file")
    return stats


def check_image_files(image_paths: Sequence[str | os.PathLike]) -> None:
    """Every image exists and is not empty: the cheap check (``stat_image_files``) made before
    reading any image; a damaged image that is not empty is named when it is decoded (``open_rgb``)."""
    stat_image_files(image_paths)


# Modes PIL gives 16-bit grey images (PNG, TIFF; older Pillow gives 16-bit PNGs mode "I"), whose
# convert("RGB") clips to 255 (a solid white image): their 0..65535 range is scaled to 8 bits.
_HIGH_BIT_DEPTH_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N")

# What PIL raises for a damaged file (with LOAD_TRUNCATED_IMAGES False, a truncated file is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)


class UnusablePixelsError(ValueError):
    """Pixel values with no sure 8-bit reading (float grey outside 0..1 and 0..255, NaN, inf)."""


def float_grey_to_8_bit(image: Image.Image) -> Image.Image:
    """A 32-bit float grey image (PIL mode "F", e.g. a float TIFF) as 8-bit grey: values within
    0..1 are scaled by 255, values within 0..255 (an 8-bit image stored as floats) are kept, both
    rounded; anything else has no sure reading (UnusablePixelsError). convert("RGB") would clip
    0..1 to a black image. An 8-bit-scale image whose values are all <= 1 is read as 0..1."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise UnusablePixelsError("32-bit float pixels with NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 255:
        raise UnusablePixelsError(f"32-bit float pixels from {low:g} to {high:g}, neither within 0..1 nor 0..255")
    scale = 255.0 if high <= 1.0 else 1.0
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB; 16-bit grey is scaled (value / 257, rounded) instead of clipped,
    float grey as ``float_grey_to_8_bit`` says."""
    if image.mode in _HIGH_BIT_DEPTH_GREY:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = float_grey_to_8_bit(image)
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file decoded as RGB (``to_rgb``); UnreadableImageError naming the file when it
    cannot be decoded (truncated images are refused: PIL's LOAD_TRUNCATED_IMAGES stays False) or
    its pixel values have no sure 8-bit reading."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except UnusablePixelsError as error:   # decoded fine: replacing it with the same file would not help
        raise UnreadableImageError(f"cannot use image {path} ({error}); convert it to 8-bit (0..255) "
                                   f"RGB or greyscale") from error
    except _DECODE_ERRORS as error:
        reason = ("not an image file PIL can identify" if isinstance(error, UnidentifiedImageError)
                  else f"{type(error).__name__}: {error}")
        raise UnreadableImageError(f"cannot decode image {path} ({reason}); replace it with the dataset's "
                                   f"original file") from error


# (image, flip) -> the tensor a network receives: a view of a training image.
ImageView = Callable[[Image.Image, bool], torch.Tensor]


class MultiLabelDataset(torch.utils.data.Dataset):
    """Images with observed and clean label vectors, the flip each item was drawn with, and
    optionally the teacher's view of the same (image, flip).

    The network's input is ``view(image, flip)`` when given, else the image flipped, resized to
    ``image_size`` and normalised with ``mean`` / ``std``.

    ``resized`` (``caches.ResizedImages``, --image-cache uint8): row i holds image i already
    decoded and resized as ``resize_step`` does; it replaces the decoded image. Exact where
    every reader of the image starts by resizing it to that size (a PIL resize to its own size
    is a copy, and PIL's resize commutes with the horizontal flip: tests/test_image_cache.py):
    the caller checks that (``engine.Trainer.resized_images``).

    ``augmentation`` (``augment.AUGMENTATIONS``, a train set's): whether the drawn flip applies (an
    item's ``flip`` is the one applied, for the student and the teacher view alike), and the random
    transform of the resized image before ToTensor, seeded by the item's seed (``SampledItem``; a
    plain index draws one with torch.randint)."""

    def __init__(self, image_paths: Sequence[str | os.PathLike], observed_labels: np.ndarray,
                 clean_labels: np.ndarray, image_size: int, train: bool,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, *, view: ImageView | None = None,
                 teacher_view: ImageView | None = None, resized=None,
                 augmentation: augment.Augmentation = augment.AUGMENTATIONS[augment.DEFAULT_AUGMENTATION]):
        self.image_paths = [str(p) for p in image_paths]
        observed_labels = np.asarray(observed_labels)
        clean_labels = np.asarray(clean_labels)
        n = len(self.image_paths)
        if observed_labels.ndim != 2 or clean_labels.shape != observed_labels.shape \
                or len(observed_labels) != n:
            raise ValueError(f"{n} images but observed labels {observed_labels.shape} and clean "
                             f"labels {clean_labels.shape}; they must be N x K with N = {n}")
        check_image_files(self.image_paths)
        self.observed = torch.as_tensor(observed_labels, dtype=torch.float32)
        self.clean = torch.as_tensor(clean_labels, dtype=torch.float32)
        self.train = train
        self.transform = build_transform(image_size, train=False, mean=mean, std=std)
        self.view = view
        self.teacher_view = teacher_view
        self.resized = check_resized(resized, n, image_size if view is None else None)
        self.augmentation = augmentation
        if augmentation.transform is not None and view is not None:
            raise ValueError("an --augmentation with a random transform acts on the backbone's own input; this "
                             "backbone sees the teacher's view: choose --augmentation flip")

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, item: int | tuple) -> dict:
        """``item`` is an index, or ``(index, flip)``, ``(index, flip, view_flips)`` or a
        ``SampledItem`` from ``AugmentationSampler``; a plain index of a train set draws its flip
        with torch.rand. ``view_flips`` (the teacher views' own flips) pass through as a bool tensor."""
        view_flips, seed = None, None
        if isinstance(item, SampledItem):
            index, flip, view_flips, seed = item
        elif isinstance(item, tuple):
            index, flip, *rest = item
            view_flips = rest[0] if rest else None
        else:
            index, flip = item, self.train and torch.rand(1).item() < 0.5
        flip = bool(flip) and self.augmentation.flips
        image = self.resized.image(index) if self.resized is not None else open_rgb(self.image_paths[index])
        if self.view is not None:
            network_input = self.view(image, flip)
        elif self.train and self.augmentation.transform is not None:
            if seed is None:
                seed = int(torch.randint(0, SEED_BOUND, (1,)))
            resize = self.transform.transforms[0]
            network_input = self.augmented(resize(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image),
                                           seed)
        else:
            network_input = self.transform(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image)
        out = {"image": network_input, "observed": self.observed[index], "clean": self.clean[index],
               "index": int(index), "flip": flip}
        if self.teacher_view is not None:
            out["teacher_image"] = self.teacher_view(image, flip)
        if view_flips is not None:
            out["view_flips"] = torch.as_tensor(view_flips, dtype=torch.bool)
        return out

    def augmented(self, resized: Image.Image, seed: int) -> torch.Tensor:
        """The network's input from the resized training image under the augmentation's transform."""
        image = self.augmentation.transform(resized, np.random.default_rng(seed))
        for step in self.transform.transforms[1:]:     # ToTensor, Normalize
            image = step(image)
        return image


# What a val or test set's images get: none of a training augmentation's changes.
NO_AUGMENTATION = augment.AUGMENTATIONS[augment.DEFAULT_AUGMENTATION]

# Augmentation seeds are drawn below this bound (numpy's generators take any non-negative integer).
SEED_BOUND = 2 ** 62


class SampledItem(NamedTuple):
    """An ``AugmentationSampler`` item that carries an augmentation seed."""
    index: int
    flip: bool
    view_flips: tuple[bool, ...] | None
    seed: int


class AugmentationSampler(torch.utils.data.Sampler):
    """Yields ``(index, flip)`` in a shuffled order, both drawn in the main process from
    ``generator``: the order and the flips of an epoch depend only on the generator's seed,
    not on worker processes or their lifetime, so a resumed run repeats them exactly.

    Under torchrun every rank draws the same permutation (same seed) and takes every
    ``world_size``-th item from position ``rank``, after padding the permutation with its own
    first items to a multiple of ``world_size`` (as DistributedSampler does), so all ranks run
    the same number of batches.

    With ``num_view_flips`` V > 0, each item also carries V flips of its own, one per teacher
    view (AEVLP flips each view independently of the student's image), drawn after the order
    and the flips (so V = 0 draws exactly what it always drew): items are then
    ``(index, flip, view_flips)``.

    With ``seeds``, each item also carries a seed of its own for the random augmentation of its
    image (``augment.AUGMENTATIONS``), drawn last (so a run without one draws what it always drew):
    items are then ``SampledItem``s.
    """

    def __init__(self, num_items: int, generator: torch.Generator, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, num_view_flips: int = 0, seeds: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if num_view_flips < 0:
            raise ValueError(f"num_view_flips must be >= 0, got {num_view_flips}")
        self.num_items = num_items
        self.generator = generator
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.num_view_flips = num_view_flips
        self.seeds = seeds

    def __len__(self) -> int:
        return -(-self.num_items // self.world_size)

    def draw(self) -> tuple[torch.Tensor, ...]:
        """This rank's indices and flips of the next pass, then the view flips and the seeds when
        there are any, as tensors (what ``__iter__`` yields)."""
        order = (torch.randperm(self.num_items, generator=self.generator) if self.shuffle
                 else torch.arange(self.num_items))
        drawn = [order, torch.rand(self.num_items, generator=self.generator) < 0.5]
        if self.num_view_flips:
            drawn.append(torch.rand(self.num_items, self.num_view_flips, generator=self.generator) < 0.5)
        if self.seeds:
            drawn.append(torch.randint(0, SEED_BOUND, (self.num_items,), generator=self.generator))
        padding = len(self) * self.world_size - self.num_items
        if padding:
            drawn = [torch.cat([values, values[:padding]]) for values in drawn]
        mine = slice(self.rank, None, self.world_size)
        return tuple(values[mine] for values in drawn)

    def __iter__(self):
        drawn = self.draw()
        if self.seeds:
            order, flips, *view_flips, seeds = drawn
            view_flips = map(tuple, view_flips[0].tolist()) if view_flips else [None] * len(order)
            return iter(SampledItem(*values) for values in zip(order.tolist(), flips.tolist(), view_flips,
                                                                seeds.tolist()))
        if self.num_view_flips:
            order, flips, view_flips = drawn
            return iter(zip(order.tolist(), flips.tolist(), map(tuple, view_flips.tolist())))
        return iter(zip(*(values.tolist() for values in drawn)))


class FeatureDataset(torch.utils.data.Dataset):
    """Cached backbone features with their labels, for the frozen-feature training modes.

    Items look like ``MultiLabelDataset``'s (the network input under "image"); ``FeatureBatches``
    serves whole batches of them.
    """

    def __init__(self, features, observed_labels, clean_labels):
        self.features = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        self.observed = torch.as_tensor(np.asarray(observed_labels), dtype=torch.float32)
        self.clean = torch.as_tensor(np.asarray(clean_labels), dtype=torch.float32)
        if not len(self.features) == len(self.observed) == len(self.clean):
            raise ValueError(f"features {tuple(self.features.shape)}, observed {tuple(self.observed.shape)} and "
                             f"clean {tuple(self.clean.shape)} labels must have the same number of rows")

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, item: int | tuple[int, bool]) -> dict:
        index = item[0] if isinstance(item, tuple) else item
        return {"image": self.features[index], "observed": self.observed[index],
                "clean": self.clean[index], "index": int(index)}

    def batch(self, index: torch.Tensor) -> dict:
        """The rows ``index`` (a 1-D integer tensor) as one batch: the network input and the
        indices (labels are read by index from ``.observed`` / ``.clean``, not gathered per step)."""
        return {"image": self.features[index], "index": index}


class FeatureBatches:
    """Batches of a ``FeatureDataset`` in a sampler's order, straight from memory.

    What a DataLoader over the same sampler yields (``.dataset``, ``len``, the same "image" and
    "index" batches, the last one possibly short), without its per-item machinery: a head-only
    epoch over COCO is 8,000+ steps of a few microseconds of arithmetic each, where that machinery
    would dominate.
    ``sampler``: an ``AugmentationSampler`` (its flips are ignored: features have none), any
    iterable of indices, or None for dataset order.
    """

    def __init__(self, dataset: FeatureDataset, batch_size: int, sampler=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler

    def order(self) -> torch.Tensor:
        """The indices of the next pass, in order (draws the sampler's next permutation)."""
        if isinstance(self.sampler, AugmentationSampler):
            return self.sampler.draw()[0]
        indices = range(len(self.dataset)) if self.sampler is None else self.sampler
        return torch.as_tensor(list(indices), dtype=torch.long)

    def __len__(self) -> int:
        count = len(self.dataset) if self.sampler is None else len(self.sampler)
        return -(-count // self.batch_size)

    def __iter__(self):
        order = self.order()
        for start in range(0, len(order), self.batch_size):
            yield self.dataset.batch(order[start:start + self.batch_size])


class ImageListDataset(torch.utils.data.Dataset):
    """Images for caches (teacher embeddings, frozen features): (tensor, index). The tensor is
    the image resized to ``image_size`` and normalised, or, with ``views``, the V views it
    returns for the image, stacked (V x 3 x H x W). ``resized``: as ``MultiLabelDataset``'s (with
    ``views``, the caller checks that each view starts with a resize to its size)."""

    def __init__(self, image_paths: Sequence[str | os.PathLike], image_size: int, mean, std,
                 views: Callable[[Image.Image], list[torch.Tensor]] | None = None, *, resized=None):
        self.image_paths = [str(p) for p in image_paths]
        check_image_files(self.image_paths)
        self.transform = build_transform(image_size, train=False, mean=mean, std=std)
        self.views = views
        self.resized = check_resized(resized, len(self.image_paths), image_size if views is None else None)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.resized.image(index) if self.resized is not None else open_rgb(self.image_paths[index])
        if self.views is not None:
            return torch.stack(self.views(image)), int(index)
        return self.transform(image), int(index)


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------

@dataclass
class BenchmarkSplits:
    info: DatasetInfo
    image_dir: Path                     # dataset folder / image_root
    train: FormattedData                # part of the official train set (split_train_val)
    val: FormattedData                  # the other part of the official train set
    test: FormattedData                 # the official val set
    # Positions of train / val rows in the official train set (for caches keyed by them).
    train_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    val_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def classes_without_positives(self, phase: str, observed: bool = False) -> list[str]:
        """Names of the classes that no image of 'train', 'val' or 'test' has as a positive (clean
        labels; ``observed``: its observed labels). Such a class has AP 0 and still counts in the
        split's mAP, as in every original code base (metrics.py)."""
        data = getattr(self, phase)
        labels = data.labels_obs if observed else data.labels
        return [self.info.class_names[k] for k in np.flatnonzero(~(labels == 1).any(axis=0))]

    def image_paths(self, phase: str) -> list[str]:
        """Full image paths of 'train', 'val' or 'test', in row order."""
        if phase not in ("train", "val", "test"):
            raise ValueError(f"phase must be 'train', 'val' or 'test', got {phase!r}")
        data = getattr(self, phase)
        return [str(self.image_dir / image) for image in data.images]


def load_benchmark(data_root: str | os.PathLike, name: str, val_frac: float = 0.2,
                   split_seed: int = 1200, subsample_seed: int = 999, train_frac: float = 1.0,
                   val_frac_keep: float = 1.0, check_images: bool = True) -> BenchmarkSplits:
    """Formatted files of ``name`` under ``data_root``, split into train / val / test."""
    info = get_dataset_info(name)
    official_train = load_formatted(data_root, name, "train")
    official_val = load_formatted(data_root, name, "val")
    train_idx, val_idx = split_train_val(len(official_train), val_frac, split_seed,
                                         subsample_seed, train_frac, val_frac_keep)
    splits = BenchmarkSplits(info=info, image_dir=dataset_dir(data_root, name) / info.image_root,
                             train=official_train.subset(train_idx),
                             val=official_train.subset(val_idx), test=official_val,
                             train_indices=train_idx, val_indices=val_idx)
    if check_images:  # that the files are there and not empty, before any long work
        check_image_files([path for phase in ("train", "val", "test") for path in splits.image_paths(phase)])
    return splits
