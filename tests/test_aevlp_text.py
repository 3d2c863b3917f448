"""AEVLP's text side: the class-name files and prompts, get_relation against a plain per-row
implementation, the seeded GCN weights, and the perturbation against a plain numpy computation."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

import datasets
from pseudo_labels import aevlp_text

DATASET_NAMES = ("pascal", "coco", "nuswide", "cub")


# ----------------------------------------------------------------------------------------------
# Plain implementations
# ----------------------------------------------------------------------------------------------

def plain_get_relation(similarity, sparse_topk, reweight_p, temperature):
    """AEVLP's get_relation written out row by row in float64 (ties: lower column index first)."""
    s = np.asarray(similarity, dtype=np.float64)
    k = s.shape[0]
    gcn = np.zeros((k, k))
    kept_per_row = []
    for i in range(k):
        ranked = sorted(range(k), key=lambda j: (-s[i, j], j))
        kept = set(ranked[:sparse_topk])
        kept_per_row.append(kept)
        neighbours = [j for j in kept if j != i]
        total = sum(s[i, j] for j in neighbours)
        for j in neighbours:
            gcn[i, j] = s[i, j] / total * reweight_p
        gcn[i, i] = 1 - reweight_p
    relation = np.zeros((k, k))
    for i in range(k):
        exps = [math.exp(gcn[i, j] / temperature) for j in range(k)]
        total = sum(exps)
        masked = [exps[j] / total if j in kept_per_row[i] else 0.0 for j in range(k)]
        total = sum(masked)
        relation[i] = [value / total for value in masked]
    return relation, gcn


def plain_perturbation(raw, gcn_relation, weights):
    """raw + gc3(A, lrelu(gc2(A, lrelu(gc1(A, raw))))) in float64, A rounded to float16."""
    a = np.asarray(gcn_relation, dtype=np.float32).astype(np.float16).astype(np.float64)
    w1, w2, w3 = (np.asarray(w, dtype=np.float64) for w in weights)
    x = np.asarray(raw, dtype=np.float64)

    def lrelu(values):
        return np.where(values > 0, values, 0.2 * values)

    hidden = lrelu(a @ (x @ w1))
    hidden = lrelu(a @ (hidden @ w2))
    hidden = a @ (hidden @ w3)
    return x + hidden


def random_symmetric_similarity(k, seed, low=0.43):
    """A symmetric float32 matrix with unit diagonal and off-diagonal values in [low, 1)."""
    rng = np.random.default_rng(seed)
    upper = rng.uniform(low, 0.98, size=(k, k))
    matrix = np.triu(upper, 1)
    matrix = matrix + matrix.T + np.eye(k)
    return matrix.astype(np.float32)


