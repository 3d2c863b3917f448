"""The pseudo-label rule interface and what a rule may use of its run.

A method that needs pseudo-labels names its rule (``Method.pseudo_label_rule``, a key of
``pseudo_labels.RULES``). The ``Trainer`` builds the rule from a ``RuleContext``: the parts of the
run a rule reads (the teacher, its embedding cache, the label state, the logger), and nothing
else of the run. ``check_config`` and ``text_features`` are classmethods: ``main_clip`` calls them
before there is a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

import datasets
import teacher as teacher_module
from caches import Encoder, OfficialSetCache
from distributed import Distributed
from labels import LabelState


@dataclass(frozen=True)
class RuleContext:
    """What a pseudo-label rule may use of its run."""
    config: dict                                # the resolved configuration (the rule's flags)
    text_features: Tensor                       # K x D, from the rule's ``text_features``
    teacher: teacher_module.Teacher
    encoder: Callable[..., Encoder]             # (flips=True) -> the teacher's encoder for the cache, on ``device``
    cache: OfficialSetCache                     # embeddings of every official train image
    benchmark: datasets.BenchmarkSplits
    labels: LabelState                          # observed, clean and pseudo training labels
    device: torch.device
    log: Callable[[str], None]                  # the run's log (log.txt and the console)


class PseudoLabelRule:
    """Pseudo-labels of training batches, built by the ``Trainer`` from its ``RuleContext``."""
    online: ClassVar[bool] = False          # runs the teacher on each batch (its loaders carry its view)

    def __init__(self, context: RuleContext):
        self.context = context
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
        self.context.log(f"{what}: " + ", ".join(f"{k} {v:.4g}" for k, v in report.items()))
