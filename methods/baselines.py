"""Loss-only baselines: the clean-label oracle ``bce``, assume-negative ``an`` and the ``iun``
oracle (docs/DESIGN.md §3)."""
from __future__ import annotations

import losses
from methods.base import CoefficientMethod


class BCE(CoefficientMethod):
    name = "bce"
    description = "oracle: BCE on the clean training labels"
    needs_clean_labels = True

    def label_coefficients(self, observed, pseudo, clean, epoch):
        return losses.bce_coefficients(clean)


class AssumeNegative(CoefficientMethod):
    name = "an"
    description = "assume negative: every unobserved label is a negative"

    def label_coefficients(self, observed, pseudo, clean, epoch):
        return losses.an_coefficients(observed)


class IgnoreUnobservedNegatives(CoefficientMethod):
    name = "iun"
    description = "oracle: the observed positive plus the true negatives"
    needs_clean_labels = True

    def label_coefficients(self, observed, pseudo, clean, epoch):
        return losses.iun_coefficients(observed, clean)
