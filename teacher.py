"""The frozen CLIP teacher and its pseudo-labels (DESIGN section 4).

* ``Teacher`` wraps a frozen open_clip CLIP (weights from ``models.load_clip``); ``encoder()``
  describes its image input for the embedding cache (``caches``).
* ``pseudo_labels_from_embeddings``: softmax over the class text features, threshold, partial
  negatives; ``PseudoLabeler`` applies it to cached embeddings or to a batch (online).
* ``load_text_features`` reads the K x D class text features; ``pseudo_label_report`` scores
  pseudo-labels against the clean labels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

import datasets
import models
from caches import Encoder


class Teacher(nn.Module):
    """A frozen CLIP: eval mode, no gradients, L2-normalised image and text embeddings."""

    def __init__(self, clip_model: CLIP, fingerprint: str):
        super().__init__()
        self.clip_model = clip_model.eval()
        self.clip_model.requires_grad_(False)
        self.fingerprint = fingerprint
        self.input_size = models.clip_image_size(clip_model)
        self.mean = tuple(datasets.CLIP_MEAN)
        self.std = tuple(datasets.CLIP_STD)
        self.embed_dim = int(clip_model.text_projection.shape[1])
        self.context_length = int(clip_model.context_length)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        # Stays in eval mode even when a parent module is switched to training.
        return super().train(False)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x D unit-norm embeddings of images already at ``input_size`` with CLIP normalisation."""
        return F.normalize(self.clip_model.encode_image(images).float(), dim=-1)

    def encoder(self) -> Encoder:
        """Its image tower as the embedding cache sees it: raw image embeddings (normalised
        when pseudo-labels are made), keyed by the weights."""
        def encode(images: torch.Tensor) -> torch.Tensor:
            return self.clip_model.encode_image(images).float()
        key = {"teacher": self.fingerprint, "output": "image embedding before L2 normalisation"}
        return Encoder(encode, key, "teacher", self.input_size, self.mean, self.std)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """K x D unit-norm text embeddings (open_clip's tokenizer for ViT-L-14-336-quickgelu,
        which ships with the package and works offline)."""
        tokenizer = open_clip.get_tokenizer(models.CLIP_MODEL_NAME, context_length=self.context_length)
        device = self.clip_model.text_projection.device
        parts = [self.clip_model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device))
                 for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(parts).float(), dim=-1)


def build_teacher(clip_weights: str | os.PathLike | None = None, *, tiny: bool = False,
                  clip_model: CLIP | None = None, pretrained: bool = True) -> Teacher:
    """The frozen teacher around ``clip_model`` (``load_clip(clip_weights, tiny=tiny,
    pretrained=pretrained)`` if None); its fingerprint hashes the weights
    (``weights_fingerprint``), random ones included."""
    if clip_model is None:
        clip_model = models.load_clip(clip_weights, tiny=tiny, pretrained=pretrained)
    return Teacher(clip_model, models.weights_fingerprint(clip_model))


# ----------------------------------------------------------------------------------------------
# Pseudo-labels and text features
# ----------------------------------------------------------------------------------------------

