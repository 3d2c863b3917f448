"""AEVLP's class text features (Tran et al., ICCV 2025; code ``Fsoft-AIC/AEVLP``): its prompts,
its label-relation matrix and the frozen graph convolution that perturbs the text features its
pseudo-label generator compares CLIP image embeddings with (``models.py``:
``PseudoLabelGeneratorOpenAI.generate``).

* ``aevlp_class_names`` / ``aevlp_prompts``: their class-name files and prompt template.
* ``RELATION_SETTINGS``: their per-dataset relation settings (``config.py`` ``_LOOKUP``).
* ``class_similarity`` and ``aevlp_relation``: their ``get_relation``, on a similarity matrix made
  from the teacher's text features instead of their shipped ``relation+<ds>.npy`` file.
* ``TextGCN`` and ``perturb_text_features``: their three ``GraphConvolution`` layers, randomly
  initialised and never trained. AEVLP draws them from the unseeded global RNG; here they are
  drawn from a ``torch.Generator`` seeded by the run's seed.
* ``aevlp_text_features``: all of it in one call: the unit rows DAMP's similarities are taken
  against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import datasets
from teacher import cosine_similarities

# Byte-for-byte copies of AEVLP's data/classnames/*_labels.txt (see the README there), at the
# repository root.
CLASS_NAMES_DIR = Path(__file__).resolve().parents[1] / "classnames" / "aevlp"

# PromptLearner: prompt_prefix (ctx_init, default "a photo of a") + " " + name + "."
PROMPT_PREFIX = "a photo of a"

# Their GCN: gc1 D -> 1024, gc2 1024 -> 1024, gc3 1024 -> D, LeakyReLU(0.2) after gc1 and gc2.
GCN_HIDDEN_WIDTH = 1024
GCN_LEAKY_RELU_SLOPE = 0.2


# ----------------------------------------------------------------------------------------------
# Class names and prompts
# ----------------------------------------------------------------------------------------------

def class_names_file(dataset: str, folder: str | Path | None = None) -> Path:
    """The class-name file of ``dataset`` (a registry key) in ``folder`` (CLASS_NAMES_DIR)."""
    datasets.get_dataset_info(dataset)          # unknown dataset: ValueError listing the known
    return Path(CLASS_NAMES_DIR if folder is None else folder) / f"{dataset}.txt"


def aevlp_class_names(dataset: str, folder: str | Path | None = None) -> list[str]:
    """AEVLP's class names of ``dataset`` in class-index order, read as its PromptLearner reads
    them (``f.read().strip().split("\\n")``, then ``"_"`` -> ``" "``). ValueError naming the file
    when their count is not the registry's."""
    path = class_names_file(dataset, folder)
    with open(path, "r") as file:
        names = file.read().strip().split("\n")
    expected = datasets.get_dataset_info(dataset).num_classes
    if len(names) != expected:
        raise ValueError(f"{path}: {len(names)} class names, dataset {dataset!r} has {expected} classes")
    return [name.replace("_", " ") for name in names]


def aevlp_prompts(dataset: str, folder: str | Path | None = None) -> list[str]:
    """AEVLP's prompts: ``"a photo of a <name>."`` for each class. Their learnable context is
    initialised from these words and frozen, so it encodes exactly this text."""
    return [f"{PROMPT_PREFIX} {name}." for name in aevlp_class_names(dataset, folder)]


# ----------------------------------------------------------------------------------------------
# Label relation
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RelationSettings:
    """AEVLP's label-relation settings for one dataset (their names in comments)."""
    sparse_topk: int        # sparse_topk: entries kept per row (the row's own entry included)
    reweight_p: float       # reweight_p: total weight of the neighbours; the diagonal gets 1 - p
    temperature: float      # T: softmax temperature of the (unused by the generator) relation


# AEVLP config.py _LOOKUP['sparse_topk'], ['reweight_p'], ['T'] (set after configs/*.json is
# read, whose values agree).
RELATION_SETTINGS: dict[str, RelationSettings] = {
    "pascal": RelationSettings(sparse_topk=20, reweight_p=0.2, temperature=0.3),
    "coco": RelationSettings(sparse_topk=62, reweight_p=0.2, temperature=0.2),
    "nuswide": RelationSettings(sparse_topk=50, reweight_p=0.2, temperature=0.2),
    "cub": RelationSettings(sparse_topk=312, reweight_p=0.2, temperature=0.3),
}


