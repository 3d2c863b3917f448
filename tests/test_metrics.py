"""metrics.py against scikit-learn and against a plain per-image / per-threshold loop."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

import datasets
import main_clip
import metrics
from conftest import demo_args


def loop_average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one class by walking the distinct thresholds from the highest score down."""
    num_pos = int(positive.sum())
    if num_pos == 0:
        return 0.0
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ap, true_pos, seen, prev_recall, i = 0.0, 0, 0, 0.0, 0
    while i < len(order):
        threshold = scores[order[i]]
        while i < len(order) and scores[order[i]] == threshold:  # the whole tie group at once
            true_pos += int(positive[order[i]])
            seen += 1
            i += 1
        recall = true_pos / num_pos
        ap += (recall - prev_recall) * (true_pos / seen)
        prev_recall = recall
    return ap


def loop_metrics(scores: np.ndarray, targets: np.ndarray) -> dict:
    """docs/DESIGN.md §4's definitions with one Python loop per image (tie rule: lower class index first)."""
    positive = targets == 1
    num_examples, num_classes = scores.shape
    results = {"map": 100.0 * float(np.mean([loop_average_precision(scores[:, c], positive[:, c])
                                             for c in range(num_classes)]))}
    for k in (1, 3, 5):
        prec = rec = top = 0.0
        for i in range(num_examples):
            ranked = sorted(range(num_classes), key=lambda c: (-scores[i, c], c))[:k]
            hits = sum(int(positive[i, c]) for c in ranked)
            num_pos = int(positive[i].sum())
            if num_pos:
                prec += hits / k
                rec += hits / num_pos
                top += float(hits > 0)
        results[f"prec_at_{k}"] = prec / num_examples
        results[f"rec_at_{k}"] = rec / num_examples
        results[f"top_{k}"] = top / num_examples
    return results


def random_case(seed: int, num_examples: int = 60, num_classes: int = 9, tie_decimals: int | None = 1):
    """Random scores (rounded so ties are common), observed-style targets in {-1, 0, 1}, with
    one class without positives and one image without positives."""
    rng = np.random.default_rng(seed)
    scores = rng.random((num_examples, num_classes))
    if tie_decimals is not None:
        scores = np.round(scores, tie_decimals)
    targets = rng.choice([-1.0, 0.0, 1.0], size=(num_examples, num_classes), p=[0.3, 0.4, 0.3])
    targets[:, 2] = np.where(targets[:, 2] == 1, 0.0, targets[:, 2])  # class 2: no positive
    targets[4] = -1.0  # image 4: no positive
    return scores, targets


def sklearn_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    positive = targets == 1
    return np.array([average_precision_score(positive[:, c], scores[:, c]) if positive[:, c].any() else 0.0
                     for c in range(scores.shape[1])])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("tie_decimals", [None, 1, 2])
def test_ap_matches_sklearn_and_loop(seed, tie_decimals):
    scores, targets = random_case(seed, tie_decimals=tie_decimals)
    ap = metrics.average_precision_per_class(scores, targets)
    assert ap.shape == (scores.shape[1],)
    assert ap[2] == 0.0
    np.testing.assert_allclose(ap, sklearn_ap(scores, targets), rtol=0, atol=1e-12)
    loop = [loop_average_precision(scores[:, c], targets[:, c] == 1) for c in range(scores.shape[1])]
    np.testing.assert_allclose(ap, loop, rtol=0, atol=1e-12)


def test_ap_float32_scores_and_all_tied():
    scores, targets = random_case(3, num_examples=500, tie_decimals=None)
    scores32 = scores.astype(np.float32)
    np.testing.assert_allclose(metrics.average_precision_per_class(scores32, targets),
                               sklearn_ap(scores32, targets), rtol=0, atol=1e-12)
    flat = np.full_like(scores, 0.5)
    np.testing.assert_allclose(metrics.average_precision_per_class(flat, targets),
                               sklearn_ap(flat, targets), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_classes", [3, 4, 9])
def test_compute_metrics_matches_loop(seed, num_classes):
    scores, targets = random_case(seed, num_classes=num_classes, tie_decimals=1)
    got = metrics.compute_metrics(scores, targets)
    expected = loop_metrics(scores, targets)
    assert set(got) == set(expected) == {"map", *(f"{m}_{k}" for m in ("prec_at", "rec_at", "top")
                                                   for k in (1, 3, 5))}
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
        assert isinstance(got[key], float)
    assert got["map"] == pytest.approx(100 * sklearn_ap(scores, targets).mean(), abs=1e-10)


def test_memory_layout_and_dtypes_do_not_matter():
    scores, targets = random_case(2, tie_decimals=1)
    expected = metrics.compute_metrics(scores, targets)
    assert metrics.compute_metrics(np.asfortranarray(scores), np.asfortranarray(targets)) == expected
    assert metrics.compute_metrics(scores[::-1][::-1], targets.astype(np.int8)) == expected
    assert metrics.compute_metrics((scores * 10).astype(int), targets) == \
        metrics.compute_metrics((scores * 10).astype(float), targets)


def test_topk_tie_rule_lower_class_index_first():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1, 0.5, 0.5]])
    # Ranked: class 1 (0.9), then the tied 0.5s in index order 0, 2, 3, 5, 6: the top-5 holds
    # class 5 but not class 6.
    targets = np.array([[0, 0, 0, 0, 0, 1, 1]])
    got = metrics.compute_metrics(scores, targets)
    assert got["prec_at_1"] == 0.0 and got["prec_at_3"] == 0.0 and got["top_3"] == 0.0
    assert got["prec_at_5"] == pytest.approx(1 / 5) and got["rec_at_5"] == pytest.approx(1 / 2)
    assert got["top_5"] == 1.0


