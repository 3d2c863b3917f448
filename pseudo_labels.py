"""Where a method's pseudo-labels come from while it trains: one rule per entry of ``RULES``.

A method that needs pseudo-labels names its rule (``Method.pseudo_label_rule``):

* ``vlpl``: VLPL's rule (DESIGN section 4) on the teacher's embedding of the training image.
  Both flips of every official training image are embedded once and cached; each batch takes the
  pseudo-labels of the flips its sampler drew (``--pseudo-labels online``: computed per batch).
* ``damp``: AEVLP's DAMP (``damp.py``) on the whole image and its g x g tiles, each view flipped
  independently. Every view in both flips is embedded once and cached (float16, as AEVLP's
  teacher computes); each batch picks the flip its sampler drew for each view, and DAMP runs on
  the cosine similarities of those rows. Nothing but the flips varies between AEVLP's per-step
  CLIP passes, so these are the pseudo-labels it would compute, without a CLIP pass per step.

A rule is built by the ``Trainer`` with itself as context (the teacher, the cache, the labels,
the logger); ``text_features`` is called by ``main_clip.setup`` before there is a trainer.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import Tensor

import aevlp_text
import damp
import datasets
import teacher as teacher_module
from distributed import Distributed

if TYPE_CHECKING:
    from engine import Trainer


class PseudoLabelRule:
    """Pseudo-labels of training batches; see the module docstring."""
    online: ClassVar[bool] = False          # runs the teacher on each batch (its loaders carry its view)

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.report: dict | None = None     # how good the pseudo-labels are (summary.json)

    @classmethod
    def check_config(cls, config: dict) -> None:
        """ValueError for settings the rule cannot run with."""

    @classmethod
    def text_features(cls, config: dict, teacher: teacher_module.Teacher, num_classes: int) -> Tensor:
        """K x D class text features the rule compares image embeddings with."""
        raise NotImplementedError

    @property
    def num_view_flips(self) -> int:
        """Flips per training item the sampler draws for the teacher's views (0: none)."""
        return 0

    def teacher_view(self):
        """The teacher's input each training item carries (online rules), else None."""
        return None

    def prepare(self) -> None:
        """Once, before the first epoch: the teacher's work that can be cached."""

    def batch(self, index: Tensor, batch: dict, observed: Tensor) -> Tensor:
        """B x K pseudo-labels of a training batch, on the observed labels' device."""
        raise NotImplementedError

    def restart(self) -> None:
        """A training stage starts."""

    def end_epoch(self, epoch: int) -> None:
        """After the epoch's phases (and ``sync``)."""

    def sync(self, dist: Distributed) -> None:
        """Bring every rank's state changes of the epoch to every rank."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def set_report(self, report: dict, what: str) -> None:
        """Keep ``report`` (``teacher.pseudo_label_report``) and log it after ``what``."""
        self.report = report
        self.trainer.logger.log(f"{what}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))


class VLPLRule(PseudoLabelRule):
    """VLPL's pseudo-labels: softmax over the class text features, threshold, partial negatives
    (``-t``, ``-th``, ``-p``), of the teacher's embedding under ``--teacher-view``."""

    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        config = trainer.config
        self.labeler = teacher_module.PseudoLabeler(trainer.setup.text_features, config["temp"], config["threshold"],
                                                    config["partial"])

    @property
    def online(self) -> bool:
        return self.trainer.config["pseudo_labels"] == "online"

    @classmethod
    def text_features(cls, config, teacher, num_classes):
        return teacher_module.load_text_features(config["text_features"], num_classes, teacher.embed_dim,
                                                 dataset=config["dataset"], teacher=config["teacher"])

    def teacher_view(self):
        return self.trainer.teacher.view(self.trainer.config["teacher_view"]) if self.online else None

    def prepare(self) -> None:
        """The teacher runs once per official train image and flip; the pseudo-labels of both
        flips come from its cached embeddings, and each batch takes those of the flips it drew."""
        run = self.trainer
        if run.teacher_embeddings is None:
            run.teacher_embeddings = run.cache.embeddings("train", run.teacher_encoder())
        embeddings = torch.from_numpy(run.teacher_embeddings[run.benchmark.train_indices]).to(run.device)
        as_is, flipped = (self.labeler.from_embeddings(torch.nn.functional.normalize(embeddings[:, flip], dim=-1))
                          for flip in (0, 1))
        run.labels.set_pseudo(as_is, flipped)
        self.set_report(teacher_module.pseudo_label_report(run.labels.pseudo, run.benchmark.train.labels),
                        "pseudo-labels (cached teacher, vs clean train labels)")

    def batch(self, index, batch, observed):
        run = self.trainer
        if self.online:
            return self.labeler.online(run.teacher, batch["teacher_image"].to(observed.device, non_blocking=True))
        return run.labels.batch_pseudo(index, batch.get("flip")).to(observed.device)


