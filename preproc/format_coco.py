"""Format MS-COCO 2014 labels into the formatted files (docs/DESIGN.md §2, bit-exact).

Run from the repository root:
    python preproc/format_coco.py [--load-path data/coco] [--save-path data/coco]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

import datasets  # noqa: E402
from preproc import after_formatting, report_formatted, run_script  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Format MS-COCO 2014 labels.")
    parser.add_argument("--load-path", default="data/coco",
                        help="folder holding annotations/instances_{train,val}2014.json")
    parser.add_argument("--save-path", default="data/coco",
                        help="folder for the formatted_*.npy files")
    return parser


def annotation_file(load_path: str | Path, split: str) -> Path:
    return Path(load_path) / "annotations" / f"instances_{split}2014.json"


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}; see data/coco/README.md")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'categories' and 'annotations'")
    for key in ("categories", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: malformed COCO file, no '{key}' list")
    return data


def _categories(path: Path, categories: list) -> tuple[list[str], dict[int, int]]:
    """Category names and category id -> class index (the position in the JSON list)."""
    names, id_to_index = [], {}
    for position, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise ValueError(f"{path}: malformed category at position {position} "
                             f"(needs 'id' and 'name')")
        names.append(str(category["name"]))
        id_to_index[int(category["id"])] = position
    return names, id_to_index


def read_split(path: Path, split: str, annotations: list, id_to_index: dict[int, int],
               num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Image paths and the N x K float64 label matrix of one split (annotated images only)."""
    image_ids, class_indices = [], []
    for number, annotation in enumerate(annotations):
        try:
            image_id = int(annotation["image_id"])
            category_id = int(annotation["category_id"])
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(f"{path}: malformed annotation {number} (needs integer 'image_id' "
                             f"and 'category_id')") from error
        if category_id not in id_to_index:
            raise ValueError(f"{path}: annotation {number} has category_id {category_id}, "
                             f"which is not in 'categories'")
        image_ids.append(image_id)
        class_indices.append(id_to_index[category_id])
    if not image_ids:
        raise ValueError(f"{path}: no annotations")
    # Sorted as strings (e.g. 10 < 100 < 9), as the SPML code bases did: the row order matters.
    sorted_ids = sorted({str(image_id) for image_id in image_ids})
    row_of = {int(text): row for row, text in enumerate(sorted_ids)}
    labels = np.zeros((len(sorted_ids), num_classes), dtype=np.float64)
    labels[[row_of[i] for i in image_ids], class_indices] = 1.0
    images = np.array([f"{split}2014/COCO_{split}2014_{int(text):012d}.jpg"
                       for text in sorted_ids], dtype=np.str_)
    return images, labels


def format_coco(load_path: str | Path, save_path: str | Path) -> dict[str, tuple]:
    """Read both splits (all validation first), then write the formatted files."""
    info = datasets.get_dataset_info("coco")
    paths = {split: annotation_file(load_path, split) for split in datasets.PHASES}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"missing {path}; see data/coco/README.md")
    reference = None
    result = {}
    for split, path in paths.items():
        # One split at a time: the train JSON alone takes gigabytes once parsed.
        data = _load_json(path)
        names, id_to_index = _categories(path, data["categories"])
        if reference is None:
            reference = (names, id_to_index, path)
            if len(names) != info.num_classes:
                raise ValueError(f"{path}: {len(names)} categories, expected "
                                 f"{info.num_classes} (COCO 2014)")
            if tuple(names) != info.class_names:
                print(f"warning: category names in {path} differ from the registry's COCO "
                      f"names; class indices still follow the JSON", file=sys.stderr)
        elif (names, id_to_index) != reference[:2]:
            raise ValueError(f"{path}: 'categories' differ from those in {reference[2]}; "
                             f"train and val must use the same category list")
        result[split] = read_split(path, split, data.pop("annotations"), id_to_index,
                                   len(names))
        del data
    for split, (images, labels) in result.items():
        datasets.save_formatted(save_path, split, images, labels)
    return result


def main(args: argparse.Namespace) -> None:
    report_formatted("coco", format_coco(args.load_path, args.save_path), args.save_path)


if __name__ == "__main__":
    run_script(main, get_args_parser(), next_step=after_formatting("coco"))
