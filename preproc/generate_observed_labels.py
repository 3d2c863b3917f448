"""Draw the observed (single-positive) labels from the clean labels (docs/DESIGN.md §2).

Run from the repository root:
    python preproc/generate_observed_labels.py --dataset NAME [--data-root data] [--num-pos 1]
        [--num-neg 0] [--seed 1200]
Reads ``<data-root>/<NAME>/formatted_{train,val}_labels.npy`` and writes
``formatted_{train,val}_labels_obs.npy`` next to them.
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
from preproc import run_script  # noqa: E402
from fileio import atomic_save_npy  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate observed labels (single positive).")
    parser.add_argument("--dataset", required=True, choices=sorted(datasets.DATASETS))
    parser.add_argument("--data-root", default="data", help="folder holding <dataset>/")
    parser.add_argument("--num-pos", type=int, default=1,
                        help="observed positives per image (-1: all)")
    parser.add_argument("--num-neg", type=int, default=0,
                        help="observed negatives per image (-1: all)")
    parser.add_argument("--seed", type=int, default=1200)
    return parser


def observed_labels(labels01: np.ndarray, num_pos: int, num_neg: int, seed: int) -> np.ndarray:
    """Observed -1/0/+1 float64 matrix drawn from a 0/1 matrix, exactly as docs/DESIGN.md §2.

    A fresh RandomState(seed); per row in order, the positive indices are shuffled and the first
    ``num_pos`` kept, then the negative indices are shuffled (even when num_neg is 0, because the
    shuffle consumes random state that later rows depend on) and the first ``num_neg`` kept.
    """
    for flag, value in (("num_pos", num_pos), ("num_neg", num_neg)):
        if value < -1:
            raise ValueError(f"{flag} must be -1 (all) or >= 0, got {value}")
    labels01 = np.asarray(labels01)
    if labels01.ndim != 2 or not np.isin(labels01, (0, 1)).all():
        raise ValueError("labels must be an N x K matrix of 0/1")
    signed = np.where(labels01 == 1, 1.0, -1.0)
    rng = np.random.RandomState(seed)
    observed = np.zeros(signed.shape, dtype=np.float64)
    for row in range(signed.shape[0]):
        for value, count in ((1.0, num_pos), (-1.0, num_neg)):
            indices = np.nonzero(signed[row] == value)[0]
            rng.shuffle(indices)
            chosen = indices if count == -1 else indices[:count]
            observed[row, chosen] = value
    return observed


def generate(data_root: str | Path, name: str, num_pos: int = 1, num_neg: int = 0,
             seed: int = 1200) -> dict[str, np.ndarray]:
    """Load and check both phases' labels, then write both observed-label files."""
    info = datasets.get_dataset_info(name)
    folder = datasets.dataset_dir(data_root, name)
    labels = {}
    for phase in datasets.PHASES:
        path = datasets.formatted_paths(folder, phase)["labels"]
        if not path.is_file():
            raise FileNotFoundError(f"missing {path}; create it with: "
                                    f"{info.format_instructions(data_root)}")
        labels[phase] = datasets.load_label_matrix(path, (0, 1), info.num_classes)
    # A fresh RandomState per phase (inside observed_labels), as the SPML code bases did.
    observed = {phase: observed_labels(labels[phase], num_pos, num_neg, seed)
                for phase in datasets.PHASES}
    for phase in datasets.PHASES:
        atomic_save_npy(datasets.formatted_paths(folder, phase)["labels_obs"], observed[phase])
    return observed


def main(args: argparse.Namespace) -> None:
    observed = generate(args.data_root, args.dataset, args.num_pos, args.num_neg, args.seed)
    for phase, matrix in observed.items():
        positives = (matrix == 1).sum(axis=1)
        negatives = (matrix == -1).sum(axis=1)
        print(f"{phase}: {matrix.shape[0]} images, {positives.mean():.2f} observed positives and "
              f"{negatives.mean():.2f} observed negatives per image, "
              f"{int((positives == 0).sum())} images without a positive")
    print(f"wrote observed labels to {datasets.dataset_dir(args.data_root, args.dataset)}")


if __name__ == "__main__":
    run_script(main, get_args_parser())
