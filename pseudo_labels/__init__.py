"""The pseudo-label registry: every rule a method can name (``Method.pseudo_label_rule``).

* ``vlpl``: VLPL's rule on the teacher's embedding of the training image (``pseudo_labels.vlpl``).
* ``damp``: AEVLP's DAMP on the whole image and its g x g tiles (``pseudo_labels.damp``), with
  AEVLP's text features (``pseudo_labels.aevlp_text``).

Adding a rule: one module with a ``pseudo_labels.base.PseudoLabelRule`` subclass (plus its tests),
and its class in ``RULES`` below. The ``Trainer`` builds it from a ``RuleContext``.
"""
from __future__ import annotations

from pseudo_labels.base import PseudoLabelRule, RuleContext
from pseudo_labels.damp import DampRule
from pseudo_labels.vlpl import VLPLRule

RULES: dict[str, type[PseudoLabelRule]] = {"vlpl": VLPLRule, "damp": DampRule}

__all__ = ["RULES", "PseudoLabelRule", "RuleContext", "VLPLRule", "DampRule"]