class DampRule(PseudoLabelRule):
    """AEVLP's DAMP pseudo-labels from cached view embeddings (``damp.py``), with the settings of
    the method's DAMP flags (``methods.aevlp``)."""

    def __init__(self, trainer: Trainer):
        super().__init__(trainer)
        self.settings = damp.settings_from_config(trainer.config)
        self.similarities: Tensor | None = None          # N x 2V x K, float32, on the CPU
        # AEVLP's pseudo_label_matrix: each row's latest pseudo-labels, fed back to DAMP as its
        # accumulated input (which only shapes an output AEVLP discards; kept for fidelity and
        # for the per-epoch report).
        self.kept = torch.zeros(trainer.labels.shape, dtype=torch.float32)
        self._pending: list[tuple[Tensor, Tensor]] = []

    @classmethod
    def check_config(cls, config):
        if config["train_mode"] != "end_to_end":
            raise ValueError(f"-l {config['loss']} draws a flip per teacher view in every step: it needs "
                             f"--train-mode end_to_end")
        if config["pseudo_labels"] != "cached":
            raise ValueError(f"-l {config['loss']}: DAMP's views are cached in both flips, which gives the "
                             f"pseudo-labels a per-step pass would (bench/aevlp_cost.py measures that pass); "
                             f"drop --pseudo-labels online")
        num_classes = datasets.get_dataset_info(config["dataset"]).num_classes
        if config["damp_top_k"] > num_classes:
            raise ValueError(f"--damp-top-k {config['damp_top_k']} exceeds the {num_classes} classes")

    @classmethod
    def text_features(cls, config, teacher, num_classes):
        """AEVLP's: the teacher's raw text embeddings of "a photo of a {name}." for its class-name
        lists, perturbed by its frozen graph convolution (``--text-gcn``, seeded by ``-s``),
        L2-normalised."""
        raw = teacher.encode_text(aevlp_text.aevlp_prompts(config["dataset"]), normalize=False)
        return aevlp_text.aevlp_text_features(raw, config["dataset"], config["seed"], perturb=config["text_gcn"])

    @property
    def num_view_flips(self) -> int:
        return damp.num_views(self.settings.grid_size)

    def encoder(self):
        run = self.trainer
        run.teacher.to(run.device)
        return damp.aevlp_encoder(run.teacher, self.settings.grid_size)

    def prepare(self) -> None:
        """Every view of every official train image in both flips, embedded once (cached), and
        their cosine similarities with the class text features."""
        run = self.trainer
        official = run.cache.embeddings("train", self.encoder())     # every official train image
        rows = run.benchmark.train_indices
        text_features = run.setup.text_features.to(run.device)
        # The train split's rows a chunk at a time: no copy of the (float16, GBs) cache is made.
        chunk = max(1, 2 ** 22 // int(np.prod(official.shape[1:])))
        self.similarities = torch.cat([
            damp.cosine_similarities(torch.from_numpy(official[rows[start:start + chunk]]).to(run.device),
                                     text_features).cpu()
            for start in range(0, len(rows), chunk)])
        run.logger.log(f"DAMP: {self.similarities.shape[1] // 2} views x 2 flips of {len(rows)} training images "
                       f"cached; settings {self.settings}")

    def batch(self, index, batch, observed):
        device = observed.device
        views = damp.pick_flips(self.similarities[index], batch["view_flips"]).to(device)
        _, current = damp.damp_pseudo_labels(views, observed, self.kept[index].to(device),
                                             **dataclasses.asdict(self.settings))
        rows = current.float().cpu()
        self.kept[index] = rows
        self._pending.append((index.cpu(), rows))
        return current.float()

    def restart(self) -> None:
        self.kept.zero_()
        self._pending.clear()

    def sync(self, dist: Distributed) -> None:
        if dist.enabled:
            for changes in dist.gather_objects(self._pending):
                for index, rows in changes:
                    self.kept[index] = rows
        self._pending.clear()

    def end_epoch(self, epoch: int) -> None:
        """AEVLP's per-epoch report: its pseudo-labels against the clean labels, unobserved
        entries only (its compute_precision_recall_pl, as fractions)."""
        run = self.trainer
        self.set_report(teacher_module.pseudo_label_report(self.kept, run.benchmark.train.labels,
                                                           run.labels.observed.numpy()),
                        f"DAMP pseudo-labels of epoch {epoch} (unobserved entries, vs clean train labels)")

    def state_dict(self) -> dict:
        return {"kept": self.kept.clone()}

    def load_state_dict(self, state: dict) -> None:
        kept = state["kept"]
        if tuple(kept.shape) != tuple(self.kept.shape):
            raise ValueError(f"checkpoint DAMP pseudo-labels {tuple(kept.shape)} for {tuple(self.kept.shape)} "
                             f"training labels")
        self.kept = kept.to(torch.float32).clone()
        self._pending.clear()


RULES: dict[str, type[PseudoLabelRule]] = {"vlpl": VLPLRule, "damp": DampRule}
