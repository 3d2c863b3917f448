"""Cole et al. 2021, "Multi-Label Learning from Single Positive Labels" (CVPR 2021; code:
elijahcole/single-positive-multi-label): assume negative with label smoothing (``an_ls``), weak
assume negative (``wan``), the expected-positive regulariser (``epr``) and ROLE (``role``), a
learnable estimate of every training label trained jointly with the classifier.

Their protocol, as far as their ``train.py`` records it: Adam without weight decay, the whole
classifier at one learning rate (head multiplier 1), 10 epochs end to end (25 on frozen
features; linear_init: 25 + 10), the best epoch by val mAP without early stopping, ROLE's
estimates at 10x the learning rate (``lr_mult``), label smoothing 0.1 and the expected positives
per image of ``COLE_PROTOCOL``. The end-to-end learning rate and batch size are the best of a
search (batch 8 or 16, lr 1e-2 to 1e-5) that the code does not record per loss: the defaults
here are this code base's (``VLPL_DATASET_DEFAULTS``). Their head-only epochs (linear_init's
first stage) run at the best learning rate and batch of a linear_fixed_features search, which
their code records for an_ls and ROLE (``COLE_PROTOCOL``'s head_stage): the defaults of
``--head-lr`` and ``--head-bsize`` here, in both frozen-feature modes.
"""
from __future__ import annotations

import math

import torch

import losses
from methods.base import VLPL_DATASET_DEFAULTS, CoefficientMethod, Hyperparameter, Method, joined_table

# Per dataset (a row, or NO_PROTOCOL): the expected positive labels per image, their
# lookup['expected_num_pos'] (COCO corrected to 2.9 in their commit aefa578 "Correct the value of k
# for COCO"), and the (learning rate, batch) of head-only epochs of the methods whose search their
# train.py records (linear_init_params).
COLE_PROTOCOL = {
    "pascal": dict(expected_num_pos=1.5, head_stage={"an_ls": (1e-4, 8), "role": (1e-3, 16)}),
    "coco": dict(expected_num_pos=2.9, head_stage={"an_ls": (1e-4, 8), "role": (1e-3, 16)}),
    "nuswide": dict(expected_num_pos=1.9, head_stage={"an_ls": (1e-4, 16), "role": (1e-3, 16)}),
    "cub": dict(expected_num_pos=31.4, head_stage={"an_ls": (1e-4, 8), "role": (1e-3, 8)}),
}

# ROLE's estimates learn at this multiple of the stage's learning rate (their P['lr_mult']).
ROLE_LR_MULT = 10.0


def cole_table(method_name: str) -> dict:
    """The per-dataset table of one of their methods: this code base's learning rate (VLPL's),
    their expected positives and, where recorded for the method, its head-only learning rate and batch."""
    def row(vlpl: dict, cole: dict) -> dict:
        values = dict(lr=vlpl["lr"], expected_num_pos=cole["expected_num_pos"])
        if method_name in cole["head_stage"]:
            values["head_lr"], values["head_bsize"] = cole["head_stage"][method_name]
        return values
    return joined_table(row, VLPL_DATASET_DEFAULTS, COLE_PROTOCOL)


EXPECTED_POSITIVES = Hyperparameter(
    "expected_num_pos", float, "epr, role, GR: expected positive labels per image, the expected-positive "
    "regulariser's target (default per dataset, Cole et al.'s: VOC 1.5, COCO 2.9, NUS-WIDE 1.9, CUB 31.4)",
    minimum=0.0)


class AssumeNegativeLabelSmoothing(CoefficientMethod):
    name = "an_ls"
    description = "assume negative with label smoothing (Cole et al. 2021)"
    hyperparameters = (Hyperparameter("ls_coef", float, "an_ls label smoothing coefficient", default=0.1,
                                      minimum=0.0, maximum=1.0),)
    dataset_defaults = cole_table(name)

    def label_coefficients(self, observed, pseudo, clean, epoch):
        return losses.an_ls_coefficients(observed, self.hp.ls_coef)


class WeakAssumeNegative(CoefficientMethod):
    name = "wan"
    description = "weak assume negative: unobserved labels are negatives of weight 1/(K-1) (Cole et al. 2021)"
    dataset_defaults = cole_table(name)

    def label_coefficients(self, observed, pseudo, clean, epoch):
        return losses.wan_coefficients(observed)


