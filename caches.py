"""Embedding caches: encoder outputs computed once per image and kept on disk (docs/DESIGN.md §8).

``cached_embeddings`` is the cache itself: keyed by everything the outputs depend on (encoder
fingerprint, the image files by path, size and modification time, input size, normalisation),
validated on read, written atomically.
``Encoder`` names one encoder with its input recipe; ``OfficialSetCache`` embeds every image of
an official split with it, so one file serves every split seed and fraction.
``cached_resized_images`` / ``OfficialImageCache`` (--image-cache uint8) keep every image of an
official split decoded and resized, as uint8, in one memory-mapped .npy: epochs (and a teacher
pass whose view starts with the same resize) read those rows instead of decoding the JPEGs.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import PIL
import torch
from PIL import Image
from tqdm import tqdm

import datasets
from distributed import Distributed
from errors import RunError
from fileio import atomic_write, check_writable, readable_size, remove_stale_temp_files


# 2: images keyed by (path relative to the image root, size, modification time in ns), not by path.
_CACHE_FORMAT = 2


def image_identities(image_paths: Sequence[str | os.PathLike],
                     root: str | os.PathLike | None = None) -> list[list]:
    """What the cache knows of each image: [path, size in bytes, modification time in ns], the
    path relative to ``root`` (absolute without it) in '/' form, so that every spelling of the
    same files (relative, absolute, with '..') gives the same list. One ``os.stat`` per image, no
    reading: an image replaced by other bytes gets a new modification time and so a new key
    (a copy that keeps size and time, e.g. ``cp -p``, is taken for the same file). Missing or
    empty images are errors naming them (``datasets.stat_image_files``)."""
    stats = datasets.stat_image_files(image_paths)
    base = os.path.abspath(root if root is not None else os.sep)
    prefix = base.rstrip(os.sep) + os.sep
    identities = []
    for path, info in zip(image_paths, stats):
        absolute = os.path.abspath(path)
        relative = absolute[len(prefix):] if absolute.startswith(prefix) else os.path.relpath(absolute, base)
        identities.append([relative.replace(os.sep, "/"), info.st_size, info.st_mtime_ns])
    return identities


# The option that moves the cache folder (named in disk errors).
CACHE_DIR_FLAG = "--cache-dir"
# What an .npz adds to its arrays (zip and .npy headers, the key strings), rounded up generously.
_NPZ_OVERHEAD = 1 << 20

# The stored dtypes: float32, or float16 for outputs that are float16 values to begin with (AEVLP's
# teacher ran in float16), which halves a multi-view cache.
CACHE_DTYPES = ("float32", "float16")


def cache_key_hash(key: dict, image_paths: Sequence[str | os.PathLike], image_size: int, mean, std, *,
                   root: str | os.PathLike | None = None, dtype: str = "float32") -> str:
    """sha256 of a canonical JSON of everything the cached embeddings depend on: ``key``, each
    image's ``image_identities`` (relative to ``root``) in order, the size and normalisation, and
    the stored dtype when it is not float32 (so float32 caches keep their keys)."""
    images = hashlib.sha256(json.dumps(image_identities(image_paths, root), separators=(",", ":")).encode())
    full = {"format": _CACHE_FORMAT, "key": key, "num_images": len(image_paths), "images": images.hexdigest(),
            "image_size": int(image_size), "mean": [float(m) for m in mean],
            "std": [float(s) for s in std]}
    if dtype != "float32":
        full["dtype"] = dtype
    return hashlib.sha256(json.dumps(full, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_cache(cache_file: Path, key_hash: str, num_images: int,
                dtype: str = "float32") -> tuple[np.ndarray | None, str]:
    """(embeddings, '') when the file is a valid cache for ``key_hash``, else (None, reason)."""
    try:
        contents = np.load(cache_file, allow_pickle=False)
        if not isinstance(contents, np.lib.npyio.NpzFile):
            return None, "is not an embedding cache (not an .npz archive)"
        with contents:
            if "key" not in contents.files or "embeddings" not in contents.files:
                return None, "is not an embedding cache (no key/embeddings)"
            if str(contents["key"]) != key_hash:
                return None, "was made for other inputs (key differs)"
            embeddings = contents["embeddings"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        return None, f"is unreadable ({type(error).__name__}: {error})"
    if embeddings.ndim not in (2, 3) or embeddings.shape[0] != num_images:
        return None, f"has shape {embeddings.shape}, expected {num_images} rows"
    if embeddings.dtype != np.dtype(dtype) or not np.isfinite(embeddings).all():
        return None, f"holds non-{dtype} or non-finite values"
    return embeddings, ""


def _check_cache_room(cache_file: Path, need_bytes: int, needed_for: str, desc: str) -> None:
    """The cache folder can be written and has ``need_bytes`` free (RunError, one line, otherwise):
    checked before the pass spends its time, whose result would be lost at the write."""
    try:
        check_writable(cache_file.parent, need_bytes, CACHE_DIR_FLAG, needed_for=needed_for)
    except RunError as error:
        raise RunError(f"{desc}: {error}") from error


def _cache_size(num_images: int, row_shape: tuple, dtype: str) -> int:
    """Bytes of the cache file of ``num_images`` rows of ``row_shape`` (views x D) in ``dtype``."""
    return num_images * int(np.prod(row_shape)) * np.dtype(dtype).itemsize + _NPZ_OVERHEAD


def _write_cache(cache_file: Path, key_hash: str, key: dict, embeddings: np.ndarray, desc: str) -> None:
    """The cache file, written atomically; RunError, one line, when the disk refuses it."""
    readable_key = json.dumps(key, sort_keys=True)
    try:
        atomic_write(cache_file, lambda handle: np.savez(handle, key=np.array(key_hash),
                                                         key_json=np.array(readable_key), embeddings=embeddings))
    except OSError as error:
        raise RunError(f"{desc}: cannot write the embedding cache {cache_file} ({error.strerror or error}); the "
                       f"embeddings of this pass are lost: free {readable_size(embeddings.nbytes)} there, or choose "
                       f"another folder with {CACHE_DIR_FLAG}, and run again") from error


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cached_embeddings(encode: Callable[[torch.Tensor], torch.Tensor], key: dict,
                      image_paths: Sequence[str], image_size: int, mean, std,
                      cache_file: str | os.PathLike, *, batch_size: int = 32, num_workers: int = 0,
                      device: str | torch.device = "cpu", desc: str = "teacher",
                      log: Callable[[str], None] = _log_stderr, rank: int = 0, world_size: int = 1,
                      gather_rows: Callable | None = None,
                      views: Callable[[Image.Image], list[torch.Tensor]] | None = None,
                      root: str | os.PathLike | None = None, dtype: str = "float32",
                      resized_images: Callable[[], ResizedImages | None] | None = None) -> np.ndarray:
    """N x D ``encode`` outputs (stored and returned as ``dtype``, one of ``CACHE_DTYPES``) of the images (resized to ``image_size``, normalised
    with ``mean``/``std``, no augmentation), computed once and cached in ``cache_file``.
    With ``views`` (image -> V input tensors, e.g. as is and flipped), N x V x D: the outputs of
    each view; ``key`` must then name the views' recipe.

    ``key`` names what else the outputs depend on (e.g. the encoder's weights fingerprint); it
    is hashed into the file with the images (``image_identities``: each file's path relative to
    ``root``, absolute without it, its size and modification time), the size and normalisation.
    A file with another key, the wrong shape, or that cannot be read is reported through ``log``
    and rebuilt; the new file is written atomically. Before a rebuild, the writing rank checks that
    the folder can be written and has room (at least 1 value per image before the pass, the whole
    file after its first batch): a full or read-only disk is one RunError line, not a lost pass.

    Under torchrun (``world_size`` > 1) each rank encodes every ``world_size``-th image from
    position ``rank``; ``gather_rows(indices, rows)`` must return every rank's rows, sorted by
    index, on every rank; rank 0 writes the file.

    ``resized_images``: called only when the outputs are computed; the image cache rows
    (``ResizedImages``) that replace decoding, or None (the caller checks that they give the
    inputs exactly: ``datasets.ImageListDataset``).
    """
    cache_file = Path(cache_file)
    image_paths = [str(p) for p in image_paths]
    if not image_paths:
        raise ValueError(f"{desc}: no images to embed for {cache_file}")
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"{desc}: cache dtype {dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
    key_hash = cache_key_hash(key, image_paths, image_size, mean, std, root=root, dtype=dtype)
    if cache_file.exists():
        cached, reason = _read_cache(cache_file, key_hash, len(image_paths), dtype)
        if cached is not None:
            log(f"{desc}: using cached embeddings {cache_file}")
            return cached
        log(f"{desc}: cache {cache_file} {reason}; recomputing it")
    if world_size > 1 and gather_rows is None:
        raise ValueError("cached_embeddings: world_size > 1 needs gather_rows")
    if rank == 0:
        _check_cache_room(cache_file, _cache_size(len(image_paths), (1,), dtype),
                          "the embedding cache (at least; its exact size is checked after the first batch)", desc)
    dataset = datasets.ImageListDataset(image_paths, image_size, mean, std, views=views,
                                        resized=resized_images() if resized_images is not None else None)
    mine = range(rank, len(dataset), world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=mine, num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda")
    outputs, rows = [], []
    with torch.no_grad(), tqdm(total=len(mine), desc=desc, unit="img", mininterval=3.0,
                               dynamic_ncols=True, disable=rank != 0) as bar:
        for images, indices in loader:
            # Views are encoded as one batch of B*V images and regrouped by image.
            flat = images.flatten(0, images.dim() - 4).to(device, non_blocking=True)
            outputs.append(encode(flat).float().cpu().numpy().reshape(*images.shape[:images.dim() - 3], -1))
            rows.append(indices.numpy())
            if rank == 0 and len(outputs) == 1:   # the size of a row is known from the first batch
                row_shape = outputs[0].shape[1:]
                _check_cache_room(cache_file, _cache_size(len(dataset), row_shape, dtype),
                                  f"the embedding cache ({' x '.join(map(str, (len(dataset), *row_shape)))} {dtype})",
                                  desc)
            bar.update(len(indices))
    row_index, embeddings = np.concatenate(rows), np.concatenate(outputs).astype(dtype)
    if world_size > 1:
        row_index, embeddings = gather_rows(row_index, embeddings)
    if not np.array_equal(row_index, np.arange(len(dataset))):
        raise RuntimeError(f"{desc}: embeddings for {len(row_index)} of {len(dataset)} images")
    if not np.isfinite(embeddings).all():
        bad = int(np.flatnonzero(~np.isfinite(embeddings.reshape(len(embeddings), -1)).all(axis=1))[0])
        raise ValueError(f"{desc}: non-finite embedding for image {image_paths[bad]}")
    if rank != 0:
        return embeddings
    _write_cache(cache_file, key_hash, key, embeddings, desc)
    log(f"{desc}: wrote {cache_file} ({' x '.join(map(str, embeddings.shape))})")
    return embeddings


@dataclass(frozen=True)
class Encoder:
    """An image encoder and its input recipe: what a cache file of its outputs is keyed by."""
    encode: Callable[[torch.Tensor], torch.Tensor]
    key: dict                      # what else the outputs depend on (weights fingerprint, output)
    prefix: str                    # cache file name prefix
    image_size: int
    mean: tuple
    std: tuple
    views: Callable[[Image.Image], list[torch.Tensor]] | None = None   # several inputs per image
    dtype: str = "float32"         # as stored (CACHE_DTYPES)


@dataclass
class OfficialSetCache:
    """``Encoder`` outputs for every image of an official split ('train' or 'val'), cached in
    ``cache_dir`` as ``<prefix>-<fingerprint>-<phase>.npz`` and, once read, kept in memory for the
    run (``embeddings``). Temporary files that killed writes left in ``cache_dir`` are removed at
    its first use (``remove_stale_temp_files``)."""
    data_root: str
    dataset: str
    image_dir: Path
    cache_dir: Path
    batch_size: int
    num_workers: int
    device: torch.device
    log: Callable[[str], None] = _log_stderr
    dist: Distributed = Distributed()
    # (phase, encoder) -> the image cache rows that give the encoder's inputs exactly, or None
    # (--image-cache; called only when embeddings are computed).
    image_source: Callable[[str, Encoder], ResizedImages | None] | None = None
    _swept: bool = field(default=False, init=False, repr=False)
    # cache file -> the embeddings read from it or written to it (its name holds the encoder's
    # fingerprint and the phase: one entry per encoder and split).
    _kept: dict[Path, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def remove_stale_temp_files(self) -> list[str]:
        """Remove the temporary files of cache writes whose process was killed (up to a whole cache
        file each); files that another run is writing stay. Logged; the names removed."""
        removed = remove_stale_temp_files(self.cache_dir)
        if removed:
            self.log(f"removed {len(removed)} temporary file(s) of killed cache writes from {self.cache_dir}: "
                     f"{', '.join(removed)}")
        return removed

    def cache_file(self, phase: str, encoder: Encoder) -> Path:
        """The file of ``encoder``'s outputs for ``phase``, named by the encoder's fingerprint."""
        fingerprint = cache_key_hash(encoder.key, [], encoder.image_size, encoder.mean, encoder.std,
                                     dtype=encoder.dtype)[:16]
        return Path(self.cache_dir) / f"{encoder.prefix}-{fingerprint}-{phase}.npz"

    def embeddings(self, phase: str, encoder: Encoder, *, keep: bool = True) -> np.ndarray:
        """``encoder``'s outputs for every image of the official ``phase`` split (N x D, or N x V x D
        with views), from the cache file or computed into it. Kept in memory with ``keep``, so
        that a later call for the same encoder and phase returns the same array without reading
        the file (callers must not modify it); ``keep=False`` for a large array read once."""
        cache_file = self.cache_file(phase, encoder)
        if cache_file in self._kept:
            return self._kept[cache_file]
        embeddings = self._read_or_compute(phase, encoder, cache_file)
        if keep:
            self._kept[cache_file] = embeddings
        return embeddings

    def _read_or_compute(self, phase: str, encoder: Encoder, cache_file: Path) -> np.ndarray:
        if not self._swept and self.dist.is_main:
            self.remove_stale_temp_files()
            self._swept = True
        formatted = datasets.load_formatted(self.data_root, self.dataset, phase)
        return cached_embeddings(
            encoder.encode, encoder.key, [str(self.image_dir / p) for p in formatted.images], encoder.image_size,
            encoder.mean, encoder.std, cache_file,
            batch_size=self.batch_size, num_workers=self.num_workers, device=self.device,
            desc=f"{encoder.prefix} {phase}", log=self.log, rank=self.dist.rank, world_size=self.dist.world_size,
            gather_rows=self.dist.gather_rows, views=encoder.views, root=self.image_dir, dtype=encoder.dtype,
            resized_images=None if self.image_source is None else lambda: self.image_source(phase, encoder))


# ----------------------------------------------------------------------------------------------
# Image cache (--image-cache uint8)
# ----------------------------------------------------------------------------------------------

# --image-cache: off (decode and resize every image in every epoch) or uint8 (once, into the cache).
IMAGE_CACHE_MODES = ("off", "uint8")
IMAGE_CACHE_PREFIX = "images"
_IMAGE_CACHE_FORMAT = 1
# What a row is. Hashed into the key with Pillow's version (its resize makes the numbers): a change
# to datasets.open_rgb or datasets.resize_step must change this text, so old files are not read.
IMAGE_CACHE_RECIPE = ("datasets.open_rgb (RGB, 16-bit and float grey scaled), then datasets.resize_step: "
                      "PIL Image.resize((S, S), BILINEAR); stored as uint8 N x S x S x 3")


def image_cache_key(image_paths: Sequence[str | os.PathLike], image_size: int, *,
                    root: str | os.PathLike | None = None) -> str:
    """sha256 (64 hex digits) of what an image cache holds: the recipe, Pillow's version, the
    size and each image's ``image_identities`` (relative to ``root``) in order."""
    images = hashlib.sha256(json.dumps(image_identities(image_paths, root), separators=(",", ":")).encode())
    full = {"format": _IMAGE_CACHE_FORMAT, "recipe": IMAGE_CACHE_RECIPE, "pillow": PIL.__version__,
            "image_size": int(image_size), "num_images": len(image_paths), "images": images.hexdigest()}
    return hashlib.sha256(json.dumps(full, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def image_cache_file(cache_dir: str | os.PathLike, phase: str, image_size: int, key: str) -> Path:
    """``<cache_dir>/images-<S>px-<phase>-<key>.npy``: the whole key is in the name (a memory-mapped
    .npy holds no key of its own), so a file is either the right one or another one."""
    return Path(cache_dir) / f"{IMAGE_CACHE_PREFIX}-{int(image_size)}px-{phase}-{key}.npy"


class ResizedImages:
    """Rows of an image-cache file (N x S x S x 3 uint8, memory-mapped): ``image(i)`` is row i as
    a PIL image, the decoded image resized to S x S as ``datasets.resize_step`` does. The file is
    opened in each process when first read (loader workers get the path, not the pages);
    ``subset(indices)`` gives the rows of a split of the official set."""

    def __init__(self, path: str | os.PathLike, size: int, num_rows: int, rows: np.ndarray | None = None):
        self.path, self.size, self.num_rows = Path(path), int(size), int(num_rows)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._array: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, size: int, num_rows: int) -> ResizedImages:
        """The file checked (shape, dtype, length): ValueError saying what is wrong."""
        images = cls(path, size, num_rows)
        images.array()
        return images

    def array(self) -> np.ndarray:
        """The whole file's N x S x S x 3 array (memory-mapped, read-only)."""
        if self._array is None:
            try:
                array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as error:
                raise ValueError(f"is unreadable ({type(error).__name__}: {error})") from error
            expected = (self.num_rows, self.size, self.size, 3)
            if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.shape != expected:
                raise ValueError(f"holds {getattr(array, 'dtype', type(array).__name__)} "
                                 f"{getattr(array, 'shape', '')}, expected uint8 {expected}")
            self._array = array
        return self._array

    def __len__(self) -> int:
        return self.num_rows if self.rows is None else len(self.rows)

    def row(self, index: int) -> np.ndarray:
        """S x S x 3 uint8 (a view of the file)."""
        return self.array()[index if self.rows is None else self.rows[index]]

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.row(index)))

    def subset(self, indices) -> ResizedImages:
        indices = np.asarray(indices, dtype=np.int64)
        rows = indices if self.rows is None else self.rows[indices]
        return ResizedImages(self.path, self.size, self.num_rows, rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}   # each process maps the file itself


