"""Format the official NUS-WIDE release (81 concepts) into the formatted files.

Run from the repository root:
    python preproc/format_nuswide.py [--load-path data/nuswide] [--save-path data/nuswide]
        [--drop-missing] [--drop-unlabeled]

``--load-path`` holds the official release as extracted: ``ImageList/{Train,Test}Imagelist.txt``,
``Concepts81.txt`` (or ``ConceptsList/Concepts81.txt``, as NUS-WIDE.zip has it),
``Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt`` and the images under
``Flickr/``. The official Train split becomes ``formatted_train_*``, the official Test split
``formatted_val_*`` (the test set, as for the other datasets). The literature uses pre-formatted
files of a re-crawled subset instead (docs/DESIGN.md §2); numbers from the two are not
comparable (see data/nuswide/README.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

import datasets  # noqa: E402
from preproc import after_formatting, report_formatted, run_script  # noqa: E402

README_HINT = "see data/nuswide/README.md"
# Formatted phase -> the official split's name in the file names.
OFFICIAL_SPLITS = {"train": "Train", "val": "Test"}
CONCEPT_FILES = (Path("Concepts81.txt"), Path("ConceptsList", "Concepts81.txt"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Format the official NUS-WIDE release.")
    parser.add_argument("--load-path", default="data/nuswide",
                        help="folder holding ImageList/, Concepts81.txt, Groundtruth/ and Flickr/")
    parser.add_argument("--save-path", default="data/nuswide",
                        help="folder for the formatted_*.npy files")
    parser.add_argument("--drop-missing", action="store_true",
                        help="leave out listed images that are not under Flickr/ (re-crawled "
                             "copies lack many); without it a missing image is an error")
    parser.add_argument("--drop-unlabeled", action="store_true",
                        help="leave out images without any positive concept (they can never "
                             "carry a single observed positive)")
    return parser


def input_files(load_path: str | Path) -> dict:
    """The official files: 'concepts', and per phase 'images' and {concept: label file}."""
    root = Path(load_path)
    concepts = next((root / p for p in CONCEPT_FILES if (root / p).is_file()),
                    root / CONCEPT_FILES[0])
    label_dir = root / "Groundtruth" / "TrainTestLabels"
    files = {"concepts": concepts}
    for phase, split in OFFICIAL_SPLITS.items():
        files[phase] = {"images": root / "ImageList" / f"{split}Imagelist.txt",
                        "labels": {name: label_dir / f"Labels_{name}_{split}.txt"
                                   for name in datasets.NUSWIDE_CLASS_NAMES}}
    return files


def _read_lines(path: Path) -> list[str]:
    """The stripped lines of a text file. Windows line endings and blank lines at the end are
    fine; a blank line before the end would shift every later line, so it is an error."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file ({error})") from error
    while lines and not lines[-1]:
        lines.pop()
    if "" in lines:
        raise ValueError(f"{path}, line {lines.index('') + 1}: blank line inside the file")
    if not lines:
        raise ValueError(f"{path}: empty file")
    return lines


def check_concepts(path: Path) -> None:
    """The file's concepts must be the registry's, in the same order: the label columns (and
    the text features) follow the registry, so another order would silently permute them."""
    names = _read_lines(path)
    expected = datasets.NUSWIDE_CLASS_NAMES
    if len(names) != len(expected):
        raise ValueError(f"{path}: {len(names)} concepts, expected {len(expected)}")
    for line_number, (name, wanted) in enumerate(zip(names, expected), 1):
        if name != wanted:
            raise ValueError(f"{path}, line {line_number}: concept {name!r} where the registry "
                             f"(datasets.NUSWIDE_CLASS_NAMES) has {wanted!r}; a different order "
                             f"would permute the label columns")


def read_image_list(path: Path) -> list[str]:
    """Image paths relative to Flickr/, with the list's backslashes turned into slashes."""
    images = []
    for line_number, line in enumerate(_read_lines(path), 1):
        image = line.replace("\\", "/")
        parts = image.split("/")
        if image.startswith("/") or ":" in parts[0] or ".." in parts:
            raise ValueError(f"{path}, line {line_number}: {line!r} is not a path relative to "
                             f"Flickr/")
        images.append(image)
    return images


