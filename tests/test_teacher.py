"""The frozen CLIP teacher, pseudo-labels (docs/DESIGN.md §3), text features and the report."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import models
import teacher as teacher_module


@pytest.fixture
def teacher(tiny_teacher) -> teacher_module.Teacher:
    return tiny_teacher


# ---------------------------------------------------------------------------------------------
# Teacher
# ---------------------------------------------------------------------------------------------

def test_teacher_is_frozen(teacher):
    assert not teacher.training and not teacher.clip_model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    parent = torch.nn.ModuleDict({"teacher": teacher})
    parent.train()  # e.g. main switching its modules to training mode
    assert not teacher.training and not teacher.clip_model.training
    x = torch.randn(2, 3, teacher.input_size, teacher.input_size, requires_grad=True)
    assert not teacher.embed(x).requires_grad


def test_teacher_attributes(teacher):
    assert teacher.input_size == models.TINY_INPUT_SIZE
    assert teacher.embed_dim == models.TINY_CLIP_CONFIG["embed_dim"]
    assert isinstance(teacher.fingerprint, str) and len(teacher.fingerprint) == 64


def test_embeddings_are_unit_norm(teacher):
    x = torch.randn(4, 3, teacher.input_size, teacher.input_size)
    e = teacher.embed(x)
    assert e.shape == (4, teacher.embed_dim) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4))


def test_text_features_are_unit_norm_and_deterministic(teacher):
    texts = ["aeroplane", "a photo of a dog.", "has bill shape: curved (up or down)"]
    t = teacher.encode_text(texts)
    assert t.shape == (3, teacher.embed_dim)
    torch.testing.assert_close(t.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(teacher.encode_text(texts), t, rtol=0, atol=0)
    assert not torch.allclose(t[0], t[1])
    # Batching does not change the result.
    torch.testing.assert_close(teacher.encode_text(texts, batch_size=2), t, rtol=1e-6, atol=1e-6)


def test_tiny_teacher_is_the_same_in_every_build(teacher):
    again = teacher_module.build_teacher(tiny=True)
    assert again.fingerprint == teacher.fingerprint
    state = torch.get_rng_state()
    teacher_module.build_teacher(tiny=True)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched


def test_fingerprint_follows_the_weights():
    clip = models.load_clip(tiny=True)
    before = teacher_module.build_teacher(clip_model=clip).fingerprint
    with torch.no_grad():
        clip.visual.proj[0, 0] += 1e-3
    assert teacher_module.build_teacher(clip_model=clip).fingerprint != before


def test_clip_vision_copy_trains_while_teacher_stays_frozen(teacher):
    model = models.build_model("clip_vision", 4, clip_model=teacher.clip_model, tiny=True)
    assert model.training and all(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, teacher.input_size, teacher.input_size)
    reference = teacher.embed(x)
    loss = model(x).sum()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher.embed(x), reference, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Pseudo-labels
# ---------------------------------------------------------------------------------------------

# Four classes; the image is closest to class 0, then class 3; classes 1 and 2 tie.
TEXT = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.0, 0.8]])
IMAGE = torch.tensor([[1.0, 0.0, 0.0]])           # dot products: 1, 0, 0, 0.6


def reference_pseudo_labels(e, t, temperature, threshold, partial):
    """Straightforward per-row version of docs/DESIGN.md §3."""
    e, t = np.asarray(e, dtype=np.float64), np.asarray(t, dtype=np.float64)
    logits = e @ t.T / temperature
    s = np.exp(logits - logits.max(axis=1, keepdims=True))
    s /= s.sum(axis=1, keepdims=True)
    q = np.zeros_like(s)
    num_negative = int(partial * t.shape[0])
    for row in range(s.shape[0]):
        q[row, s[row] > threshold] = 1
        if num_negative:
            q[row, np.argsort(s[row], kind="stable")[:num_negative]] = -1
    return q, s


def test_default_temperature_and_threshold():
    q, s = teacher_module.pseudo_labels_from_embeddings(IMAGE, TEXT, 0.01, 0.3, 0.0)
    assert q.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert s.shape == (1, 4)
    torch.testing.assert_close(s.sum(dim=1), torch.ones(1))
    assert s[0, 0] > 0.999


def test_temperature_effect():
    # At temperature 1 the softmax is flat enough for class 3 to pass a 0.2 threshold.
    q_warm, s_warm = teacher_module.pseudo_labels_from_embeddings(IMAGE, TEXT, 1.0, 0.2, 0.0)
    q_cold, s_cold = teacher_module.pseudo_labels_from_embeddings(IMAGE, TEXT, 0.01, 0.2, 0.0)
    assert q_warm.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert q_cold.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    expected = torch.softmax(torch.tensor([1.0, 0.0, 0.0, 0.6]), dim=0)
    torch.testing.assert_close(s_warm[0], expected)
    assert s_cold[0, 3] < s_warm[0, 3]


def test_threshold_point_three_gives_at_most_three_positives():
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.01, 0.05, 0.2, 1.0, 10.0):
        e = torch.nn.functional.normalize(torch.randn(200, 16, generator=generator), dim=1)
        t = torch.nn.functional.normalize(torch.randn(30, 16, generator=generator), dim=1)
        q, s = teacher_module.pseudo_labels_from_embeddings(e, t, temperature, 0.3, 0.0)
        assert int((q == 1).sum(dim=1).max()) <= 3   # softmax rows sum to 1
        assert set(q.unique().tolist()) <= {0.0, 1.0}
    # Three near-equal classes and a far one: all three pass 0.3.
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    q, _ = teacher_module.pseudo_labels_from_embeddings(torch.tensor([[1.0, 0.0]]), text, 0.1, 0.3, 0.0)
    assert q.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_threshold_is_strict():
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])    # s = 0.5, 0.5 exactly
    q, s = teacher_module.pseudo_labels_from_embeddings(torch.tensor([[1.0, 0.0]]), text, 1.0, 0.5, 0.0)
    assert s.tolist() == [[0.5, 0.5]] and q.tolist() == [[0.0, 0.0]]


def test_partial_negatives_and_ties():
    # int(0.25 * 4) = 1 negative: classes 1 and 2 tie for the smallest s; the lower index wins.
    q, _ = teacher_module.pseudo_labels_from_embeddings(IMAGE, TEXT, 0.01, 0.3, 0.25)
    assert q.tolist() == [[1.0, -1.0, 0.0, 0.0]]
    # int(0.5 * 4) = 2: both tied classes.
    q, _ = teacher_module.pseudo_labels_from_embeddings(IMAGE, TEXT, 0.01, 0.3, 0.5)
    assert q.tolist() == [[1.0, -1.0, -1.0, 0.0]]
    # int(0.3 * 4) = 1 (floor), int(0.2 * 4) = 0 (no negative).
    q, _ = teacher_module.pseudo_labels_from_embeddings(IMAGE, TEXT, 0.01, 0.3, 0.3)
    assert (q == -1).sum() == 1
    q, _ = teacher_module.pseudo_labels_from_embeddings(IMAGE, TEXT, 0.01, 0.3, 0.2)
    assert (q == -1).sum() == 0
    # An all-tied row: the first classes get -1, every time.
    flat = torch.zeros(1, 3)
    q, _ = teacher_module.pseudo_labels_from_embeddings(flat, TEXT, 0.01, 0.9, 0.5)
    assert q.tolist() == [[-1.0, -1.0, 0.0, 0.0]]


def test_negatives_are_applied_after_positives():
    # threshold -1: every class is positive; partial 0.5 still marks the two smallest -1.
    q, _ = teacher_module.pseudo_labels_from_embeddings(IMAGE, TEXT, 0.01, -1.0, 0.5)
    assert q.tolist() == [[1.0, -1.0, -1.0, 1.0]]


def test_matches_reference_on_random_data():
    generator = torch.Generator().manual_seed(1)
    e = torch.nn.functional.normalize(torch.randn(64, 8, generator=generator), dim=1)
    t = torch.randn(12, 8, generator=generator)  # rows as stored: not normalised here
    for temperature, threshold, partial in ((0.01, 0.3, 0.0), (0.5, 0.1, 0.25), (2.0, 0.05, 0.5)):
        q, s = teacher_module.pseudo_labels_from_embeddings(e, t, temperature, threshold, partial)
        q_ref, s_ref = reference_pseudo_labels(e, t, temperature, threshold, partial)
        np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(q.numpy(), q_ref)


def test_numpy_inputs_and_errors():
    q, s = teacher_module.pseudo_labels_from_embeddings(IMAGE.numpy(), TEXT.numpy(), 0.01, 0.3, 0.0)
    assert isinstance(q, torch.Tensor) and q.dtype == torch.float32
    with pytest.raises(ValueError, match="same D"):
        teacher_module.pseudo_labels_from_embeddings(torch.zeros(2, 5), TEXT, 0.01, 0.3, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        teacher_module.pseudo_labels_from_embeddings(IMAGE, TEXT, 0.0, 0.3, 0.0)
    with pytest.raises(ValueError, match="partial"):
        teacher_module.pseudo_labels_from_embeddings(IMAGE, TEXT, 0.01, 0.3, 1.5)


def test_pseudo_labels_from_teacher_embeddings(teacher):
    names = ["dog", "cat", "boat", "bird", "train"]
    t = teacher.encode_text(names)
    e = teacher.embed(torch.randn(6, 3, teacher.input_size, teacher.input_size))
    q, s = teacher_module.pseudo_labels_from_embeddings(e, t, 0.01, 0.3, 0.2)
    assert q.shape == s.shape == (6, 5)
    assert ((q == -1).sum(dim=1) == 1).all()


# ---------------------------------------------------------------------------------------------
# Text-feature files and the report
# ---------------------------------------------------------------------------------------------

def test_load_text_features(tmp_path):
    path = tmp_path / "VOC20text_feature_labelonly.npy"
    np.save(path, np.random.default_rng(0).normal(size=(20, 768)).astype(np.float32))
    features = teacher_module.load_text_features(path, 20, 768)
    assert features.shape == (20, 768) and features.dtype == torch.float32
    np.save(tmp_path / "f64.npy", np.ones((20, 768)))
    assert teacher_module.load_text_features(tmp_path / "f64.npy", 20, 768).dtype == torch.float32


@pytest.mark.parametrize("array", [np.zeros((80, 768), np.float32), np.zeros((20, 512), np.float32),
                                   np.zeros((20,), np.float32), np.zeros((2, 20, 768), np.float32)])
def test_text_features_of_the_wrong_shape(tmp_path, array):
    path = tmp_path / "features.npy"
    np.save(path, array)
    with pytest.raises(ValueError) as error:
        teacher_module.load_text_features(path, 20, 768, dataset="pascal")
    message = str(error.value)
    assert str(path) in message and "20 x 768" in message
    assert "python preproc/make_text_features.py --dataset pascal" in message


def test_text_features_missing_or_bad(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_text_features.py --dataset NAME"):
        teacher_module.load_text_features(tmp_path / "none.npy", 20, 768)
    path = tmp_path / "nan.npy"
    np.save(path, np.full((2, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="finite"):
        teacher_module.load_text_features(path, 2, 3)
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.npy"):
        teacher_module.load_text_features(tmp_path / "junk.npy", 2, 3)


def test_pseudo_label_report():
    clean = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    q = np.array([[1, 0, -1, 1], [1, 1, 0, -1], [0, 0, 0, 0]], dtype=float)
    report = teacher_module.pseudo_label_report(torch.from_numpy(q), clean)
    # positives: (0,0) tp, (0,3) fp, (1,0) fp, (1,1) tp -> precision 2/4; 4 clean positives.
    assert report["precision"] == pytest.approx(0.5)
    assert report["recall"] == pytest.approx(0.5)
    assert report["positives_per_image"] == pytest.approx(4 / 3)
    assert report["negatives_per_image"] == pytest.approx(2 / 3)
    assert report["negative_precision"] == pytest.approx(0.5)   # (0,2) is a true positive
    assert report["num_images"] == 3
    observed = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    unobserved = teacher_module.pseudo_label_report(q, clean, observed=observed)
    assert unobserved["precision"] == pytest.approx(1 / 3)      # (0,3) fp, (1,0) fp, (1,1) tp
    assert unobserved["recall"] == pytest.approx(1 / 2)         # clean unobserved: (0,2), (1,1)
    empty = teacher_module.pseudo_label_report(np.zeros((2, 3)), np.zeros((2, 3)))
    assert empty["precision"] == 0.0 and empty["recall"] == 0.0
    assert "negative_precision" not in empty   # no -1 pseudo-labels (partial 0)
    assert all(isinstance(v, (int, float)) for v in empty.values())
    with pytest.raises(ValueError, match="shape"):
        teacher_module.pseudo_label_report(np.zeros((2, 3)), np.zeros((3, 3)))