def test_images_without_positives_count_zero():
    scores = np.array([[0.9, 0.1], [0.2, 0.8]])
    targets = np.array([[1, 0], [0, -1]])
    got = metrics.compute_metrics(scores, targets)
    assert got["prec_at_1"] == 0.5 and got["rec_at_1"] == 0.5 and got["top_1"] == 0.5
    # Fewer classes than k: the top-k is every class.
    assert got["prec_at_3"] == pytest.approx(1 / 6) and got["rec_at_5"] == 0.5
    # Class 1 has no positive: AP 0, still in the mean.
    assert got["map"] == pytest.approx(50.0)


def test_observed_style_targets_only_one_is_positive():
    scores, targets = random_case(1, tie_decimals=None)
    clean = (targets == 1).astype(float)
    assert metrics.compute_metrics(scores, targets) == metrics.compute_metrics(scores, clean)
    soft = np.where(targets == -1, -0.3, targets)
    assert metrics.compute_metrics(scores, soft) == metrics.compute_metrics(scores, clean)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same shape"):
        metrics.compute_metrics(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="same shape"):
        metrics.average_precision_per_class(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        metrics.compute_metrics(np.array([[np.nan, 0.1]]), np.array([[1, 0]]))


def test_empty_phase_gives_zeros():
    got = metrics.compute_metrics(np.zeros((0, 4)), np.zeros((0, 4)))
    assert got["map"] == 0.0 and all(value == 0.0 for value in got.values())


def test_coco_scale_is_fast():
    """The issue asks for the whole COCO test set well under 1 s; allow slack for a busy machine."""
    import time

    rng = np.random.default_rng(0)
    scores = rng.random((40137, 80)).astype(np.float32)
    targets = (rng.random((40137, 80)) < 2.9 / 80).astype(np.float64)
    metrics.compute_metrics(scores, targets)
    start = time.perf_counter()
    metrics.compute_metrics(scores, targets)
    assert time.perf_counter() - start < 1.0


def test_a_class_without_positives_counts_as_ap_0_and_the_run_says_which(demo_root, tmp_path):
    # A copy of the demo data whose official val set (the test split) has no "dog" positive.
    root = tmp_path / "data"
    shutil.copytree(demo_root / "pascal", root / "pascal", ignore=shutil.ignore_patterns("cache"))
    dog = datasets.get_dataset_info("pascal").class_names.index("dog")
    had_dogs = False
    for name in ("formatted_val_labels.npy", "formatted_val_labels_obs.npy"):
        labels = np.load(root / "pascal" / name)
        had_dogs |= bool((labels[:, dog] == 1).any())
        labels[:, dog] = np.minimum(labels[:, dog], 0)
        np.save(root / "pascal" / name, labels)
    assert had_dogs  # the change is real
    summary = main_clip.main(demo_args(root, tmp_path / "out", "-l", "an", "--train-mode", "linear_fixed_features",
                                       "--epochs", "1", "--run-name", "r"))
    assert summary["classes_without_positives"]["test"] == ["dog"]
    val_labels = datasets.load_benchmark(root, "pascal").val.labels
    names = datasets.get_dataset_info("pascal").class_names
    assert summary["classes_without_positives"]["val"] == [names[k] for k in range(20) if val_labels[:, k].max() < 1]
    assert "val_observed" not in summary["classes_without_positives"]  # selected on clean labels
    assert summary["test_ap_per_class"][dog] == 0.0
    assert summary["best_test_map"] == pytest.approx(np.mean(summary["test_ap_per_class"]))
    log = (tmp_path / "out" / "r" / "log.txt").read_text()
    assert "note: 1 of 20 classes have no positive in test (dog): each counts in its mAP as AP 0" in log
    assert json.loads((tmp_path / "out" / "r" / "summary.json").read_text())["classes_without_positives"] == \
        summary["classes_without_positives"]