def read_concept_labels(path: Path, image_list: Path, num_images: int) -> np.ndarray:
    """One concept's 0/1 column (bool), one line per image of ``image_list``, in its order."""
    values = np.array(_read_lines(path))
    if len(values) != num_images:
        raise ValueError(f"{path}: {len(values)} lines, but {image_list} lists {num_images} "
                         f"images; the files do not belong together")
    positive = values == "1"
    bad = ~(positive | (values == "0"))
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"{path}, line {row + 1}: label {str(values[row])!r} is not 0 or 1")
    return positive


def read_phase(files: dict) -> tuple[np.ndarray, np.ndarray]:
    """Image paths (str) and the N x 81 float64 labels of one official split, in list order."""
    images = read_image_list(files["images"])
    labels = np.zeros((len(images), len(files["labels"])), dtype=np.float64)
    for column, path in enumerate(files["labels"].values()):
        labels[:, column] = read_concept_labels(path, files["images"], len(images))
    return np.array(images, dtype=np.str_), labels


def _step(kept: int, flag: str, on: bool, count: int, what: str) -> str:
    """'<images kept> after <flag> (on: <count> <what> left out)', or '(off: ... kept)'."""
    return (f"{kept} after {flag} ({'on' if on else 'off'}: {count} {what} "
            f"{'left out' if on else 'kept'})")


def apply_options(image_dir: Path, list_path: Path, images: np.ndarray, labels: np.ndarray,
                  drop_missing: bool, drop_unlabeled: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """Leave out missing, then unlabeled images as asked; also a line of the counts before and
    after each option. Without ``drop_missing`` a missing image is an error."""
    present = np.array([(image_dir / image).is_file() for image in images], dtype=bool)
    if not drop_missing and not present.all():
        first = images[int(np.argmin(present))]
        raise FileNotFoundError(f"{list_path}: image {first} not found under {image_dir} "
                                f"({int((~present).sum())} of {len(images)} missing); extract "
                                f"Flickr.zip there or pass --drop-missing to leave them out")
    unlabeled = present & (labels.sum(axis=1) == 0)
    keep = present & ~unlabeled if drop_unlabeled else present
    counts = " -> ".join((
        f"{len(images)} listed in {list_path.name}",
        _step(int(present.sum()), "--drop-missing", drop_missing, int((~present).sum()),
              "not on disk"),
        _step(int(keep.sum()), "--drop-unlabeled", drop_unlabeled, int(unlabeled.sum()),
              "without a positive")))
    return images[keep], labels[keep], counts


def format_nuswide(load_path: str | Path, save_path: str | Path, drop_missing: bool = False,
                   drop_unlabeled: bool = False) -> tuple[dict[str, tuple], list[str]]:
    """Read and check every input file and image, then write the formatted files.

    Returns phase -> (images, labels) as written, and one summary line per phase with the
    image counts before and after each option.
    """
    files = input_files(load_path)
    required = [files["concepts"]] + [path for phase in OFFICIAL_SPLITS
                                      for path in (files[phase]["images"],
                                                   *files[phase]["labels"].values())]
    missing = [path for path in required if not path.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more input files)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"missing {missing[0]}{more}; {README_HINT}")
    check_concepts(files["concepts"])
    image_dir = Path(load_path) / datasets.get_dataset_info("nuswide").image_root
    result, summary = {}, []
    for phase in OFFICIAL_SPLITS:
        list_path = files[phase]["images"]
        images, labels, counts = apply_options(image_dir, list_path, *read_phase(files[phase]),
                                               drop_missing, drop_unlabeled)
        if len(images) == 0:
            raise ValueError(f"{list_path}: no {phase} image left ({counts})")
        result[phase] = (images, labels)
        summary.append(f"{phase}: {counts}")
    for phase, (images, labels) in result.items():
        datasets.save_formatted(save_path, phase, images, labels)
    return result, summary


def main(args: argparse.Namespace) -> None:
    result, summary = format_nuswide(args.load_path, args.save_path, args.drop_missing,
                                     args.drop_unlabeled)
    for line in summary:
        print(line)
    report_formatted("nuswide", result, args.save_path)


if __name__ == "__main__":
    run_script(main, get_args_parser(), next_step=after_formatting("nuswide"))