def random_raw_text_features(k, d, seed):
    """Un-normalised rows around a shared direction, norms about 8-12 (CLIP-text-like)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=d)
    rows = shared + 0.7 * rng.normal(size=(k, d))
    rows *= rng.uniform(8, 12, size=(k, 1)) / np.linalg.norm(rows, axis=1, keepdims=True)
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Class names and prompts
# ----------------------------------------------------------------------------------------------

# sha256 of the copies of AEVLP's files at commit 0bad82a1 (classnames/aevlp/README.md).
CLASS_FILE_SHA256 = {
    "pascal": "7d877f185c807bc51b4cfb4f4202fc0b4e1c6724b782ba245fe36f8d254f0ad7",
    "coco": "d7654b26101572841ed1cd80aa03aa60e35f1b8acb4aea6906c4066886f16e07",
    "nuswide": "454b648677332111743cef9d74eacca941c9df4c61bd2d2a273c7d466941d04b",
    "cub": "13cd4436f773d2b628a5a70f1efbe4874b9e1fa056396f41dba486ef0b4ba0dd",
}


@pytest.mark.parametrize("dataset, count", [("pascal", 20), ("coco", 80), ("nuswide", 81), ("cub", 312)])
def test_class_name_counts_match_the_registry(dataset, count):
    names = aevlp_text.aevlp_class_names(dataset)
    assert len(names) == count == datasets.get_dataset_info(dataset).num_classes
    assert all(name and name == name.strip() and "_" not in name for name in names)
    assert len(set(names)) == count


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_class_name_files_are_the_documented_copies(dataset):
    data = (aevlp_text.CLASS_NAMES_DIR / f"{dataset}.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == CLASS_FILE_SHA256[dataset]


def test_class_names_are_aevlps_not_the_registrys():
    voc = aevlp_text.aevlp_class_names("pascal")
    assert voc[0] == "aeroplane" and voc[-1] == "tvmonitor"
    assert {"diningtable", "pottedplant", "tvmonitor"} <= set(voc)
    cub = aevlp_text.aevlp_class_names("cub")
    assert cub[:2] == ["curved bill", "dagger bill"]
    assert "hooked seabird bill" in cub          # 'hooked_seabird bill' in the file
    assert aevlp_text.aevlp_class_names("coco")[0] == "person"


def test_prompts_form():
    prompts = aevlp_text.aevlp_prompts("pascal")
    assert prompts[0] == "a photo of a aeroplane."
    assert prompts[10] == "a photo of a diningtable."
    for dataset in DATASET_NAMES:
        names = aevlp_text.aevlp_class_names(dataset)
        assert aevlp_text.aevlp_prompts(dataset) == [f"a photo of a {name}." for name in names]


def test_wrong_count_names_the_file(tmp_path, monkeypatch):
    wrong = tmp_path / "pascal.txt"
    wrong.write_text("\n".join(f"class_{i}" for i in range(19)) + "\n")
    monkeypatch.setattr(aevlp_text, "CLASS_NAMES_DIR", tmp_path)
    with pytest.raises(ValueError) as error:
        aevlp_text.aevlp_class_names("pascal")
    message = str(error.value)
    assert str(wrong) in message and "19" in message and "20" in message and "\n" not in message
    with pytest.raises(ValueError, match="19 class names"):
        aevlp_text.aevlp_prompts("pascal")


def test_folder_parameter_and_strip(tmp_path):
    (tmp_path / "pascal.txt").write_text("\n" + "\n".join(f"my_class_{i}" for i in range(20)) + "\n\n")
    names = aevlp_text.aevlp_class_names("pascal", folder=tmp_path)
    assert names[0] == "my class 0" and len(names) == 20


def test_unknown_dataset_is_rejected():
    with pytest.raises(ValueError, match="unknown dataset"):
        aevlp_text.aevlp_class_names("imagenet")


# ----------------------------------------------------------------------------------------------
# Relation
# ----------------------------------------------------------------------------------------------

def test_relation_settings_are_aevlps():
    assert set(aevlp_text.RELATION_SETTINGS) == set(datasets.DATASETS)
    table = {name: (s.sparse_topk, s.reweight_p, s.temperature)
             for name, s in aevlp_text.RELATION_SETTINGS.items()}
    assert table == {"pascal": (20, 0.2, 0.3), "coco": (62, 0.2, 0.2),
                     "nuswide": (50, 0.2, 0.2), "cub": (312, 0.2, 0.3)}
    for name, settings in aevlp_text.RELATION_SETTINGS.items():
        assert settings.sparse_topk <= datasets.get_dataset_info(name).num_classes


def test_class_similarity_is_cosine():
    features = random_raw_text_features(7, 16, seed=0)
    similarity = aevlp_text.class_similarity(features)
    rows = features.double().numpy()
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    assert similarity.dtype == torch.float32 and similarity.shape == (7, 7)
    np.testing.assert_allclose(similarity.numpy(), unit @ unit.T, atol=1e-6)
    with pytest.raises(ValueError, match="all-zero row"):
        aevlp_text.class_similarity(torch.zeros(3, 4))


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_relation_matches_plain_get_relation(dataset):
    settings = aevlp_text.RELATION_SETTINGS[dataset]
    k = datasets.get_dataset_info(dataset).num_classes
    similarity = random_symmetric_similarity(k, seed=k)
    relation, gcn_relation = aevlp_text.aevlp_relation(
        torch.from_numpy(similarity), sparse_topk=settings.sparse_topk,
        reweight_p=settings.reweight_p, temperature=settings.temperature)
    expected_relation, expected_gcn = plain_get_relation(
        similarity, settings.sparse_topk, settings.reweight_p, settings.temperature)
    assert relation.dtype == gcn_relation.dtype == torch.float32
    np.testing.assert_allclose(gcn_relation.numpy(), expected_gcn, atol=1e-6)
    np.testing.assert_allclose(relation.numpy(), expected_relation, atol=1e-6)
    np.testing.assert_allclose(gcn_relation.sum(1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(relation.sum(1).numpy(), 1.0, atol=1e-5)
    assert int((gcn_relation > 0).sum(1).max()) == settings.sparse_topk


@pytest.mark.parametrize("sparse_topk", [2, 3, 5])
def test_relation_small_matrix_with_sparse_topk(sparse_topk):
    # A generic similarity (not unit diagonal): the diagonal may fall outside the top-k.
    rng = np.random.default_rng(sparse_topk)
    upper = rng.uniform(0.1, 1.0, size=(7, 7))
    similarity = (np.triu(upper) + np.triu(upper, 1).T).astype(np.float32)
    relation, gcn_relation = aevlp_text.aevlp_relation(
        similarity, sparse_topk=sparse_topk, reweight_p=0.3, temperature=0.25)
    expected_relation, expected_gcn = plain_get_relation(similarity, sparse_topk, 0.3, 0.25)
    np.testing.assert_allclose(gcn_relation.numpy(), expected_gcn, atol=1e-6)
    np.testing.assert_allclose(relation.numpy(), expected_relation, atol=1e-6)
    assert int((relation > 0).sum(1).max()) == sparse_topk
    np.testing.assert_allclose(np.diag(gcn_relation.numpy()), 0.7, atol=1e-7)


def test_relation_ties_keep_the_lower_index():
    similarity = np.array([[1.0, 0.5, 0.5, 0.5],
                           [0.5, 1.0, 0.6, 0.6],
                           [0.5, 0.6, 1.0, 0.6],
                           [0.5, 0.6, 0.6, 1.0]], dtype=np.float32)
    _, gcn_relation = aevlp_text.aevlp_relation(similarity, sparse_topk=3, reweight_p=0.2,
                                                temperature=0.3)
    kept = (gcn_relation > 0).numpy()
    assert kept[0].tolist() == [True, True, True, False]
    assert kept[3].tolist() == [False, True, True, True]
    np.testing.assert_allclose(gcn_relation[0].numpy(), [0.8, 0.1, 0.1, 0.0], atol=1e-7)
    _, expected_gcn = plain_get_relation(similarity, 3, 0.2, 0.3)
    np.testing.assert_allclose(gcn_relation.numpy(), expected_gcn, atol=1e-7)


def test_relation_does_not_modify_its_input():
    similarity = random_symmetric_similarity(10, seed=3)
    as_array, as_tensor = similarity.copy(), torch.from_numpy(similarity.copy())
    aevlp_text.aevlp_relation(as_array, sparse_topk=4, reweight_p=0.2, temperature=0.2)
    aevlp_text.aevlp_relation(as_tensor, sparse_topk=4, reweight_p=0.2, temperature=0.2)
    np.testing.assert_array_equal(as_array, similarity)
    np.testing.assert_array_equal(as_tensor.numpy(), similarity)


def test_relation_rejects_bad_inputs():
    similarity = random_symmetric_similarity(5, seed=1)
    with pytest.raises(ValueError, match="sparse_topk"):
        aevlp_text.aevlp_relation(similarity, sparse_topk=6, reweight_p=0.2, temperature=0.2)
    with pytest.raises(ValueError, match="square"):
        aevlp_text.aevlp_relation(similarity[:4], sparse_topk=2, reweight_p=0.2, temperature=0.2)
    with pytest.raises(ValueError, match="divide by zero"):       # only the diagonal is kept
        aevlp_text.aevlp_relation(similarity, sparse_topk=1, reweight_p=0.2, temperature=0.2)


# ----------------------------------------------------------------------------------------------
# GCN weights and the perturbation
# ----------------------------------------------------------------------------------------------

def test_gcn_weights_shapes_dtype_and_seeding():
    first, again = aevlp_text.TextGCN.seeded(512, 7), aevlp_text.TextGCN.seeded(512, 7)
    other = aevlp_text.TextGCN.seeded(512, 8)
    assert [tuple(w.shape) for w in first.layers] == [(512, 1024), (1024, 1024), (1024, 512)]
    assert all(w.dtype == torch.float16 for w in first.layers)
    assert all(torch.equal(a, b) for a, b in zip(first.layers, again.layers))
    assert not any(torch.equal(a, b) for a, b in zip(first.layers, other.layers))
    small = aevlp_text.TextGCN.seeded(16, 7)
    assert [tuple(w.shape) for w in small.layers] == [(16, 1024), (1024, 1024), (1024, 16)]


def test_gcn_weights_are_fp16_roundings_of_a_uniform_draw():
    weights = aevlp_text.TextGCN.seeded(512, 0)
    for weight in weights.layers:
        bound = 1 / math.sqrt(weight.shape[1])
        values = weight.double()
        assert torch.equal(values.half().double(), values)          # float16-representable
        assert float(values.abs().max()) <= bound * (1 + 2 ** -11)
        assert float(values.abs().max()) > 0.99 * bound            # the whole range is used
        assert abs(float(values.mean())) < 0.01 * bound
        assert float(values.std()) == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_gcn_weights_draw_order_is_gc1_gc2_gc3():
    generator = torch.Generator().manual_seed(5)
    expected = []
    for shape in ((8, 1024), (1024, 1024), (1024, 8)):
        bound = 1 / math.sqrt(shape[1])
        expected.append(torch.empty(shape).uniform_(-bound, bound, generator=generator).half())
    weights = aevlp_text.TextGCN.seeded(8, 5)
    assert all(torch.equal(a, b) for a, b in zip(weights.layers, expected))


def test_gcn_weights_are_pinned():
    """Seed 1200's first values: a change means the same seed now draws other weights (e.g. a
    PyTorch upgrade changed its CPU uniform_), so earlier AEVLP runs are not reproduced."""
    weights = aevlp_text.TextGCN.seeded(512, 1200)
    assert weights.gc1[0, :4].tolist() == [0.0225067138671875, -0.0038433074951171875,
                                           -0.00836181640625, -0.020233154296875]
    assert weights.gc3[5, :3].tolist() == [0.041473388671875, 0.04290771484375, 0.02532958984375]


def test_perturbation_matches_plain_numpy():
    raw = random_raw_text_features(20, 32, seed=1)
    similarity = aevlp_text.class_similarity(raw)
    _, gcn_relation = aevlp_text.aevlp_relation(similarity, sparse_topk=12, reweight_p=0.2,
                                                temperature=0.3)
    weights = aevlp_text.TextGCN.seeded(32, 3)
    raw_before = raw.clone()
    perturbed = aevlp_text.perturb_text_features(raw, gcn_relation, weights)
    expected = plain_perturbation(raw.numpy(), gcn_relation.numpy(),
                                  [w.numpy() for w in weights.layers])
    assert perturbed.dtype == torch.float32 and perturbed.shape == (20, 32)
    np.testing.assert_allclose(perturbed.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(raw, raw_before)
    assert not torch.allclose(perturbed, raw, atol=1e-3)        # the GCN does add something


def test_perturbation_rejects_mismatched_shapes():
    raw = random_raw_text_features(6, 16, seed=2)
    relation = torch.eye(6)
    with pytest.raises(ValueError, match="dimensions"):
        aevlp_text.perturb_text_features(raw, relation, aevlp_text.TextGCN.seeded(8, 0))
    with pytest.raises(ValueError, match="rows"):
        aevlp_text.perturb_text_features(raw, torch.eye(5), aevlp_text.TextGCN.seeded(16, 0))


@pytest.mark.parametrize("dataset", DATASET_NAMES)
def test_aevlp_text_features(dataset):
    settings = aevlp_text.RELATION_SETTINGS[dataset]
    k = datasets.get_dataset_info(dataset).num_classes
    raw = random_raw_text_features(k, 64, seed=k)
    features = aevlp_text.aevlp_text_features(raw, dataset, seed=11)
    assert features.shape == (k, 64) and features.dtype == torch.float32
    np.testing.assert_allclose(features.norm(dim=1).numpy(), 1.0, atol=1e-5)

    _, gcn_relation = aevlp_text.aevlp_relation(
        aevlp_text.class_similarity(raw), sparse_topk=settings.sparse_topk,
        reweight_p=settings.reweight_p, temperature=settings.temperature)
    expected = plain_perturbation(raw.numpy(), gcn_relation.numpy(),
                                  [w.numpy() for w in aevlp_text.TextGCN.seeded(64, 11).layers])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(features.numpy(), expected, atol=1e-5)

    unperturbed = aevlp_text.aevlp_text_features(raw, dataset, seed=11, perturb=False)
    rows = raw.double().numpy()
    np.testing.assert_allclose(unperturbed.numpy(), rows / np.linalg.norm(rows, axis=1, keepdims=True),
                               atol=1e-6)
    assert torch.equal(features, aevlp_text.aevlp_text_features(raw, dataset, seed=11))
    assert not torch.allclose(features, aevlp_text.aevlp_text_features(raw, dataset, seed=12))


def test_aevlp_text_features_rejects_wrong_class_count():
    with pytest.raises(ValueError, match="20 classes"):
        aevlp_text.aevlp_text_features(random_raw_text_features(19, 8, seed=0), "pascal", seed=0)
