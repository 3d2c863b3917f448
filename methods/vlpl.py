"""VLPL (Xing et al. 2024): EM plus the CLIP teacher's pseudo-labels (EM_PL), and its asymmetric
focal variant (EM_PL_ASL). docs/DESIGN.md §3."""
from __future__ import annotations

import losses
from methods.base import CoefficientMethod, Hyperparameter, Method
from methods.entropy import ALPHA, WARMUP_EPOCH


class EMPL(CoefficientMethod):
    name = "EM_PL"
    description = "VLPL: EM plus CLIP pseudo-labels"
    hyperparameters = (
        ALPHA,
        Hyperparameter("beta_pos", float, "EM_PL weight of positive pseudo-labels", default=0.7, minimum=0.0),
        Hyperparameter("beta_neg", float, "EM_PL weight of negative pseudo-labels", default=0.0, minimum=0.0),
        WARMUP_EPOCH,
    )
    needs_pseudo_labels = True

    def label_coefficients(self, observed, pseudo, clean, epoch):
        if epoch <= self.hp.warmup_epoch:
            return losses.em_coefficients(observed, self.hp.alpha)
        return losses.em_pl_coefficients(observed, pseudo, self.hp.alpha, self.hp.beta_pos, self.hp.beta_neg)


class EMPLASL(Method):
    name = "EM_PL_ASL"
    description = "VLPL with asymmetric focal weights"
    hyperparameters = (
        ALPHA,
        Hyperparameter("gamma_pos", float, "EM_PL_ASL focusing power on positives", default=2.0, minimum=0.0),
        Hyperparameter("gamma_neg", float, "EM_PL_ASL focusing power on negative pseudo-labels", default=4.0,
                       minimum=0.0),
        Hyperparameter("gamma_unknown", float, "EM_PL_ASL focusing power on the entropy term", default=4.0,
                       minimum=0.0),
        WARMUP_EPOCH,
    )
    needs_pseudo_labels = True

    def label_coefficients(self, observed, pseudo, clean, epoch):
        if epoch <= self.hp.warmup_epoch:
            return losses.em_coefficients(observed, self.hp.alpha)
        return None

    def loss(self, inputs, epoch):
        coefficients = self.label_coefficients(inputs.observed, inputs.pseudo, inputs.clean, epoch)
        if coefficients is not None:
            return losses.mean_loss(losses.combine(inputs.preds, *coefficients))
        return losses.mean_loss(losses.em_pl_asl_matrix(inputs.preds, inputs.observed, inputs.pseudo,
                                                        self.hp.gamma_pos, self.hp.gamma_neg, self.hp.gamma_unknown))
