"""Large loss (Kim et al., CVPR 2022, "Large Loss Matters in Weakly Supervised Multi-Label
Classification"): assume-negative BCE whose largest losses on unobserved labels are rejected
(LL-R), corrected for the batch (LL-Ct) or corrected permanently in the observed labels (LL-Cp).

The entries are chosen as the authors' code chooses them (``losses.large_loss``); the clean rate
follows their schedule (``clean_rate``). LL-Cp is the paper's method: the authors' code compares
the scheme with ``is``, so their ``--mod_scheme LL-Cp`` ran LL-Ct's schedule without permanent
corrections (README).
"""
from __future__ import annotations

import torch

import losses
from methods.base import Hyperparameter, Method, joined_table, on_off

DELTA_REL = Hyperparameter(
    "delta_rel", float, "LL-R, LL-Ct: the clean rate's drop after each epoch; LL-Cp: the share of each batch's "
    "entries corrected per step from epoch 2; a fraction of the batch's B x K entries (the authors' --delta_rel is "
    "in percent, divided by 100 in their code: their 0.2 is 0.002 here) (default per method and dataset)",
    minimum=0.0, maximum=1.0)
PERMANENT_TIES = Hyperparameter(
    "permanent_ties", on_off, "LL-Cp: on: every corrected entry becomes a permanent positive, the k-th largest loss "
    "and its ties included (BoostLU's code, youngwk/BridgeGapExplanationPAMC); off: only those strictly above the "
    "k-th largest (LargeLossMatters' code)", default=False)

# Kim et al.'s protocol: batch 16, the head's learning rate 10x the backbone's, 10 epochs, stop when
# val mAP falls more than 3 points below the best; SGD (momentum 0.9, weight decay 1e-3) on VOC,
# Adam elsewhere; learning rates from the authors' answer in snucml/LargeLossMatters issue #4.
# Per dataset (a row, or NO_PROTOCOL), with delta_rel per scheme: issue #4's values (0.2, 0.4, ...
# as passed to the authors' --delta_rel, which their config.py divides by 100) as fractions.
PROTOCOL = dict(epochs=10, bsize=16, head_lr_mult=10.0, max_drop=3.0)
LARGE_LOSS_PROTOCOL = {
    "pascal": dict(PROTOCOL, optimizer="sgd", weight_decay=1e-3, lr=5e-3,
                   delta_rel={"LL-R": 0.002, "LL-Ct": 0.002, "LL-Cp": 0.001}),
    "coco": dict(PROTOCOL, optimizer="adam", weight_decay=0.0, lr=1e-5,
                 delta_rel={"LL-R": 0.004, "LL-Ct": 0.002, "LL-Cp": 0.002}),
    "nuswide": dict(PROTOCOL, optimizer="adam", weight_decay=0.0, lr=1e-5,
                    delta_rel={"LL-R": 0.004, "LL-Ct": 0.002, "LL-Cp": 0.002}),
    "cub": dict(PROTOCOL, optimizer="adam", weight_decay=0.0, lr=7.5e-5,
                delta_rel={"LL-R": 0.004, "LL-Ct": 0.004, "LL-Cp": 0.002}),
}


def defaults_of(scheme: str) -> dict[str, dict]:
    """A scheme's ``Method.dataset_defaults``: the protocol and the scheme's delta_rel per dataset."""
    return joined_table(lambda row: dict(row, delta_rel=row["delta_rel"][scheme]), LARGE_LOSS_PROTOCOL)


def clean_rate(epoch: int, delta_rel: float) -> float:
    """The clean rate of stage epoch ``epoch`` (1-based): 1, less ``delta_rel`` after each epoch,
    by the authors' repeated float subtraction (``P['clean_rate'] -= P['delta_rel']``), so that k
    (a ceiling) comes out as theirs."""
    rate = 1.0
    for _ in range(epoch - 1):
        rate -= delta_rel
    return rate


class LargeLoss(Method):
    """One large-loss scheme; the subclasses name it."""
    scheme: str
    permanent = False          # LL-Cp: corrections go into the observed labels
    hyperparameters = (DELTA_REL,)

    def loss(self, inputs, epoch):
        loss, corrected = losses.large_loss(inputs.logits, inputs.observed, scheme=self.scheme,
                                            clean_rate=clean_rate(epoch, self.hp.delta_rel),
                                            delta_rel=self.hp.delta_rel,
                                            permanent_ties=self.permanent and self.hp.permanent_ties)
        if self.permanent and corrected is not None:
            rows, cols = corrected.nonzero(as_tuple=True)
            if len(rows):
                # Seen from the next epoch on (each image comes once per epoch), as in the authors'
                # train.py, which writes 1.0 into the dataset's observed labels after the step.
                self.labels.update_observed(inputs.index[rows], cols, torch.ones(len(rows)))
        return loss


class LargeLossReject(LargeLoss):
    name = scheme = "LL-R"
    description = "large loss rejection: assume negative, the largest unobserved losses set to 0"
    dataset_defaults = defaults_of("LL-R")


class LargeLossCorrectTemporary(LargeLoss):
    name = scheme = "LL-Ct"
    description = "large loss correction (temporary): the largest unobserved losses taken against label 1"
    dataset_defaults = defaults_of("LL-Ct")


class LargeLossCorrectPermanent(LargeLoss):
    name = scheme = "LL-Cp"
    description = "large loss correction (permanent): the largest unobserved losses become observed positives"
    dataset_defaults = defaults_of("LL-Cp")
    permanent = True
    hyperparameters = (DELTA_REL, PERMANENT_TIES)
