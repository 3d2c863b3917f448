"""Format PASCAL VOC 2012 labels into the formatted files (docs/DESIGN.md §2, bit-exact).

Run from the repository root:
    python preproc/format_pascal.py [--load-path data/pascal] [--save-path data/pascal]
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

MAIN_DIR = Path("VOCdevkit", "VOC2012", "ImageSets", "Main")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Format PASCAL VOC 2012 labels.")
    parser.add_argument("--load-path", default="data/pascal",
                        help="folder holding VOCdevkit/ (the extracted VOC 2012 trainval tar)")
    parser.add_argument("--save-path", default="data/pascal",
                        help="folder for the formatted_*.npy files")
    return parser


def read_phase(main_dir: Path, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """Image file names (sorted) and the N x 20 float64 label matrix of one phase."""
    positives: dict[str, list[int]] = {}
    for class_index, class_name in enumerate(datasets.VOC_CLASSES):
        path = main_dir / f"{class_name}_{phase}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"missing {path}; see data/pascal/README.md")
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                # Positives are written '<id>  1' (two spaces): split on any whitespace and
                # take the last token as the label.
                tokens = line.split()
                if not tokens:
                    continue
                if len(tokens) < 2:
                    raise ValueError(f"{path}, line {line_number}: expected '<image id> <label>',"
                                     f" got {line.rstrip()!r}")
                try:
                    label = int(tokens[-1])
                except ValueError as error:
                    raise ValueError(f"{path}, line {line_number}: label {tokens[-1]!r} is not "
                                     f"-1, 0 or 1") from error
                if label not in (-1, 0, 1):
                    raise ValueError(f"{path}, line {line_number}: label {label} is not "
                                     f"-1, 0 or 1")
                # 0 marks 'difficult' objects: counted as absent, as in the SPML literature.
                if label == 1:
                    positives.setdefault(f"{tokens[0]}.jpg", []).append(class_index)
    if not positives:
        raise ValueError(f"no image has a positive label in {main_dir}/*_{phase}.txt")
    images = sorted(positives)  # string order of the file names, as the original did
    labels = np.zeros((len(images), len(datasets.VOC_CLASSES)), dtype=np.float64)
    for row, image in enumerate(images):
        labels[row, positives[image]] = 1.0
    return np.array(images, dtype=np.str_), labels


def format_pascal(load_path: str | Path, save_path: str | Path) -> dict[str, tuple]:
    """Read both phases (all validation first), then write the formatted files."""
    main_dir = Path(load_path) / MAIN_DIR
    if not main_dir.is_dir():
        raise FileNotFoundError(f"missing folder {main_dir}; extract the VOC 2012 trainval tar "
                                f"into {load_path} (see data/pascal/README.md)")
    result = {phase: read_phase(main_dir, phase) for phase in datasets.PHASES}
    shared = set(result["train"][0]) & set(result["val"][0])
    if shared:
        raise ValueError(f"{main_dir}: {len(shared)} images are in both train and val lists "
                         f"(e.g. {sorted(shared)[0]}); VOC 2012 train and val are disjoint")
    for phase, (images, labels) in result.items():
        datasets.save_formatted(save_path, phase, images, labels)
    return result


def main(args: argparse.Namespace) -> None:
    report_formatted("pascal", format_pascal(args.load_path, args.save_path), args.save_path)


if __name__ == "__main__":
    run_script(main, get_args_parser(), next_step=after_formatting("pascal"))
