"""Convert an image list stored as a pickled object array into the plain str array the loader reads.

Run from the repository root, only on files you trust:
    python preproc/convert_image_list.py data/nuswide/formatted_train_images.npy [more files]

The training code never unpickles a file (unpickling can run arbitrary code), so an image list
saved by another code base as an object array is refused with a line pointing here. This script
**does unpickle** each file you name, checks that it is a 1-D list of str (or UTF-8 bytes), and
replaces the file with the same list as a str array (atomically: the old file stays whole until
the new one is complete). Every file is read and checked before any is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from fileio import atomic_save_npy  # noqa: E402
from preproc import run_script  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert pickled (object-array) image lists to str arrays. UNPICKLES the files: "
                    "run it only on files you trust.")
    parser.add_argument("files", nargs="+", type=Path, help="formatted_*_images.npy files to convert in place")
    return parser


def unpickled_image_list(path: Path) -> np.ndarray:
    """The image list in ``path`` as a 1-D str array; unpickles it. ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        array = np.load(path, allow_pickle=True)  # explicitly requested by the user: see the module doc
    except Exception as error:  # unpickling raises anything
        raise ValueError(f"{path}: not a readable numpy file ({type(error).__name__}: {error})") from error
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D list of image paths, got {getattr(array, 'shape', type(array))}")
    entries = []
    for index, entry in enumerate(array.tolist()):
        if isinstance(entry, bytes):
            try:
                entry = entry.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}: entry {index} is not UTF-8 text") from None
        if not isinstance(entry, str):
            raise ValueError(f"{path}: entry {index} is a {type(entry).__name__}, not an image path")
        entries.append(entry)
    return np.array(entries, dtype=np.str_)


def convert(files: list[Path]) -> dict[Path, int]:
    """Check every file, then write each as a str array; returns {file: number of images}."""
    lists = {path: unpickled_image_list(path) for path in files}
    for path, images in lists.items():
        atomic_save_npy(path, images)
    return {path: len(images) for path, images in lists.items()}


def main(args: argparse.Namespace) -> None:
    for path, count in convert(args.files).items():
        print(f"{path}: {count} image paths, now a str array")


if __name__ == "__main__":
    run_script(main, get_args_parser())
