"""Label new images with a run's checkpoint.

    python predict.py results/pascal_resnet50_EM_PL_seed0 photos/ extra.jpg --out predictions.csv

Folders are searched recursively for images (``IMAGE_SUFFIXES``); a file named on the command
line is tried whatever its suffix. Images that cannot be read are listed on stderr and left out.
The CSV, written atomically, has one row per image: its path, the classes whose probability
reaches ``--threshold`` (most probable first), the ``--top-k`` most probable classes, then one
column per class with its probability. The images go through the transform the run evaluated
with, so an image of the run's test set gets the probabilities ``evaluate.py`` computes for it.
``--out`` never replaces a file a run folder owns (its checkpoints, config, logs, ``eval_*``
results) nor one of the input images: such an ``--out`` is refused before any work.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

import datasets
import rundir
from errors import RunError
from fileio import atomic_write_text
from reading import saved_run

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Predict the classes of images with a run's checkpoint.",
                                     add_help=add_help)
    saved_run.add_common_arguments(parser)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER",
                        help="image files, or folders searched recursively for images")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV to write")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="probability from which a class counts as predicted")
    parser.add_argument("--top-k", type=int, default=5, help="the k most probable classes listed per image (0: none)")
    return parser


def is_run_folder(folder: Path) -> bool:
    """A folder a run wrote into: it holds one of the files only runs write there."""
    return any((folder / name).is_file() for name in rundir.RUN_FILES)


def is_run_file_name(name: str) -> bool:
    """A name a run folder owns: the run's own files and evaluate.py's eval_* results (as
    ``rundir.foreign_files`` counts them)."""
    return name in rundir.RUN_FILES or name.startswith("eval_")


def check_not_a_run_file(out: Path) -> None:
    """RunError unless ``out`` is free to write: the CSV would replace a checkpoint or a result of
    the run folder it lies in."""
    if is_run_file_name(out.name) and is_run_folder(out.parent):
        raise RunError(f"--out {out} is a file of the run folder {out.parent}: writing the CSV would replace it; "
                       f"pick another --out")


def check_not_an_input(out: Path, images: list[Path]) -> None:
    """RunError when ``out`` is one of the ``images`` to label: the CSV would replace it."""
    if out.exists() and any(out.samefile(image) for image in images):
        raise RunError(f"--out {out} is one of the input images: writing the CSV would replace it; pick another --out")


def find_images(inputs: list[Path]) -> list[Path]:
    """Image files named or found (recursively, sorted) in ``inputs``, each once, in that order."""
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise RunError(f"{path}: no such file or folder")
    unique = dict.fromkeys(found)  # keeps the first occurrence's position
    if not unique:
        raise RunError("no images found in " + ", ".join(str(p) for p in inputs)
                       + f" (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return list(unique)


def decode_error(path: Path) -> str | None:
    """Why the image cannot be decoded, or None when it can."""
    try:
        datasets.open_rgb(path)  # decodes the whole image: a truncated file fails here
    except datasets.UnreadableImageError as error:
        return str(error)
    return None


def predictions_csv(paths: list[Path], scores: np.ndarray, class_names, threshold: float, top_k: int) -> str:
    """The CSV text: image, predicted, top_<k>, then one probability column per class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    top_k = min(top_k, len(class_names))
    writer.writerow(["image", "predicted", *([f"top_{top_k}"] if top_k else []), *class_names])
    order = np.argsort(-scores, axis=1, kind="stable")
    for path, row, ranked in zip(paths, scores, order):
        predicted = ";".join(class_names[c] for c in ranked if row[c] >= threshold)
        top = [";".join(class_names[c] for c in ranked[:top_k])] if top_k else []
        # 9 significant digits give back the exact float32 probability.
        writer.writerow([str(path), predicted, *top, *(format(float(p), ".9g") for p in row)])
    return buffer.getvalue()


def main(args: argparse.Namespace) -> dict:
    """Write the predictions CSV; returns {"out", "images", "skipped", "scores"}. RunError for fixable problems."""
    saved_run.check_common_arguments(args)
    if not 0.0 <= args.threshold <= 1.0:
        raise RunError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.top_k < 0:
        raise RunError(f"--top-k must be >= 0, got {args.top_k}")
    if args.out.is_dir():
        raise RunError(f"--out {args.out} is a folder; name the CSV file to write")
    check_not_a_run_file(args.out)
    run = saved_run.load_run(args.run_dir, args.checkpoint, args.device)
    paths = find_images(args.inputs)
    check_not_an_input(args.out, paths)
    readable, skipped = [], []
    for path in paths:
        error = decode_error(path)
        if error is None:
            readable.append(path)
        else:
            skipped.append(path)
            print(f"skipped unreadable image {path} ({error})", file=sys.stderr)
    if not readable:
        raise RunError(f"none of the {len(paths)} images could be read")
    no_labels = np.zeros((len(readable), len(run.class_names)), dtype=np.float32)
    scores = run.predict(run.dataset(readable, no_labels, no_labels), args.batch_size, args.num_workers,
                         desc="predict")
    atomic_write_text(args.out, predictions_csv(readable, scores, run.class_names, args.threshold, args.top_k))
    print(f"wrote {args.out}: {len(readable)} images ({len(skipped)} unreadable, skipped), "
          f"{len(run.class_names)} classes, {run.checkpoint}.pt of {args.run_dir}")
    return {"out": args.out, "images": readable, "skipped": skipped, "scores": scores}


def cli(argv: list[str] | None = None) -> int:
    return saved_run.run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
