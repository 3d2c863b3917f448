"""GR loss (Generalized Robust loss; Chen et al., IJCAI 2024, "Boosting Single Positive Multi-label
Classification with Generalized Robust Loss", code yan4xi1/GRLoss) as AEVLP runs it (Tran et al.,
ICCV 2025, code Fsoft-AIC/AEVLP): their ``GPR_loss`` without pseudo-labels (``losses.gpr_loss``
with use_pl false), its schedules and regulariser, and AEVLP's per-dataset settings and protocol.

The observed positive gets nl(p); every unobserved label gets V * (K*L1(p) + (1-K)*L2(p)), two
robust losses weighted by K (a sigmoid of the detached prediction) and V (a Gaussian of it), whose
parameters move linearly over the stage's epochs (``losses.gpr_schedule``); AEVLP adds the
expected-positive regulariser. The tuples (w0, wT, b0, bT) and (mu0, sigma0, muT, sigmaT) are one
flag each taking a comma list (``--k-schedule 0,2,-2,-2``), recorded as a JSON list.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from types import SimpleNamespace

import losses
from methods.base import Hyperparameter, Method
from methods.cole import EXPECTED_POSITIVES


@dataclass(frozen=True)
class FloatList:
    """An argparse type: ``length`` comma-separated numbers, e.g. ``0,2,-2,-2``, as a list."""
    length: int
    names: str              # what the numbers are, for messages: "w0,wT,b0,bT"

    def __call__(self, text: str) -> list[float]:
        parts = text.split(",")
        try:
            values = [float(part) for part in parts]
        except ValueError:
            values = []
        if len(parts) != self.length or len(values) != self.length:
            raise argparse.ArgumentTypeError(f"expected {self.length} comma-separated numbers {self.names}, "
                                             f"got {text!r}")
        return values

    @property
    def json_form(self) -> str:
        """What config.json holds for it (main_clip checks a saved configuration against it)."""
        return f"a list of {self.length} numbers [{self.names}]"

    def accepts(self, value) -> bool:
        return isinstance(value, (list, tuple)) and len(value) == self.length and all(
            isinstance(item, (int, float)) and not isinstance(item, bool) for item in value)


@dataclass(frozen=True)
class FloatListHyperparameter(Hyperparameter):
    """A setting that is a fixed-length list of finite numbers (one flag, a comma list)."""
    length: int = 0

    def check(self, value) -> None:
        ok = isinstance(value, (list, tuple)) and len(value) == self.length and all(
            isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item) for item in value)
        if not ok:
            raise ValueError(f"{self.flag} must be {self.length} finite numbers, got {value!r}")


K_SCHEDULE = FloatListHyperparameter(
    "k_schedule", FloatList(4, "w0,wT,b0,bT"),
    "GR: K = sigmoid(w*p + b) weighs the two robust losses of unobserved labels; w, b move linearly from w0, b0 "
    "towards wT, bT over the stage's epochs, counted from epoch - 1 (w0,wT,b0,bT, a comma list; write "
    "--k-schedule=-1,2,-2,-2 when the first number is negative) (default per dataset, AEVLP's)", length=4)
V_SCHEDULE = FloatListHyperparameter(
    "v_schedule", FloatList(4, "mu0,sigma0,muT,sigmaT"),
    "GR: V = exp(-((p - mu) / sigma)^2 / 2) weighs the loss of unobserved labels; mu, sigma move linearly from "
    "mu0, sigma0 to muT, sigmaT over the stage's epochs, counted from epoch (mu0,sigma0,muT,sigmaT, a comma list; "
    "sigmas > 0) (default per dataset, AEVLP's)", length=4)
# q2 and q3 divide the robust losses: 0 is refused (greater_than) as well as negative values (minimum).
Q2 = Hyperparameter("q2", float, "GR: exponent q2 > 0 of the robust loss (1 - p^q2) / q2 of unobserved labels, "
                    "weighted by K (default per dataset, AEVLP's)", minimum=0.0, greater_than=0.0)
Q3 = Hyperparameter("q3", float, "GR: exponent q3 > 0 of the robust loss (1 - (1-p)^q3) / q3 of unobserved labels, "
                    "weighted by 1 - K (default per dataset, AEVLP's)", minimum=0.0, greater_than=0.0)
REG = Hyperparameter("reg", float, "GR: weight of AEVLP's expected-positive regulariser (sum_k p - "
                     "--expected-num-pos)^2 / K^2 (default per dataset, AEVLP's; 0: the GR loss of its own code)",
                     minimum=0.0)

# AEVLP's settings per dataset (a row, or NO_PROTOCOL): configs/pascal.json, coco.json (at its
# repository's root), configs/nuswide.json, configs/cub.json ("beta" is (w0, wT, b0, bT), "alpha"
# (mu0, sigma0, muT, sigmaT), "q2q3", "lam", "rho", "reg"; expected_num_pos from its config.py, Cole
# et al.'s numbers), and its train.py's protocol: Adam, the head's learning rate 10x (lr_mult), stop
# after 2 epochs without a new best val mAP or a drop of more than 2 points. lam1, lam2 and rho weigh
# pseudo-labels (AEVLP's own method).
AEVLP_PROTOCOL = dict(lr=1e-5, optimizer="adam", weight_decay=0.0, head_lr_mult=10.0, patience=2, max_drop=2.0)
AEVLP_CONFIGS = {
    "pascal": dict(AEVLP_PROTOCOL, epochs=8, bsize=8, k_schedule=(0.0, 2.0, -2.0, -2.0),
                   v_schedule=(0.5, 2.0, 0.8, 0.5), q2=0.01, q3=1.0, lam1=0.7, lam2=0.4, rho=0.9, reg=0.05,
                   expected_num_pos=1.5),
    "coco": dict(AEVLP_PROTOCOL, epochs=8, bsize=16, k_schedule=(0.0, 10.0, -2.0, -8.0),
                 v_schedule=(0.5, 2.0, 0.8, 0.5), q2=0.01, q3=1.0, lam1=0.7, lam2=0.5, rho=0.9, reg=0.001,
                 expected_num_pos=2.9),
    "nuswide": dict(AEVLP_PROTOCOL, epochs=10, bsize=16, k_schedule=(0.0, 10.0, -2.0, -8.0),
                    v_schedule=(0.5, 2.0, 0.8, 0.5), q2=0.01, q3=1.0, lam1=0.7, lam2=0.5, rho=0.9, reg=0.001,
                    expected_num_pos=1.9),
    "cub": dict(AEVLP_PROTOCOL, epochs=10, bsize=8, k_schedule=(0.0, 10.0, -2.0, -8.0),
                v_schedule=(0.5, 2.0, 0.8, 0.5), q2=0.01, q3=1.5, lam1=0.8, lam2=0.2, rho=0.9, reg=0.01,
                expected_num_pos=31.4),
}


class GR(Method):
    name = "GR"
    description = "generalized robust loss: K- and V-weighted robust losses on unobserved labels (AEVLP's form)"
    hyperparameters = (K_SCHEDULE, V_SCHEDULE, Q2, Q3, REG, EXPECTED_POSITIVES)
    dataset_defaults = AEVLP_CONFIGS

    def __init__(self, hp, labels, stage_epochs):
        super().__init__(hp, labels, stage_epochs)
        self.loss_hp = SimpleNamespace(**vars(hp), use_pl=False)

    @classmethod
    def defaults(cls, dataset, given=frozenset()):
        # Lists, as --k-schedule parses and config.json reads them back (a resume compares them).
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in super().defaults(dataset, given).items()}

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        mu_0, sigma_0, mu_max, sigma_max = config["v_schedule"]
        if not (sigma_0 > 0 and sigma_max > 0):
            raise ValueError(f"--v-schedule: sigma0 and sigmaT must be > 0, got {sigma_0} and {sigma_max}")

    def loss(self, inputs, epoch):
        return losses.gpr_loss(inputs.logits, inputs.observed, None, self.loss_hp, epoch=epoch,
                               num_epochs=self.stage_epochs, global_batch=inputs.global_batch)