class _CacheFolderNotShared(Exception):
    """Under torchrun, some process does not see the file another one is writing."""


def _npy_header(shape: tuple) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def _fill_rows(handle, offset: int, dataset: datasets.ResizedImageDataset, rows: range, *, batch_size: int,
               num_workers: int, desc: str, show: bool) -> None:
    """Decode and resize the images ``rows`` into an open .npy file whose data start at ``offset``."""
    row_bytes = dataset.resize.size[0] * dataset.resize.size[1] * 3
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=rows, num_workers=num_workers)
    with tqdm(total=len(rows), desc=desc, unit="img", mininterval=3.0, dynamic_ncols=True, disable=not show) as bar:
        for images, indices in loader:
            for image, index in zip(images.numpy(), indices.tolist()):
                handle.seek(offset + index * row_bytes)
                handle.write(memoryview(np.ascontiguousarray(image)).cast("B"))
            bar.update(len(indices))
    handle.flush()


def _write_image_cache(cache_file: Path, image_paths: list[str], image_size: int, *, batch_size: int,
                       num_workers: int, dist: Distributed, desc: str) -> bool:
    """Decode every image into ``cache_file``, atomically; under torchrun each process its share
    of the rows, into one temporary file that rank 0 then renames. False (nothing written) when the
    processes do not share the folder."""
    dataset = datasets.ResizedImageDataset(image_paths, image_size)
    shape = (len(image_paths), image_size, image_size, 3)
    header = _npy_header(shape)
    total = len(header) + int(np.prod(shape))
    mine = range(dist.rank, len(dataset), dist.world_size)
    fill = functools.partial(_fill_rows, offset=len(header), dataset=dataset, rows=mine, batch_size=batch_size,
                             num_workers=num_workers, desc=desc, show=dist.is_main)

    def write(handle) -> None:   # rank 0 (or the only process): the temporary file, locked until renamed
        handle.write(header)
        handle.truncate(total)
        if dist.enabled:
            handle.flush()
            dist.gather_objects(os.readlink(f"/proc/self/fd/{handle.fileno()}"))
            if not all(dist.gather_objects(True)):
                raise _CacheFolderNotShared
        fill(handle)
        dist.barrier()   # every process's rows are in the file

    if dist.is_main:
        try:
            atomic_write(cache_file, write)
        except _CacheFolderNotShared:
            return False
        except OSError as error:
            raise RunError(f"{desc}: cannot write the image cache {cache_file} ({error.strerror or error}); free "
                           f"{readable_size(total)} there, or choose another folder with {CACHE_DIR_FLAG}, or run "
                           f"with --image-cache off") from error
    else:
        temporary = dist.gather_objects(None)[0]
        shared = os.path.isfile(temporary)
        if not all(dist.gather_objects(shared)):
            return False
        with open(temporary, "r+b") as handle:
            fill(handle)
            os.fsync(handle.fileno())
        dist.barrier()
    dist.barrier()   # renamed into place
    return True