def _as_float32_matrix(values: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    """A float32 copy of a 2-D tensor or array (the input is never modified)."""
    matrix = torch.as_tensor(values).detach().to(torch.float32).clone()
    if matrix.dim() != 2:
        raise ValueError(f"{what} must be 2-D, got shape {tuple(matrix.shape)}")
    return matrix


def class_similarity(text_features: torch.Tensor | np.ndarray) -> torch.Tensor:
    """K x K cosine similarities (float32) of the K rows of ``text_features``.

    AEVLP loads its relation from ``data/relation/relation+<ds>.npy``, which are symmetric with a
    unit diagonal and values 0.43-1, i.e. they look like cosine similarities of class-name text
    embeddings; we make them from the teacher's text features."""
    features = _as_float32_matrix(text_features, "text_features")
    if bool((features.norm(dim=1) == 0).any()):
        raise ValueError("text_features has an all-zero row: its cosine similarity is undefined")
    return cosine_similarities(features, features)


def aevlp_relation(similarity: torch.Tensor | np.ndarray, *, sparse_topk: int, reweight_p: float,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AEVLP's ``get_relation`` on a K x K similarity matrix: ``(relation, gcn_relation)``, float32.

    gcn_relation: each row keeps its ``sparse_topk`` largest entries (others 0), the diagonal is
    set to 0, the row is divided by its sum and scaled by ``reweight_p``, then the diagonal is
    ``1 - reweight_p``. relation: row softmax of gcn_relation / temperature, the entries outside
    the top-k set to 0 again, rows renormalised. Only gcn_relation feeds their generator.

    Ties in the top-k: the lower column index wins (a stable descending sort; torch.topk leaves
    ties unspecified). The input is not modified. ValueError when a row's kept off-diagonal
    entries sum to 0 (AEVLP would divide by zero)."""
    matrix = _as_float32_matrix(similarity, "similarity")
    num_classes = matrix.shape[0]
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"similarity must be square, got shape {tuple(matrix.shape)}")
    if not 1 <= sparse_topk <= num_classes:
        raise ValueError(f"sparse_topk must be in [1, {num_classes}], got {sparse_topk}")

    order = torch.argsort(matrix, dim=1, descending=True, stable=True)
    in_topk = torch.zeros_like(matrix, dtype=torch.bool)
    in_topk.scatter_(1, order[:, :sparse_topk], True)
    diagonal = torch.eye(num_classes, dtype=torch.bool, device=matrix.device)

    neighbours = torch.where(in_topk & ~diagonal, matrix, torch.zeros_like(matrix))
    row_sums = neighbours.sum(dim=1, keepdim=True)
    if bool((row_sums == 0).any()):
        rows = torch.nonzero(row_sums[:, 0] == 0)[:, 0].tolist()
        raise ValueError(f"rows {rows[:5]} keep no non-zero off-diagonal similarity "
                         f"(sparse_topk={sparse_topk}): their weights would divide by zero")
    gcn_relation = neighbours / row_sums * reweight_p
    gcn_relation[diagonal] = 1 - reweight_p

    exponentials = torch.exp(gcn_relation / temperature)
    relation = exponentials / exponentials.sum(dim=1, keepdim=True)
    relation[~in_topk] = 0
    relation = relation / relation.sum(dim=1, keepdim=True)
    return relation, gcn_relation


# ----------------------------------------------------------------------------------------------
# The frozen graph convolution
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextGCN:
    """The weights (float16, shape in x out, no bias) of AEVLP's three GraphConvolution layers:
    gc1 D -> 1024, gc2 1024 -> 1024, gc3 1024 -> D."""
    gc1: torch.Tensor
    gc2: torch.Tensor
    gc3: torch.Tensor

    @property
    def layers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.gc1, self.gc2, self.gc3)

    @classmethod
    def seeded(cls, embed_dim: int, seed: int) -> TextGCN:
        """The three layers drawn as ``GraphConvolution.reset_parameters`` draws them, from one CPU
        ``torch.Generator`` seeded with ``seed``, in the order gc1, gc2, gc3: each weight
        uniform(-1/sqrt(out), 1/sqrt(out)) drawn in float32 (row-major), rounded to float16
        (their weights are float16 tensors)."""
        if int(embed_dim) != embed_dim or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive integer, got {embed_dim!r}")
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
        shapes = ((embed_dim, GCN_HIDDEN_WIDTH), (GCN_HIDDEN_WIDTH, GCN_HIDDEN_WIDTH),
                  (GCN_HIDDEN_WIDTH, embed_dim))
        weights = []
        for fan_in, fan_out in shapes:
            bound = 1.0 / math.sqrt(fan_out)
            weight = torch.empty(fan_in, fan_out, dtype=torch.float32)
            weight.uniform_(-bound, bound, generator=generator)
            weights.append(weight.to(torch.float16))
        return cls(*weights)


def perturb_text_features(raw_text_features: torch.Tensor | np.ndarray, gcn_relation: torch.Tensor,
                          weights: TextGCN) -> torch.Tensor:
    """K x D float32: raw + gc3(A, lrelu(gc2(A, lrelu(gc1(A, raw))))) with gc(A, X) = A @ (X @ W),
    LeakyReLU slope 0.2 and A = gcn_relation rounded to float16 (their ``adj.to(torch.float16)``):
    their ``gcn_forward`` plus the identity, not normalised (the caller normalises, as they do).

    ``raw_text_features`` are the text encoder's un-normalised outputs, used as given. AEVLP ran
    this in float16 on its GPU; ours is the float32 computation of the same float16 weights and
    relation, so values differ from theirs by float16 rounding of the intermediates."""
    raw = _as_float32_matrix(raw_text_features, "raw_text_features")
    num_classes, embed_dim = raw.shape
    if tuple(gcn_relation.shape) != (num_classes, num_classes):
        raise ValueError(f"gcn_relation has shape {tuple(gcn_relation.shape)}, the text features "
                         f"have {num_classes} rows")
    if weights.gc1.shape[0] != embed_dim or weights.gc3.shape[1] != embed_dim:
        raise ValueError(f"the GCN maps {weights.gc1.shape[0]} -> {weights.gc3.shape[1]} dimensions, "
                         f"the text features have {embed_dim}")
    adjacency = gcn_relation.detach().to(raw.device, torch.float16).to(torch.float32)
    hidden = raw
    for index, weight in enumerate(weights.layers):
        hidden = adjacency @ (hidden @ weight.to(raw.device, torch.float32))
        if index < 2:
            hidden = F.leaky_relu(hidden, negative_slope=GCN_LEAKY_RELU_SLOPE)
    return raw + hidden


def aevlp_text_features(raw_text_features: torch.Tensor | np.ndarray, dataset: str, seed: int, *,
                        perturb: bool = True) -> torch.Tensor:
    """K x D float32 unit rows: AEVLP's generator's text features for ``dataset``.

    The relation is ``aevlp_relation`` of ``class_similarity(raw_text_features)`` with
    ``RELATION_SETTINGS[dataset]``; the GCN is ``TextGCN.seeded(D, seed)``; the perturbation is
    added to the raw features and the rows L2-normalised. ``perturb=False``: the normalised raw
    features (no GCN)."""
    raw = _as_float32_matrix(raw_text_features, "raw_text_features")
    expected = datasets.get_dataset_info(dataset).num_classes
    if raw.shape[0] != expected:
        raise ValueError(f"raw_text_features has {raw.shape[0]} rows, dataset {dataset!r} has "
                         f"{expected} classes")
    if bool((raw.norm(dim=1) == 0).any()):
        raise ValueError("raw_text_features has an all-zero row: it has no direction")
    if not perturb:
        return F.normalize(raw, dim=1)
    settings = RELATION_SETTINGS[dataset]
    _, gcn_relation = aevlp_relation(class_similarity(raw), sparse_topk=settings.sparse_topk,
                                     reweight_p=settings.reweight_p,
                                     temperature=settings.temperature)
    perturbed = perturb_text_features(raw, gcn_relation, TextGCN.seeded(raw.shape[1], seed))
    return F.normalize(perturbed, dim=1)
