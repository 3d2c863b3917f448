"""Evaluation metrics for multi-label classification (docs/DESIGN.md §4), vectorised numpy.

Targets: entries equal to 1 are positive, anything else (0, -1, soft negatives) is not, so both
clean 0/1 labels and observed -1/0/+1 labels can be scored directly.

* Per-class AP equals scikit-learn's ``average_precision_score`` (no interpolation; tied scores
  form one threshold, so precision and recall are evaluated only at distinct score values).
  A class without positives gets AP 0 and still counts in the mean; mAP = 100 * mean AP.
* For k in 1, 3, 5 and every image: the top-k classes by score; prec@k = hits / k,
  rec@k = hits / #positives, top_k = 1 if hits > 0; an image without positives scores 0 on all
  three. Tie rule for the top-k: classes are ranked by descending score and, among equal
  scores, by ascending class index (what ``np.argsort(-scores, axis=1, kind='stable')`` gives).
  The original code's ``np.argsort(scores)[::-1]`` had no defined tie order; this one is fixed.
"""
from __future__ import annotations

import numpy as np

TOP_K = (1, 3, 5)


def _check_inputs(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores, positive mask) as arrays; ValueError on shape or value problems."""
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(
            f"metrics: scores and targets must be 2-D arrays of the same shape (N x K), "
            f"got {scores.shape} and {targets.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    # NaN would make the sort order (and so every metric) meaningless; +-inf likewise breaks the
    # -inf sentinel used for the top-k.
    if scores.size and not np.isfinite(scores).all():
        raise ValueError("metrics: scores contain NaN or infinite values")
    return scores, targets == 1


def average_precision_per_class(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """AP of every class (length K, values in [0, 1]), equal to sklearn's ``average_precision_score``."""
    scores, positive = _check_inputs(scores, targets)
    return _average_precision(scores, positive)


def _transpose(array: np.ndarray, block: int = 1024) -> np.ndarray:
    """C-contiguous transpose, copied in blocks of rows: about 3x faster than ``ascontiguousarray(a.T)``
    on tall arrays, whose strided reads otherwise miss the cache on every element."""
    num_rows, num_cols = array.shape
    out = np.empty((num_cols, num_rows), dtype=array.dtype)
    for start in range(0, num_rows, block):
        out[:, start:start + block] = array[start:start + block].T
    return out


def _average_precision(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per-class AP from checked scores and a boolean positive mask (both N x K).

    sklearn's AP is sum over distinct thresholds t of (R(t) - R(t_prev)) * P(t); each positive
    raises recall by 1/#pos at the threshold equal to its own score, so
    AP = mean over positives s of P(s), with P(s) = #positives scoring >= s / #items scoring >= s.
    Counting ">= s" puts a whole tie group on one threshold, exactly as sklearn groups ties.
    Only the class columns are sorted (no argsort, no per-image work); the loop over classes
    masks one row and binary-searches that class's positives.
    """
    num_examples, num_classes = scores.shape
    ap = np.zeros(num_classes, dtype=np.float64)
    if num_examples == 0:
        return ap
    # Contiguous K x N rows: sorting rows is several times faster than sorting strided columns.
    scores_t = _transpose(scores)
    positive_t = _transpose(positive)
    sorted_scores = np.sort(scores_t, axis=1)
    for c in range(num_classes):
        pos_scores = scores_t[c][positive_t[c]]
        if pos_scores.size == 0:
            continue  # no positives: AP 0 by definition (docs/DESIGN.md §4), still counted in the mean
        pos_scores.sort()
        items_ge = num_examples - np.searchsorted(sorted_scores[c], pos_scores, side="left")
        positives_ge = pos_scores.size - np.searchsorted(pos_scores, pos_scores, side="left")
        ap[c] = np.sum(positives_ge / items_ge) / pos_scores.size
    return ap


def _top_k_hits(scores: np.ndarray, positive: np.ndarray, ks=TOP_K) -> dict[int, np.ndarray]:
    """Per image, the number of positives among its top-k classes, for every k in ``ks``.

    ``positive`` is a boolean N x K mask, ``scores`` finite. Ranking: descending score, ties by
    ascending class index. Implemented as repeated row-wise argmax (the first maximum wins, which
    is exactly that tie rule): far cheaper than a full row sort when max(ks) is small.
    """
    num_examples, num_classes = scores.shape
    picks = min(max(ks), num_classes)
    remaining = np.array(scores, copy=True, order="C")  # C order: reshape(-1) below must be a view
    # Flat indices (row * K + class) index faster than (rows, classes) pairs.
    flat_remaining, flat_positive = remaining.reshape(-1), np.ascontiguousarray(positive).reshape(-1)
    row_offsets = np.arange(num_examples) * num_classes
    hits = np.zeros(num_examples, dtype=np.int64)
    hits_at: dict[int, np.ndarray] = {}
    for rank in range(1, picks + 1):
        best = remaining.argmax(axis=1) + row_offsets
        hits += flat_positive[best]
        # Scores were checked finite, so -inf removes the pick without tying with any other class.
        flat_remaining[best] = -np.inf
        if rank in ks:
            hits_at[rank] = hits.copy()
    for k in ks:
        # Fewer classes than k: the top-k is every class (as the original's slice [:k]).
        hits_at.setdefault(k, hits.copy())
    return hits_at


def compute_metrics(scores, targets) -> dict:
    """All metrics of one phase: 'map' (x100) and 'prec_at_k', 'rec_at_k', 'top_k' (means in [0, 1]).

    An empty phase (no images or no classes) gives 0 everywhere rather than NaN.
    """
    return metrics_and_ap(scores, targets)[0]


def metrics_and_ap(scores, targets) -> tuple[dict, np.ndarray]:
    """``compute_metrics`` and the per-class AP (in [0, 1]) it was built from, computed once."""
    scores, positive = _check_inputs(scores, targets)
    num_examples, num_classes = scores.shape
    ap = _average_precision(scores, positive)
    if num_examples == 0 or num_classes == 0:
        return {"map": 0.0, **{f"{name}_{k}": 0.0 for k in TOP_K
                               for name in ("prec_at", "rec_at", "top")}}, ap
    results: dict = {"map": 100.0 * float(np.mean(ap))}
    num_pos = positive.sum(axis=1)
    has_pos = num_pos > 0
    hits_at = _top_k_hits(scores, positive)
    for k in TOP_K:
        hits = hits_at[k]
        # Images without positives have hits == 0, so prec and top are 0 there automatically;
        # rec divides by max(#pos, 1) to give 0 instead of 0/0.
        results[f"prec_at_{k}"] = float(np.mean(hits / k))
        results[f"rec_at_{k}"] = float(np.mean(np.where(has_pos, hits / np.maximum(num_pos, 1), 0.0)))
        results[f"top_{k}"] = float(np.mean(hits > 0))
    return results, ap