def cached_resized_images(image_paths: Sequence[str | os.PathLike], image_size: int, cache_dir: str | os.PathLike,
                          phase: str, *, root: str | os.PathLike | None = None, batch_size: int = 32,
                          num_workers: int = 0, log: Callable[[str], None] = _log_stderr,
                          dist: Distributed = Distributed(), desc: str | None = None) -> ResizedImages | None:
    """Every image of ``image_paths`` decoded and resized to ``image_size`` (``ResizedImageDataset``),
    from ``image_cache_file`` or decoded once into it (atomically; another file of the same phase
    and size, made for other images or another Pillow, is removed first: it can be tens of GB).
    The folder is checked for room before the pass. Under torchrun every process decodes its
    share into one file; None (decode as usual) when the processes do not share ``cache_dir``."""
    image_paths = [str(p) for p in image_paths]
    desc = desc or f"image cache {phase} {image_size}px"
    if not image_paths:
        raise ValueError(f"{desc}: no images")
    key = image_cache_key(image_paths, image_size, root=root)
    cache_file = image_cache_file(cache_dir, phase, image_size, key)
    images, reason = None, "does not exist"
    if cache_file.exists():
        try:
            images = ResizedImages.open(cache_file, image_size, len(image_paths))
        except ValueError as error:
            reason = str(error)
    if all(dist.gather_objects(images is not None)):
        log(f"{desc}: using {cache_file}")
        return images
    size = len(_npy_header((len(image_paths), image_size, image_size, 3))) + len(image_paths) * image_size ** 2 * 3
    if dist.is_main:
        if images is None and cache_file.exists():
            log(f"{desc}: {cache_file} {reason}; making it again")
        for old in sorted(Path(cache_dir).glob(f"{IMAGE_CACHE_PREFIX}-{int(image_size)}px-{phase}-*.npy")):
            if old != cache_file:
                log(f"{desc}: removing {old} (made for other images or another Pillow)")
                old.unlink(missing_ok=True)
        _check_cache_room(cache_file, size, f"the image cache ({len(image_paths)} x {image_size} x {image_size} x 3 "
                                            f"uint8)", desc)
        log(f"{desc}: decoding {len(image_paths)} images into {cache_file} ({readable_size(size)}), once")
    if not _write_image_cache(cache_file, image_paths, image_size, batch_size=batch_size, num_workers=num_workers,
                              dist=dist, desc=desc):
        log(f"{desc}: not every process sees {cache_dir}: images are decoded as usual (--image-cache needs a cache "
            f"folder all processes share)")
        return None
    return ResizedImages.open(cache_file, image_size, len(image_paths))


