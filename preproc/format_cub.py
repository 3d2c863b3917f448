"""Format CUB-200-2011 attribute labels (312 classes) into the formatted files (docs/DESIGN.md §2).

Run from the repository root:
    python preproc/format_cub.py [--load-path data/cub] [--save-path data/cub]

``--load-path`` is the folder where CUB_200_2011.tgz was extracted: it holds ``attributes.txt``
and ``CUB_200_2011/``.
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

README_HINT = "see data/cub/README.md"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Format CUB-200-2011 attribute labels.")
    parser.add_argument("--load-path", default="data/cub",
                        help="extraction root of CUB_200_2011.tgz (holds attributes.txt and "
                             "CUB_200_2011/)")
    parser.add_argument("--save-path", default="data/cub",
                        help="folder for the formatted_*.npy files")
    return parser


def input_files(load_path: str | Path) -> dict[str, Path]:
    root = Path(load_path)
    return {"attributes": root / "attributes.txt",
            "images": root / "CUB_200_2011" / "images.txt",
            "split": root / "CUB_200_2011" / "train_test_split.txt",
            "labels": root / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt"}


def _int(path: Path, line_number: int, text: str) -> int:
    try:
        return int(text)
    except ValueError as error:
        raise ValueError(f"{path}, line {line_number}: {text!r} is not an integer") from error


def _lines(path: Path, min_fields: int):
    """(line number, whitespace-split fields) of the non-blank lines, with a field-count check."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < min_fields:
                raise ValueError(f"{path}, line {line_number}: expected at least {min_fields} "
                                 f"fields, got {line.rstrip()!r}")
            yield line_number, fields


def read_attribute_names(path: Path) -> list[str]:
    names = []
    for line_number, fields in _lines(path, 2):
        if _int(path, line_number, fields[0]) != len(names) + 1:
            raise ValueError(f"{path}, line {line_number}: attribute ids must run 1, 2, 3, ...")
        names.append(fields[1])
    expected = datasets.get_dataset_info("cub").num_classes
    if len(names) != expected:
        raise ValueError(f"{path}: {len(names)} attributes, expected {expected}")
    return names


def read_images(images_path: Path, split_path: Path) -> tuple[list[int], list[str], list[bool]]:
    """Image ids and paths in images.txt order, and whether each is a train image."""
    ids, paths = [], []
    for line_number, fields in _lines(images_path, 2):
        ids.append(_int(images_path, line_number, fields[0]))
        paths.append(fields[1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{images_path}: repeated image ids")
    is_train: dict[int, bool] = {}
    for line_number, fields in _lines(split_path, 2):
        is_train[_int(split_path, line_number, fields[0])] = \
            _int(split_path, line_number, fields[1]) == 1
    missing = [i for i in ids if i not in is_train]
    if missing or len(is_train) != len(ids):
        raise ValueError(f"{split_path}: image ids do not match {images_path} "
                         f"(e.g. image {missing[0] if missing else 'extra'})")
    return ids, paths, [is_train[i] for i in ids]


def read_labels(path: Path, image_ids: list[int], num_attributes: int) -> np.ndarray:
    """N x K float64 labels placed by (image_id, attribute_id), rows in ``image_ids`` order.

    Lines are split on whitespace and only the first three fields are used, because some copies
    of the file carry an extra field on a few lines.
    """
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    labels = np.zeros((len(image_ids), num_attributes), dtype=np.float64)
    seen = np.zeros(labels.shape, dtype=bool)
    for line_number, fields in _lines(path, 3):
        image_id, attribute_id, present = (_int(path, line_number, f) for f in fields[:3])
        if image_id not in row_of:
            raise ValueError(f"{path}, line {line_number}: unknown image id {image_id}")
        if not 1 <= attribute_id <= num_attributes:
            raise ValueError(f"{path}, line {line_number}: attribute id {attribute_id} is not "
                             f"in 1..{num_attributes}")
        if present not in (0, 1):
            raise ValueError(f"{path}, line {line_number}: is_present is {present}, not 0 or 1")
        row, col = row_of[image_id], attribute_id - 1
        if seen[row, col] and labels[row, col] != present:
            raise ValueError(f"{path}, line {line_number}: image {image_id} attribute "
                             f"{attribute_id} given twice with different values")
        seen[row, col] = True
        labels[row, col] = present
    if not seen.all():
        row, col = np.argwhere(~seen)[0]
        raise ValueError(f"{path}: image {image_ids[row]} has no value for attribute {col + 1} "
                         f"({int((~seen).sum())} (image, attribute) pairs missing)")
    return labels


def format_cub(load_path: str | Path, save_path: str | Path) -> dict[str, tuple]:
    """Read and check every input file, then write the formatted files."""
    files = input_files(load_path)
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"missing {path}; {README_HINT}")
    names = read_attribute_names(files["attributes"])
    if tuple(names) != datasets.CUB_ATTRIBUTE_KEYS:
        print(f"warning: attribute names in {files['attributes']} differ from the registry's; "
              f"class indices still follow the file", file=sys.stderr)
    ids, paths, is_train = read_images(files["images"], files["split"])
    labels = read_labels(files["labels"], ids, len(names))
    train = np.array(is_train, dtype=bool)
    paths = np.array(paths, dtype=np.str_)
    result = {"train": (paths[train], labels[train]), "val": (paths[~train], labels[~train])}
    for phase, (phase_images, phase_labels) in result.items():
        if len(phase_images) == 0:
            raise ValueError(f"{files['split']}: no {phase} images")
    for phase, (phase_images, phase_labels) in result.items():
        datasets.save_formatted(save_path, phase, phase_images, phase_labels)
    return result


def main(args: argparse.Namespace) -> None:
    report_formatted("cub", format_cub(args.load_path, args.save_path), args.save_path)


if __name__ == "__main__":
    run_script(main, get_args_parser(), next_step=after_formatting("cub"))
