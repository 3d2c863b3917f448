"""Observed labels and the train/val split against plain implementations of docs/DESIGN.md §2."""
from __future__ import annotations

import numpy as np
import pytest

import datasets
from preproc import generate_observed_labels as gol


def plain_observed(labels: np.ndarray, num_pos: int, num_neg: int, seed: int) -> np.ndarray:
    """docs/DESIGN.md §2 written out step by step."""
    y = labels.astype(np.float64).copy()
    y[y == 0] = -1
    rng = np.random.RandomState(seed)
    obs = np.zeros_like(y)
    for i in range(y.shape[0]):
        pos = np.nonzero(y[i, :] == 1.0)[0]
        rng.shuffle(pos)
        pos = pos if num_pos == -1 else pos[:num_pos]
        obs[i, pos] = 1.0
        neg = np.nonzero(y[i, :] == -1.0)[0]
        rng.shuffle(neg)
        neg = neg if num_neg == -1 else neg[:num_neg]
        obs[i, neg] = -1.0
    return obs


def plain_split(n: int, val_frac: float, split_seed: int, ss_seed: int, frac_train: float,
                frac_val: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(split_seed)
    n_val = int(round(val_frac * n))
    n_train = n - n_val
    perm = rng.permutation(n)
    idx = {"train": np.sort(perm[:n_train]), "val": np.sort(perm[-n_val:])}
    rng999 = np.random.RandomState(ss_seed)
    for phase, frac in (("train", frac_train), ("val", frac_val)):
        keep = int(round(frac * len(idx[phase])))
        idx[phase] = idx[phase][np.sort(rng999.permutation(len(idx[phase]))[:keep])]
    return idx["train"], idx["val"]


@pytest.fixture
def labels() -> np.ndarray:
    rng = np.random.RandomState(42)
    matrix = (rng.rand(1000, 20) < 0.15).astype(np.float64)
    matrix[5] = 0          # rows without any positive stay all zero
    matrix[6] = 1          # a row without negatives
    return matrix


@pytest.mark.parametrize("num_pos,num_neg,seed", [(1, 0, 1200), (2, 3, 7), (-1, -1, 5),
                                                  (1, -1, 1200), (0, 2, 3)])
def test_observed_labels_exact(labels, num_pos, num_neg, seed):
    got = gol.observed_labels(labels, num_pos, num_neg, seed)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, plain_observed(labels, num_pos, num_neg, seed))


def test_single_positive_properties(labels):
    obs = gol.observed_labels(labels, 1, 0, 1200)
    assert set(np.unique(obs)) <= {0.0, 1.0}
    assert np.all(labels[obs == 1] == 1)                  # observed positives are true ones
    has_pos = labels.sum(axis=1) > 0
    np.testing.assert_array_equal((obs == 1).sum(axis=1), has_pos.astype(int))
    assert not obs[5].any()


def test_negative_shuffle_consumes_state_when_num_neg_is_zero(labels):
    # Skipping the negative shuffle (a tempting shortcut) would change later rows.
    rng = np.random.RandomState(1200)
    shortcut = np.zeros_like(labels)
    for i in range(len(labels)):
        pos = np.nonzero(labels[i] == 1)[0]
        rng.shuffle(pos)
        shortcut[i, pos[:1]] = 1
    assert not np.array_equal(shortcut, gol.observed_labels(labels, 1, 0, 1200))


def test_generate_writes_both_phases_with_fresh_state(tmp_path, labels):
    folder = tmp_path / "pascal"
    folder.mkdir()
    np.save(folder / "formatted_train_labels.npy", labels)
    np.save(folder / "formatted_val_labels.npy", labels[:300])
    gol.main(gol.get_args_parser().parse_args(["--dataset", "pascal",
                                               "--data-root", str(tmp_path)]))
    for phase, matrix in (("train", labels), ("val", labels[:300])):
        got = np.load(folder / f"formatted_{phase}_labels_obs.npy", allow_pickle=False)
        np.testing.assert_array_equal(got, plain_observed(matrix, 1, 0, 1200))


def test_generate_rejects_labels_not_01(tmp_path, labels):
    folder = tmp_path / "pascal"
    folder.mkdir()
    np.save(folder / "formatted_train_labels.npy", labels)
    bad = labels[:10].copy()
    bad[3, 4] = 2.0
    np.save(folder / "formatted_val_labels.npy", bad)
    with pytest.raises(ValueError, match=r"formatted_val_labels.npy: labels must be 0/1"):
        gol.generate(tmp_path, "pascal")
    assert not list(folder.glob("*labels_obs*"))      # not even the (valid) train phase


def test_generate_missing_or_wrong_width(tmp_path, labels):
    with pytest.raises(FileNotFoundError, match="format_pascal.py"):
        gol.generate(tmp_path, "pascal")
    folder = tmp_path / "coco"
    folder.mkdir()
    np.save(folder / "formatted_train_labels.npy", labels)
    np.save(folder / "formatted_val_labels.npy", labels)
    with pytest.raises(ValueError, match="formatted_train_labels.npy: has 20 classes, the "
                                         "dataset has 80"):
        gol.generate(tmp_path, "coco")
    with pytest.raises(ValueError, match="num_neg"):
        gol.observed_labels(labels, 1, -2, 0)


@pytest.mark.parametrize("n,val_frac,split_seed,ss_seed,frac_train,frac_val", [
    (1000, 0.2, 1200, 999, 1.0, 1.0), (1000, 0.2, 1200, 999, 0.5, 0.3),
    (5717, 0.2, 1200, 999, 1.0, 1.0), (37, 0.35, 4, 5, 0.9, 1.0)])
def test_split_exact(n, val_frac, split_seed, ss_seed, frac_train, frac_val):
    train, val = datasets.split_train_val(n, val_frac, split_seed, ss_seed, frac_train, frac_val)
    exp_train, exp_val = plain_split(n, val_frac, split_seed, ss_seed, frac_train, frac_val)
    np.testing.assert_array_equal(train, exp_train)
    np.testing.assert_array_equal(val, exp_val)
    assert not set(train) & set(val)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    if frac_train == frac_val == 1.0:
        assert len(train) + len(val) == n


def test_split_rejects_empty_parts():
    with pytest.raises(ValueError, match="val_frac"):
        datasets.split_train_val(2, 0.1)
    with pytest.raises(ValueError, match="val_frac"):
        datasets.split_train_val(100, 1.0)
    with pytest.raises(ValueError, match="train_frac"):
        datasets.split_train_val(100, 0.2, train_frac=0.0)