def pseudo_labels_from_embeddings(embeddings: torch.Tensor | np.ndarray,
                                  text_features: torch.Tensor | np.ndarray, temperature: float,
                                  threshold: float, partial: float
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN section 4: s = softmax(e T^T / temperature) over classes; q = +1 where
    s > threshold; then, if partial > 0, the int(partial * K) classes with the smallest s of
    each row get q = -1 (applied last, so it wins in the corner case threshold < 1/K).
    Ties among the smallest s go to the lower class index (stable sort).
    Returns (q, s): float B x K on the embeddings' device."""
    e = torch.as_tensor(embeddings).float()
    t = torch.as_tensor(text_features).float().to(e.device)
    if e.ndim != 2 or t.ndim != 2 or e.shape[1] != t.shape[1]:
        raise ValueError(f"embeddings {tuple(e.shape)} and text features {tuple(t.shape)} must be "
                         f"B x D and K x D with the same D")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 <= partial <= 1:
        raise ValueError(f"partial must be in [0, 1], got {partial}")
    similarity = torch.softmax(e @ t.T / temperature, dim=1)
    q = (similarity > threshold).float()
    num_negative = int(partial * t.shape[0])
    if num_negative > 0:
        order = torch.sort(similarity, dim=1, stable=True).indices[:, :num_negative]
        q.scatter_(1, order, -1.0)
    return q, similarity


def _text_features_command(dataset: str | None) -> str:
    return f"python preproc/make_text_features.py --dataset {dataset or 'NAME'}"


def load_text_features(path: str | os.PathLike, num_classes: int, embed_dim: int, *,
                       dataset: str | None = None) -> torch.Tensor:
    """A K x D float32 ``.npy`` (rows used as stored). Errors name the file, the expected
    K x D and the command that makes a matching file."""
    path = Path(path)
    expected = f"{num_classes} x {embed_dim} (classes x teacher embedding width)"
    if not path.is_file():
        raise FileNotFoundError(f"text features {path} not found; expected a {expected} .npy: "
                                f"make it with `{_text_features_command(dataset)}`")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"text features {path}: not a readable .npy ({error}); remake it with "
                         f"`{_text_features_command(dataset)}`") from error
    if array.ndim != 2 or array.shape != (num_classes, embed_dim):
        raise ValueError(f"text features {path} have shape {array.shape}, expected {expected}; "
                         f"make matching ones with `{_text_features_command(dataset)}` (with the "
                         f"teacher's --clip-weights)")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError(f"text features {path}: need finite floats; remake them with "
                         f"`{_text_features_command(dataset)}`")
    return torch.from_numpy(array.astype(np.float32))


def pseudo_label_report(q: torch.Tensor | np.ndarray, clean_labels: np.ndarray,
                        observed: np.ndarray | None = None) -> dict:
    """How good the pseudo-labels are against the clean labels (entries == 1 are positive):
    precision and recall of the +1 pseudo-labels, positives and negatives per image, and, when
    there are -1 pseudo-labels, ``negative_precision`` (share of them truly absent). With
    ``observed``, only the unobserved entries (o == 0, where the loss reads q) count.
    All values are numbers (a ratio with an empty denominator is 0.0, as scikit-learn's
    zero_division=0), so the dict formats and serialises as it is."""
    q = q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    clean = np.asarray(clean_labels) == 1
    if q.shape != clean.shape:
        raise ValueError(f"pseudo-labels {q.shape} and clean labels {clean.shape} differ in shape")
    counted = np.ones_like(clean) if observed is None else (np.asarray(observed) == 0)
    positive = (q == 1) & counted
    negative = (q == -1) & counted
    num_positive, num_negative = int(positive.sum()), int(negative.sum())
    true_positive = int((positive & clean).sum())
    num_images = int(q.shape[0])

    def ratio(numerator: int, denominator: int) -> float:
        return float(numerator / denominator) if denominator else 0.0

    report = {
        "precision": ratio(true_positive, num_positive),
        "recall": ratio(true_positive, int((clean & counted).sum())),
        "positives_per_image": ratio(num_positive, num_images),
        "negatives_per_image": ratio(num_negative, num_images),
        "num_images": num_images,
    }
    if num_negative:
        report["negative_precision"] = ratio(int((negative & ~clean).sum()), num_negative)
    return report



@dataclass
class PseudoLabeler:
    """The pseudo-label rule with its settings (``-t``, ``-th``, ``-p``) and text features."""
    text_features: torch.Tensor
    temperature: float
    threshold: float
    partial: float

    def from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """q (B x K) for unit-norm image embeddings, on the embeddings' device."""
        q, _ = pseudo_labels_from_embeddings(embeddings, self.text_features.to(embeddings.device),
                                             self.temperature, self.threshold, self.partial)
        return q

    def online(self, teacher: Teacher, images: torch.Tensor) -> torch.Tensor:
        """q for a batch of teacher-view images: the teacher runs now (``--pseudo-labels online``)."""
        return self.from_embeddings(teacher.embed(images))
