"""Benchmark: ``--train-mode linear_fixed_features`` at COCO scale, on the real training loop.

Synthetic cached features stand in for the backbone pass (82,081 official train images x 768,
80 classes, 40,137 test images); the split, loaders, loss, logger, checkpoints and model
selection are the training engine's own. Prints the wall time of 10 epochs, each with its val phase and,
to be conservative, a test phase (``--test-every-epoch``).

Then, on the same run state, one more epoch's steps twice, as a baseline: through the general
loop (``engine.Trainer.train_batches``: loader batches, autograd, ``engine.train_step``), and
through the head-only path that the run used (``Trainer.train_head_batches``), and the ratio of the two.

    python bench/frozen_head.py [--epochs 10] [--method EM_PL] [--bsize 8] [--no-baseline]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import engine  # noqa: E402
import config as config_module  # noqa: E402
import main_clip  # noqa: E402
import methods  # noqa: E402
import models  # noqa: E402
from preproc.generate_observed_labels import observed_labels  # noqa: E402

NUM_TRAIN, NUM_TEST, DIM, NUM_CLASSES = 82_081, 40_137, 768, 80


def synthetic_split(rng: np.random.RandomState, n: int, prototypes: np.ndarray, prefix: str):
    """Labels with ~2.9 positives per image; features = sum of class prototypes + noise."""
    labels = (rng.rand(n, NUM_CLASSES) < 2.9 / NUM_CLASSES).astype(np.float64)
    features = (labels @ prototypes + rng.randn(n, DIM)).astype(np.float32)
    images = np.array([f"{prefix}_{i:06d}.jpg" for i in range(n)])
    return datasets.FormattedData(images, labels, observed_labels(labels, 1, 0, 1200)), features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--method", "--loss", dest="method", default="EM_PL", choices=list(methods.REGISTRY))
    parser.add_argument("--bsize", type=int, default=8, help="batch size (COCO's default is 8)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the one-epoch comparison with the general loop")
    args = parser.parse_args()

    rng = np.random.RandomState(0)
    prototypes = 0.15 * rng.randn(NUM_CLASSES, DIM)  # weak class signal: the task is not trivial
    official_train, train_features = synthetic_split(rng, NUM_TRAIN, prototypes, "train")
    test, test_features = synthetic_split(rng, NUM_TEST, prototypes, "val")
    train_idx, val_idx = datasets.split_train_val(NUM_TRAIN)
    bench = datasets.BenchmarkSplits(info=datasets.get_dataset_info("coco"), image_dir=Path("unused"),
                                     train=official_train.subset(train_idx), val=official_train.subset(val_idx),
                                     test=test, train_indices=train_idx, val_indices=val_idx)
    features = {"train": train_features[train_idx], "val": train_features[val_idx], "test": test_features}

    with tempfile.TemporaryDirectory() as out:
        config = config_module.resolve_config(main_clip.get_args_parser().parse_args(
            ["-d", "coco", "-l", args.method, "--train-mode", "linear_fixed_features", "--epochs", str(args.epochs),
             "--bsize", str(args.bsize),
             "--test-every-epoch", "--output-dir", out, "--data-root", out, "--num-workers", "0"]))
        run_dir = Path(out) / config["run_name"]
        run_dir.mkdir()
        head_only = models.Classifier(torch.nn.Identity(), DIM, NUM_CLASSES, image_size=0)
        start = time.perf_counter()
        run = engine.Trainer(config, run_dir, engine.Setup(torch.device("cpu"), bench, None, None), model=head_only)
        if methods.get_method(args.method).needs_pseudo_labels:
            # Stand-in for the teacher's cached pseudo-labels: the clean positives, as +1.
            run.labels.set_pseudo(torch.from_numpy(bench.train.labels))
        stage = run.build_stage(engine.HEAD, config["epochs"], features=features)
        for epoch in range(1, config["epochs"] + 1):
            run.run_epoch(epoch, stage)
            run.save_last(epoch, stage)
        summary = run.logger.finish(config)
        elapsed = time.perf_counter() - start
        if not args.no_baseline:
            steps = {}
            labels, epoch = run.labels, config["epochs"] + 1
            pseudo = labels.pseudo
            coefficients = stage.method.label_coefficients(labels.observed, pseudo, labels.clean,
                                                           stage.epoch_in_stage(epoch))
            loops = (("general loop (autograd)", lambda bar: run.train_batches(epoch, stage, bar)),
                     ("head-only path", lambda bar: run.train_head_batches(epoch, stage, coefficients, bar)))
            for name, train in loops:
                stage.net.train()
                with tqdm(total=len(stage.loaders["train"]), disable=True) as bar:
                    begin = time.perf_counter()
                    train(bar)
                    steps[name] = time.perf_counter() - begin
    print(f"linear_fixed_features, {args.method}: {len(bench.train)} train / {len(bench.val)} val / {len(test)} test "
          f"rows x {DIM} features, {NUM_CLASSES} classes, batch {config['bsize']}")
    print(f"{config['epochs']} epochs with val and test every epoch: {elapsed:.1f} s "
          f"({elapsed / config['epochs']:.2f} s per epoch); best epoch {summary['best_epoch']}, "
          f"test mAP {summary['best_test_map']:.2f}")
    if not args.no_baseline:
        print("one more epoch's training steps, the same run state: "
              + "; ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items())
              + f" -> {steps['general loop (autograd)'] / steps['head-only path']:.1f}x")


if __name__ == "__main__":
    main()