class ExpectedPositiveRegularizer(Method):
    """The observed positives' loss plus a regulariser on the batch's mean number of predicted
    positives: not of ``losses.combine``'s form, so the autograd step trains it everywhere."""
    name = "epr"
    description = "observed positives plus the expected-positive regulariser (Cole et al. 2021)"
    hyperparameters = (EXPECTED_POSITIVES,)
    dataset_defaults = cole_table(name)

    def loss(self, inputs, epoch):
        matrix = losses.combine(inputs.preds, *losses.epr_coefficients(inputs.observed))
        return losses.mean_loss(matrix) + losses.expected_positive_regulariser(inputs.global_batch(inputs.preds),
                                                                               self.hp.expected_num_pos)


def _logit(p: float) -> float:
    """Their ``inverse_sigmoid``: log(p / (1 - p)) with p clipped to [1e-5, 1 - 1e-5]."""
    p = min(max(p, 1e-5), 1.0 - 1e-5)
    return math.log(p / (1.0 - p))


def initial_label_logits(observed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Their ``LabelEstimator`` initialisation, N x K logits: uniform in [-q, q] with
    q = logit(0.5 + 0.1) where unobserved, logit(0.995) where observed positive, logit(0.005)
    where observed negative (o = -1)."""
    bound = _logit(0.5 + 0.1)
    logits = bound * (2 * torch.rand(observed.shape, generator=generator) - 1)
    logits[observed == 1] = _logit(0.995)
    logits[observed == -1] = _logit(0.005)
    return logits


class ROLE(Method):
    """Regularised online label estimation: an N x K matrix of label logits (one row per
    training image, ``inputs.index``), their sigmoid the estimates, trained jointly with the
    classifier through ``losses.role_loss`` at ``ROLE_LR_MULT`` times the stage's learning rate.

    The estimates are the method's state (checkpoints, ``--resume``). The first training stage
    draws them from the observed labels and a generator seeded with the run's seed; a later stage
    (``linear_init``'s fine-tuning) starts from the estimates of the best epoch so far, as Cole et
    al.'s code hands them on."""
    name = "role"
    description = "ROLE: jointly learned label estimates with the expected-positive regulariser (Cole et al. 2021)"
    hyperparameters = (EXPECTED_POSITIVES,)
    dataset_defaults = cole_table(name)
    runs_distributed = False

    def __init__(self, hp, labels, stage_epochs, seed: int = 0):
        super().__init__(hp, labels, stage_epochs)
        generator = torch.Generator().manual_seed(seed)
        self.label_logits = torch.nn.Parameter(initial_label_logits(labels.observed, generator))

    @classmethod
    def from_config(cls, config, labels, stage_epochs):
        """As ``Method.from_config``, the initial estimates drawn with the run's seed (-s)."""
        return cls(cls.hyperparameter_values(config), labels, stage_epochs, seed=config.get("seed", 0))

    def estimates(self, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The label estimates (sigmoid of the logits) of rows ``index``."""
        return torch.sigmoid(self.label_logits[index])

    def loss(self, inputs, epoch):
        return losses.role_loss(inputs.preds, self.estimates(inputs.index), inputs.observed,
                                self.hp.expected_num_pos)

    def parameter_groups(self):
        return [([self.label_logits], ROLE_LR_MULT)]

    def start_from_previous_stage(self, state):
        # Cole et al. hand the estimates on as probabilities and take their logit again, clipped to
        # [1e-5, 1 - 1e-5] (their inverse_sigmoid), in float32.
        estimates = torch.sigmoid(state["label_logits"].float()).clamp(1e-5, 1 - 1e-5)
        self.load_state_dict({"label_logits": torch.log(estimates / (1 - estimates))})

    def state_dict(self):
        return {"label_logits": self.label_logits.detach().cpu().clone()}

    def load_state_dict(self, state):
        saved = state["label_logits"]
        if tuple(saved.shape) != tuple(self.label_logits.shape):
            raise ValueError(f"checkpoint ROLE label estimates {tuple(saved.shape)} for "
                             f"{tuple(self.label_logits.shape)} training labels")
        self.label_logits.data.copy_(saved)