@dataclass
class OfficialImageCache:
    """``cached_resized_images`` of every image of an official split ('train' or 'val') at a size,
    in ``cache_dir``, made when first asked for and kept for the run (one file per split and
    size serves every split seed and fraction: ``ResizedImages.subset``)."""
    data_root: str
    dataset: str
    image_dir: Path
    cache_dir: Path
    num_workers: int
    log: Callable[[str], None] = _log_stderr
    dist: Distributed = Distributed()
    batch_size: int = 32
    _swept: bool = field(default=False, init=False, repr=False)
    _kept: dict[tuple[str, int], ResizedImages | None] = field(default_factory=dict, init=False, repr=False)

    def images(self, phase: str, image_size: int) -> ResizedImages | None:
        if (phase, image_size) not in self._kept:
            if not self._swept and self.dist.is_main:
                removed = remove_stale_temp_files(self.cache_dir)
                if removed:
                    self.log(f"removed {len(removed)} temporary file(s) of killed cache writes from "
                             f"{self.cache_dir}: {', '.join(removed)}")
                self._swept = True
            formatted = datasets.load_formatted(self.data_root, self.dataset, phase)
            self._kept[phase, image_size] = cached_resized_images(
                [str(self.image_dir / p) for p in formatted.images], image_size, self.cache_dir, phase,
                root=self.image_dir, batch_size=self.batch_size, num_workers=self.num_workers, log=self.log,
                dist=self.dist)
        return self._kept[phase, image_size]
