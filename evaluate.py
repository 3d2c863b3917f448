"""Score a run's checkpoint on one of its splits, as the run itself scored them.

    python evaluate.py results/pascal_resnet50_EM_PL_seed0                       # best.pt on the test set
    python evaluate.py results/pascal_resnet50_EM_PL_seed0 --split val --checkpoint last

The model is rebuilt from the run's ``config.json`` and loaded from ``best.pt`` / ``last.pt``
(``weights_only=True``) once the configuration the checkpoint records is found to be the
folder's (another run's checkpoint is refused in one line naming the settings that differ); the
split is drawn with the run's own data settings (split and subsampling seeds and fractions) and
scored against its clean and its observed labels. Prints
the metrics and writes ``RUN_DIR/eval_<split>_<checkpoint>.json`` atomically. The test mAP of
``best`` is the run's reported result (``summary.json``'s ``best_test_map``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import datasets
import metrics
from fileio import atomic_write_json
from reading import saved_run

SPLITS = ("test", "val", "train")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score a run's checkpoint on one of its splits.", add_help=add_help)
    saved_run.add_common_arguments(parser)
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="test (the official val set), val or train (the run's split of the official train set)")
    parser.add_argument("--data-root", default=None, help="where the datasets are (default: the run's --data-root)")
    return parser


def output_path(run_dir: Path, split: str, checkpoint: str) -> Path:
    return Path(run_dir) / f"eval_{split}_{checkpoint}.json"


def score_split(run: saved_run.SavedRun, split: str, data_root: str | None = None, batch_size: int | None = None,
                num_workers: int = 0) -> tuple[np.ndarray, datasets.FormattedData, list[str]]:
    """(N x K probabilities, the split's labels, its image paths), in the split's row order."""
    benchmark = saved_run.load_benchmark(run.config, data_root)
    data = getattr(benchmark, split)
    paths = benchmark.image_paths(split)
    scores = run.predict(run.dataset(paths, data.labels_obs, data.labels), batch_size, num_workers,
                         desc=f"{split} ({run.checkpoint}.pt)")
    return scores, data, paths


def _metric_line(name: str, values: dict) -> str:
    return f"{name + ':':<10}" + ", ".join(f"{key} {value:.3f}" for key, value in values.items())


def main(args: argparse.Namespace) -> dict:
    """Evaluate; returns what eval_<split>_<checkpoint>.json holds. RunError for fixable problems."""
    saved_run.check_common_arguments(args)
    run = saved_run.load_run(args.run_dir, args.checkpoint, args.device)
    scores, data, _ = score_split(run, args.split, args.data_root, args.batch_size, args.num_workers)
    clean, ap_clean = metrics.metrics_and_ap(scores, data.labels)
    observed = metrics.compute_metrics(scores, data.labels_obs)
    result = {"run_dir": str(args.run_dir), "run_name": Path(args.run_dir).resolve().name, "split": args.split,
              "checkpoint": args.checkpoint, "epoch": run.epoch, "dataset": run.config["dataset"],
              "model": run.config["model"], "method": run.config["method"], "seed": run.config.get("seed"),
              "num_images": int(len(scores)), "class_names": list(run.class_names),
              "clean": clean, "observed": observed, "ap_clean": [100.0 * float(ap) for ap in ap_clean]}

    epoch = "n/a" if run.epoch is None else run.epoch
    print(f"{args.run_dir}: {args.checkpoint}.pt (epoch {epoch}) on the {args.split} split, "
          f"{len(scores)} images, {scores.shape[1]} classes, device {run.device}")
    print(f"[{args.split}] map_clean: {clean['map']:.3f}, map_observed: {observed['map']:.3f}")
    print(_metric_line("clean", clean))
    print(_metric_line("observed", observed))
    summary = saved_run.read_summary(args.run_dir)
    if args.split == "test" and args.checkpoint == "best" and summary and summary.get("best_test_map") is not None:
        print(f"summary.json best_test_map: {summary['best_test_map']:.3f}")
    path = atomic_write_json(output_path(args.run_dir, args.split, args.checkpoint), result)
    print(f"wrote {path}")
    return result


def cli(argv: list[str] | None = None) -> int:
    return saved_run.run_cli(get_args_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
