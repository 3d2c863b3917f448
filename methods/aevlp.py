"""AEVLP (Tran et al., ICCV 2025, code Fsoft-AIC/AEVLP): the GPR loss (``losses.gpr_loss`` with its
pseudo-label terms) on DAMP's pseudo-labels (``pseudo_labels/damp.py``, its ``DampRule``)
from a CLIP ViT-B/16 teacher on the whole image and a g x g grid of tiles.

Its protocol and loss settings per dataset are ``methods.gr.AEVLP_CONFIGS`` (its configs/*.json),
its DAMP settings ``damp.DAMP_SETTINGS`` and text relation settings ``aevlp_text.RELATION_SETTINGS``; its teacher is ``--teacher ViT-B-16``.
"""
from __future__ import annotations

from types import SimpleNamespace

import losses
from methods.base import Hyperparameter, joined_table, on_off
from methods.cole import EXPECTED_POSITIVES
from methods.gr import AEVLP_CONFIGS, K_SCHEDULE, Q2, Q3, REG, V_SCHEDULE, GR
from pseudo_labels import aevlp_text, damp


LAM1 = Hyperparameter("lam1", float, "AEVLP: a positive pseudo-label's weight 1 - V' uses V' = min(max(V, 1 - lam1), "
                      "1 - lam2) (default per dataset, AEVLP's)", minimum=0.0, maximum=1.0)
LAM2 = Hyperparameter("lam2", float, "AEVLP: see --lam1 (default per dataset, AEVLP's)", minimum=0.0, maximum=1.0)
RHO = Hyperparameter("rho", float, "AEVLP: a positive pseudo-label's loss is rho * -log(p) + (1 - rho) * -log(1 - p) "
                     "(default per dataset, AEVLP's)", minimum=0.0, maximum=1.0)

# DAMP's settings (damp.DAMP_CONFIG_KEYS), read by pseudo_labels.DampRule.
DAMP_HYPERPARAMETERS = (
    Hyperparameter("grid_size", int, "DAMP: the image is cut into a g x g grid of tiles, each a teacher view besides "
                   "the whole image (AEVLP: 4; CUB 5)", minimum=1),
    Hyperparameter("damp_temp", float, "DAMP: softmax temperature of the views' class similarities (AEVLP: 0.01; "
                   "CUB 0.1)", greater_than=0.0),     # the similarities are divided by it
    Hyperparameter("damp_eta", float, "DAMP: cap eta on the observed positive's whole-image score; a class takes its "
                   "tiles' max score where that max exceeds min(score, eta), else their min (default per dataset, "
                   "AEVLP's)", minimum=0.0),
    Hyperparameter("damp_threshold", float, "DAMP: a top-k class becomes a positive pseudo-label when its score is at "
                   "least this (default per dataset, AEVLP's)", minimum=0.0, maximum=1.0),
    Hyperparameter("damp_top_k", int, "DAMP: at most this many positive pseudo-labels per image (AEVLP: 3; CUB 32)",
                   minimum=1),
    Hyperparameter("negative_ratio", float, "DAMP: the int(ratio x K) classes with the lowest scores lose any "
                   "positive pseudo-label (default per dataset, AEVLP's)", minimum=0.0, maximum=1.0),
    Hyperparameter("text_gcn", on_off, "DAMP: perturb the class text features with AEVLP's frozen random 3-layer "
                   "graph convolution, seeded by -s (on / off; AEVLP ran with it on)", default=True),
)


def _row(config: dict, damp_settings: damp.DampSettings, _relation: aevlp_text.RelationSettings) -> dict:
    """A dataset's row: AEVLP's configuration, its teacher and DAMP's settings (its text relation
    settings are read by the rule itself: joined here so that the import check covers them)."""
    return dict(config, teacher="ViT-B-16", **damp.settings_as_config(damp_settings))


class AEVLP(GR):
    """GR's loss with its pseudo-label terms switched on (AEVLP's use_pl), on DAMP's pseudo-labels."""
    name = "AEVLP"
    description = "AEVLP: GPR loss on DAMP pseudo-labels (CLIP ViT-B/16 on the image and a grid of tiles)"
    hyperparameters = (K_SCHEDULE, V_SCHEDULE, Q2, Q3, REG, EXPECTED_POSITIVES, LAM1, LAM2, RHO) + DAMP_HYPERPARAMETERS
    dataset_defaults = joined_table(_row, AEVLP_CONFIGS, damp.DAMP_SETTINGS, aevlp_text.RELATION_SETTINGS)
    needs_pseudo_labels = True
    pseudo_label_rule = "damp"

    def __init__(self, hp, labels, stage_epochs):
        super().__init__(hp, labels, stage_epochs)
        self.loss_hp = SimpleNamespace(**vars(hp), use_pl=True)

    def loss(self, inputs, epoch):
        return losses.gpr_loss(inputs.logits, inputs.observed, inputs.pseudo, self.loss_hp, epoch=epoch,
                               num_epochs=self.stage_epochs, global_batch=inputs.global_batch)
