"""Embedding caches: encoder outputs computed once per image and kept on disk (docs/DESIGN.md §8).

``cached_embeddings`` is the cache itself: keyed by everything the outputs depend on (encoder
fingerprint, the image files by path, size and modification time, input size, normalisation),
validated on read, written atomically.
``Encoder`` names one encoder with its input recipe; ``OfficialSetCache`` embeds every image of
an official split with it, so one file serves every split seed and fraction.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
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
                      root: str | os.PathLike | None = None, dtype: str = "float32") -> np.ndarray:
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
    dataset = datasets.ImageListDataset(image_paths, image_size, mean, std, views=views)
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
            gather_rows=self.dist.gather_rows, views=encoder.views, root=self.image_dir, dtype=encoder.dtype)
