"""Benchmark: vectorised ``metrics.compute_metrics`` against a straightforward loop version.

Run from the repository root:  python bench/metrics_speed.py
Data: random scores and labels at COCO test scale (40,137 images x 80 classes, about 2.9
positives per image, float32 scores as a model would give). The loop version does what the
original code did: scikit-learn's ``average_precision_score`` once per class, and precision@k /
recall@k with a Python loop over images (one argsort per image and k). It is written lean (no
per-call input checks), so the ratio it gives is conservative; the pass/fail line uses it.
``--original`` also times the original's own structure, which repeats its input checks
(max/min/unique over the row) in every per-class and per-image call. All versions must agree.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import metrics  # noqa: E402  (needs the repository root on sys.path first)


def loop_metrics(scores: np.ndarray, targets: np.ndarray) -> dict:
    """Reference: per-class sklearn AP and per-image Python loops for the top-k metrics.

    Same definitions and tie rule as ``metrics.py`` (descending score, then ascending class index).
    """
    from sklearn.metrics import average_precision_score

    positive = targets == 1
    num_examples, num_classes = scores.shape
    ap = []
    for c in range(num_classes):
        ap.append(average_precision_score(positive[:, c], scores[:, c]) if positive[:, c].any() else 0.0)
    results = {"map": 100.0 * float(np.mean(ap))}
    for k in metrics.TOP_K:
        prec, rec, top = [], [], []
        for i in range(num_examples):
            relevant = np.flatnonzero(positive[i])
            hits = 0
            if len(relevant) > 0:
                top_k = np.argsort(-scores[i], kind="stable")[:k]
                hits = len(np.intersect1d(top_k, relevant))
            prec.append(hits / k)
            rec.append(hits / len(relevant) if len(relevant) > 0 else 0.0)
            top.append(float(hits > 0))
        results[f"prec_at_{k}"] = float(np.mean(prec))
        results[f"rec_at_{k}"] = float(np.mean(rec))
        results[f"top_{k}"] = float(np.mean(top))
    return results


def original_metrics(scores: np.ndarray, targets: np.ndarray) -> dict:
    """The original code's structure: every per-class / per-image helper call validates its inputs
    (np.max / np.min / np.unique), as the original metrics.py's check_inputs did."""
    from sklearn.metrics import average_precision_score

    def check_inputs(targs, preds):
        if not (np.shape(preds) == np.shape(targs) and np.max(preds) <= 1.0 and np.min(preds) >= 0.0
                and np.max(targs) <= 1.0 and np.min(targs) >= 0.0 and len(np.unique(targs)) <= 2):
            raise ValueError("bad inputs")

    def avg_precision(targs, preds):
        check_inputs(targs, preds)
        return 0.0 if np.all(targs == 0) else average_precision_score(targs, preds)

    def hits_at_k(targs, preds, k):
        check_inputs(targs, preds)
        relevant = np.flatnonzero(targs == 1)
        if len(relevant) == 0:
            return 0, 0
        top_k = np.argsort(-preds, kind="stable")[:k]  # this project's tie rule, so results compare
        return len(np.intersect1d(top_k, relevant)), len(relevant)

    targets = (targets == 1).astype(np.float32)
    num_examples, num_classes = scores.shape
    results = {"map": 100.0 * float(np.mean([avg_precision(targets[:, c], scores[:, c])
                                             for c in range(num_classes)]))}
    for k in metrics.TOP_K:
        prec, rec = [], []
        for i in range(num_examples):
            hits, relevant = hits_at_k(targets[i], scores[i], k)
            prec.append(hits / k if relevant else 0.0)
        for i in range(num_examples):
            hits, relevant = hits_at_k(targets[i], scores[i], k)
            rec.append(hits / relevant if relevant else 0.0)
        results[f"prec_at_{k}"] = float(np.mean(prec))
        results[f"rec_at_{k}"] = float(np.mean(rec))
        results[f"top_{k}"] = float(np.mean(np.array(prec) > 0))
    return results


def make_data(num_examples: int, num_classes: int, positives_per_image: float, seed: int):
    """Labels with the given mean positive count; scores mildly informative, float32."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((num_examples, num_classes)) < positives_per_image / num_classes)
    logits = rng.normal(-2.0, 1.5, size=(num_examples, num_classes)) + 2.5 * targets
    scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return scores, targets.astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=40137)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--positives-per-image", type=float, default=2.9)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the vectorised version")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--original", action="store_true",
                        help="also time the original's structure (per-call input checks; 15-40 s)")
    args = parser.parse_args(argv)

    scores, targets = make_data(args.num_examples, args.num_classes, args.positives_per_image, args.seed)
    print(f"data: {scores.shape[0]} x {scores.shape[1]}, {targets.sum(1).mean():.3f} positives per image, "
          f"{int((targets.sum(1) == 0).sum())} images without positives, scores {scores.dtype}")

    metrics.compute_metrics(scores, targets)  # warm-up (first-touch allocations)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = metrics.compute_metrics(scores, targets)
        times.append(time.perf_counter() - start)
    fast_time = statistics.median(times)

    start = time.perf_counter()
    slow = loop_metrics(scores, targets)
    loop_time = time.perf_counter() - start

    max_diff = max(abs(fast[key] - slow[key]) for key in slow)
    ratio = loop_time / fast_time
    print(f"vectorised compute_metrics: {fast_time:.4f} s (median of {args.repeats}; min {min(times):.4f} s)")
    print(f"loop version:               {loop_time:.3f} s")
    print(f"speed-up: {ratio:.1f}x")
    print(f"max abs difference over {len(slow)} metrics (map in x100 units): {max_diff:.3g}")
    print(f"map: {fast['map']:.6f} (vectorised) vs {slow['map']:.6f} (loop)")
    if args.original:
        start = time.perf_counter()
        original = original_metrics(scores, targets)
        original_time = time.perf_counter() - start
        original_diff = max(abs(fast[key] - original[key]) for key in original)
        print(f"original-style loop:        {original_time:.3f} s, speed-up {original_time / fast_time:.1f}x, "
              f"max abs difference {original_diff:.3g}")
        max_diff = max(max_diff, original_diff)
    ok = max_diff < 1e-9 and ratio >= 50 and fast_time < 1.0
    print("PASS" if ok else "FAIL", "(criteria: agree to 1e-9, >= 50x faster than the lean loop, under 1 s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
