"""VLPL's pseudo-labels (docs/DESIGN.md §3): the teacher's embedding of the training image,
softmax over the class text features, threshold, partial negatives (``-t``, ``-th``, ``-p``).

Both flips of every official training image are embedded once and cached; each batch takes the
pseudo-labels of the flips its sampler drew (``--pseudo-labels online``: computed per batch).
The rule itself is ``teacher.pseudo_labels_from_embeddings``; ``PseudoLabeler`` holds its settings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import teacher as teacher_module
from pseudo_labels.base import PseudoLabelRule, RuleContext


@dataclass
class PseudoLabeler:
    """The pseudo-label rule with its settings (``-t``, ``-th``, ``-p``) and text features."""
    text_features: torch.Tensor
    temperature: float
    threshold: float
    partial: float

    def from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """q (B x K) for unit-norm image embeddings, on the embeddings' device."""
        q, _ = teacher_module.pseudo_labels_from_embeddings(embeddings, self.text_features.to(embeddings.device),
                                                            self.temperature, self.threshold, self.partial)
        return q

    def online(self, teacher: teacher_module.Teacher, images: torch.Tensor) -> torch.Tensor:
        """q for a batch of teacher-view images: the teacher runs now (``--pseudo-labels online``)."""
        return self.from_embeddings(teacher.embed(images))


class VLPLRule(PseudoLabelRule):
    """VLPL's pseudo-labels: softmax over the class text features, threshold, partial negatives
    (``-t``, ``-th``, ``-p``), of the teacher's embedding under ``--teacher-view``."""

    def __init__(self, context: RuleContext):
        super().__init__(context)
        config = context.config
        self.labeler = PseudoLabeler(context.text_features, config["temp"], config["threshold"], config["partial"])

    @property
    def online(self) -> bool:
        return self.context.config["pseudo_labels"] == "online"

    @classmethod
    def text_features(cls, config, teacher, num_classes):
        return teacher_module.load_text_features(config["text_features"], num_classes, teacher.embed_dim,
                                                 dataset=config["dataset"], teacher=config["teacher"],
                                                 data_root=config["data_root"], tiny=config["tiny_models"])

    def teacher_view(self):
        return self.context.teacher.view(self.context.config["teacher_view"]) if self.online else None

    def prepare(self) -> None:
        """The teacher runs once per official train image and flip; the pseudo-labels of both
        flips come from its cached embeddings, and each batch takes those of the flips it drew.
        The cache keeps the embeddings in memory: a backbone that copies the teacher's tower
        takes them as its frozen features without reading the file again."""
        context = self.context
        official = context.cache.embeddings("train", context.encoder())
        embeddings = torch.from_numpy(official[context.benchmark.train_indices]).to(context.device)
        as_is, flipped = (self.labeler.from_embeddings(torch.nn.functional.normalize(embeddings[:, flip], dim=-1))
                          for flip in (0, 1))
        context.labels.set_pseudo(as_is, flipped)
        self.set_report(teacher_module.pseudo_label_report(context.labels.pseudo, context.benchmark.train.labels),
                        "pseudo-labels (cached teacher, vs clean train labels)")

    def batch(self, index, batch, observed):
        if self.online:
            return self.labeler.online(self.context.teacher,
                                       batch["teacher_image"].to(observed.device, non_blocking=True))
        return self.context.labels.batch_pseudo(index, batch.get("flip")).to(observed.device)
